"""What a pruner kept, against the synthetic scenes' ground truth, and a drawing of it (tokens.png).

    python -m experiments.truth runs/default/madtp-sample-0.50.pt --out runs/truth

The synthetic scenes know which patches show an object and which words carry content (colour, shape,
size, place): a good pruner keeps those. Per layer, on the test split: the share of kept patches that
show an object (against their share of all patches, what a random pruner keeps), the share of a
scene's object patches still present (over all scenes and over the most cluttered quarter), the
Pearson r over scenes between a scene's object patches and the patches it kept (> 0: more content,
more tokens), and the content words still present in the text and fusion encoders. Writes
truth-<name>.json and tokens.png in --out: the sparsest and the fullest test scenes, what each
layer kept (pruned patches dimmed, pruned words grey).
"""

from pathlib import Path

import torch
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes, make_grid

import data
import train
from experiments.common import evaluation_parser, positions, restore
from madtp import Trace

NUM_DRAWN = 4            # scenes in tokens.png: half the sparsest, half the fullest
WORD_W, WORD_H = 7, 16   # pixels per character and per line of the caption strips
DRAWN_WIDTH = 192        # scenes are drawn at least this many pixels wide


@torch.no_grad()
def kept_positions(r):
    """Per test image and per caption: [per layer: (W_l,) the original index + 1... as positions()
    gives it], for the vision, text and fusion encoders (each caption fused with its own image)."""
    split, bs, device = r.splits["test"], r.cfg.eval_batch_size, r.run.device
    out = dict(vision={}, text=[], fusion=[])
    for start in range(0, len(split.captions), bs):
        c = list(range(start, min(start + bs, len(split.captions))))
        images = torch.stack([split.image(split.txt2img[i]) for i in c]).to(device)
        ids, valid = (t.to(device) for t in r.tokenizer.encode([split.captions[i] for i in c]))
        trace = Trace()
        r.model(images, ids, valid, r.madtp.hooks(trace))
        text = positions(trace, "text")
        per = dict(vision=positions(trace, "vision"), text=text, fusion=positions(trace, "fusion", text[-1]))
        for b, i in enumerate(c):
            out["vision"][split.txt2img[i]] = [p[b].cpu() for p in per["vision"]]
            out["text"].append([p[b].cpu() for p in per["text"]])
            out["fusion"].append([p[b].cpu() for p in per["fusion"]])
    out["vision"] = [out["vision"][i] for i in range(split.num_images)]
    return out


def kept_share(flags, positions):
    """Per layer: the share of kept tokens (CLS and package tokens aside) whose flag is set. flags[s]
    (n,) bool per original token of sample s; positions[s][l] holds original indices + 1 (0 CLS, -1 none)."""
    on, total = torch.zeros(len(positions[0])), torch.zeros(len(positions[0]))
    for flag, per_layer in zip(flags, positions):
        for l, pos in enumerate(per_layer):
            token = pos[pos >= 1] - 1
            on[l] += flag[token].sum()
            total[l] += len(token)
    return (on / total.clamp_min(1)).tolist()


def recall(flags, positions):
    """(S, L): per sample and layer, the share of its flagged original tokens still present."""
    out = torch.zeros(len(flags), len(positions[0]))
    for s, (flag, per_layer) in enumerate(zip(flags, positions)):
        for l, pos in enumerate(per_layer):
            present = torch.zeros_like(flag)
            present[pos[pos >= 1] - 1] = True
            out[s, l] = (flag & present).sum() / flag.sum().clamp_min(1)
    return out


def pearson(x, y):
    """Pearson r of two (S,) tensors; 0 where either does not vary (e.g. dense)."""
    x, y = x - x.mean(), y - y.mean()
    return (x @ y / (x.norm() * y.norm()).clamp_min(1e-12)).item()


def measures(split, words, kept):
    """The ground-truth measures of kept_positions' output, per layer."""
    objects = [split.object_patches(i) for i in range(split.num_images)]
    per_scene, count = recall(objects, kept["vision"]), torch.tensor([float(o.sum()) for o in objects])
    cluttered = count.argsort(descending=True)[: max(1, len(count) // 4)]
    patches = torch.tensor([[float((p >= 1).sum()) for p in per_layer] for per_layer in kept["vision"]])   # (S, L)
    content = [torch.tensor(split.content_words(c)[:words] or [False]) for c in range(len(split.captions))]
    return dict(object_share=kept_share(objects, kept["vision"]),
                object_share_all_patches=torch.stack([o.float().mean() for o in objects]).mean().item(),
                object_recall=per_scene.mean(0).tolist(), object_recall_cluttered=per_scene[cluttered].mean(0).tolist(),
                pearson_r=[pearson(count, k) for k in patches.t()], content_share=kept_share(content, kept["text"]),
                content_recall={e: recall(content, kept[e]).mean(0).tolist() for e in ("text", "fusion")})


def draw(split, words, kept, patch_size, path, num=NUM_DRAWN):
    """tokens.png: for the num // 2 test scenes with the fewest object patches and those with the
    most, the image, then per vision layer the image with its pruned patches dimmed; below, the
    caption once per text and fusion layer, kept words boxed in green, pruned ones grey."""
    order = torch.stack([split.object_patches(i).sum() for i in range(split.num_images)]).argsort(stable=True).tolist()
    scale, grid, rows = max(1, DRAWN_WIDTH // split.image_size), split.image_size // patch_size, []
    mean, std = torch.tensor(data.IMAGE_MEAN)[:, None, None], torch.tensor(data.IMAGE_STD)[:, None, None]
    for i in order[: num // 2] + order[len(order) - (num - num // 2):]:
        img = ((split.image(i) * std + mean).clamp(0, 1) * 255).to(torch.uint8)
        panels = [img]
        for pos in kept["vision"][i]:
            keep = torch.zeros(grid * grid, dtype=torch.bool)
            keep[pos[pos >= 1] - 1] = True
            mask = keep.view(grid, grid).repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1)
            panels.append(torch.where(mask, img, img // 4))
        top = torch.cat([p.repeat_interleave(scale, 1).repeat_interleave(scale, 2) for p in panels], dim=2)
        c = split.img2txt[i][0]
        caption = words(split.captions[c])
        strips = [word_strip(caption, None, "caption")]
        strips += [word_strip(caption, p, f"{e} {l + 1}") for e in ("text", "fusion") for l, p in enumerate(kept[e][c])]
        rows.append(stack([top] + strips))
    write_png(make_grid(stack(rows, only_pad=True), nrow=1, padding=8, pad_value=255), str(path))


def word_strip(words, pos, label):
    """One line: a label, then the words; kept ones (pos holds index + 1) in green boxes, pruned grey."""
    kept = set((pos[pos >= 1] - 1).tolist()) if pos is not None else set(range(len(words)))
    x, boxes, labels, colours = 0, [], [], []
    for text, on in [(label + ":", None)] + [(w, j in kept) for j, w in enumerate(words)]:
        w = WORD_W * len(text) + 6
        boxes.append([x, 1, x + w - 2, WORD_H - 1])
        labels.append(text)
        colours.append("black" if on is None or pos is None else ("green" if on else "lightgray"))
        x += w
    canvas = torch.full((3, WORD_H, x), 255, dtype=torch.uint8)
    return draw_bounding_boxes(canvas, torch.tensor(boxes), labels=labels, colors=colours, width=1)


def stack(pictures, only_pad=False):
    """Pad (3, H, W) uint8 pictures with white to the widest, then stack them top to bottom (or only pad)."""
    W = max(p.shape[2] for p in pictures)
    padded = [torch.cat([p, torch.full((3, p.shape[1], W - p.shape[2]), 255, dtype=torch.uint8)], dim=2)
              for p in pictures]
    return padded if only_pad else torch.cat(padded, dim=1)


def main(argv=None):
    p = evaluation_parser(__doc__.split("\n\n")[0], "python -m experiments.truth")
    args = p.parse_args(argv)
    r = restore(args.checkpoint, args)
    with r.run:
        split = r.splits["test"]
        if r.madtp is None or split.object_masks is None:
            train.fail(f"{args.checkpoint}: the ground truth needs a compressed model trained on synthetic scenes")
        kept = kept_positions(r)
        m = measures(split, r.tokenizer.max_len - 1, kept)
        name = Path(args.checkpoint).stem
        draw(split, r.tokenizer.words, kept, r.model.cfg.patch_size, r.run.out / "tokens.png")
        row = lambda xs, f: " ".join(f"{x:5{f}}" for x in xs)   # noqa: E731
        r.run.log(f"{name}: what the pruner kept, against the scenes' ground truth (per layer)\n"
                  f"  kept patches on objects:        {row(m['object_share'], '.0%')}   (all patches: "
                  f"{m['object_share_all_patches']:.0%})\n"
                  f"  object patches still present:   {row(m['object_recall'], '.2f')}\n"
                  f"    in the most cluttered 25%:    {row(m['object_recall_cluttered'], '.2f')}\n"
                  f"  r(object patches, kept):        {row(m['pearson_r'], '.2f')}\n"
                  f"  content words present, text:    {row(m['content_recall']['text'], '.2f')}   fusion: "
                  f"{row(m['content_recall']['fusion'], '.2f')}")
        train.write_json(r.run.out / f"truth-{name}.json", m)
        r.run.log(f"wrote {r.run.out / f'truth-{name}.json'} and {r.run.out / 'tokens.png'}")
    return m


if __name__ == "__main__":
    main()
