"""Where a compressed model's accuracy goes: the same weights re-evaluated with one thing changed.

    python -m experiments.decompose runs/default/madtp-sample-0.50.pt

Rows, each an evaluation on the test split with the checkpoint's weights and β:
- which encoders prune (every subset of vision, text and fusion);
- fixed counts, in the vision encoder or in every encoder: every sample keeps ceil(n ρ) of its n
  tokens, ρ = 1 / (1 + β), ranked by the same scores; for a fixed-count arm, θ counts instead;
- on synthetic scenes, in the vision encoder at fixed counts: the scene's object patches ranked
  first (a perfect ranking); counts proportional to the scene's object patches, the same share per
  layer on average (perfect per-sample counts), with the model's ranking or the perfect one.
Writes decompose-<name>.md and .json in --out.
"""

from dataclasses import replace
from pathlib import Path

import torch

import train
from experiments.common import evaluation_parser, positions, restore
from experiments.methods import ARMS, Variant, share_count, top_k_mask
from madtp import ENCODERS


class Truth(Variant):
    """A variant that knows the test images' object patches (I, P) bool, a buffer so that it follows
    the model to its device: the vision encoder's fixed counts rank them first (truth) and/or give
    each image a count in proportion to them (proportional). Images are evaluated once each, in
    order, so that the k-th image the vision encoder sees is test image k."""

    def __init__(self, mcfg, vcfg, options, objects, truth=False, proportional=False):
        super().__init__(mcfg, vcfg, options)
        self.truth, self.proportional, self.seen = truth, proportional, 0
        self.register_buffer("objects", objects, persistent=False)

    def hooks(self, trace):
        self.trace = trace
        return super().hooks(trace)

    def decide(self, encoder, layer, x_in, seq, A, trace, T, inv_tau):
        S, keep = super().decide(encoder, layer, x_in, seq, A, trace, T, inv_tau)
        if encoder != "vision":
            return S, keep
        v = seq.valid[:, 1:]
        if layer == 0:   # which test images this batch holds
            self.rows = torch.arange(self.seen, self.seen + len(v), device=v.device)
            self.seen += len(v)
        patch = positions(self.trace, "vision")[-1][:, 1:] - 1 if layer else \
            torch.arange(v.shape[1], device=v.device).expand_as(v)                 # (B, n) -1: package, padding
        objects = self.objects[self.rows]                                           # (B, P)
        on_object = objects.gather(1, patch.clamp_min(0)) & (patch >= 0)            # (B, n)
        k = share_count(v.sum(dim=1), self.beta, self.cuts[0, layer])
        if self.proportional:
            count = objects.sum(dim=1).float()
            k = (k * count / count.mean()).round().long().clamp(1, None)
        S = S + on_object.float() if self.truth else S
        return S, top_k_mask(S, v, torch.minimum(k, v.sum(dim=1)))


def options_of(madtp):
    """The checkpoint's pruner as Options (the main job's MADTP is the arm of its count rule)."""
    return madtp.options if isinstance(madtp, Variant) else ARMS[madtp.spec["name"]]


def rows_of(r):
    """(label, pruner) for every row of the decomposition."""
    mcfg, vcfg, test, o = r.madtp.cfg, r.model.cfg, r.splits["test"], options_of(r.madtp)

    def make(cls=Variant, **changes):
        pruner = cls(mcfg, vcfg, replace(o, **{k: v for k, v in changes.items() if k in ("prune", "dynamic", "counts")}),
                     **{k: v for k, v in changes.items() if k not in ("prune", "dynamic", "counts")})
        pruner.load_state_dict(r.madtp.state_dict(), strict=False)
        return pruner.to(r.run.device).eval()
    subsets = [ENCODERS, ("vision",), ("text",), ("fusion",), ("text", "fusion"), ("vision", "text"),
               ("vision", "fusion"), ()]
    rows = [((" + ".join(s) or "none") + " (as trained)" * (s == ENCODERS), make(prune=s)) for s in subsets]
    if o.counts == "fixed":
        rows.append(("θ counts in every encoder", make(counts="theta")))
    else:
        rows += [("vision at fixed counts", make(dynamic=tuple(e for e in o.dynamic if e != "vision"))),
                 ("every encoder at fixed counts", make(dynamic=()))]
    if test.object_masks is not None:
        fixed, objects = tuple(e for e in o.dynamic if e != "vision"), test.object_masks
        rows += [("vision: object patches first, fixed counts", make(Truth, dynamic=fixed, objects=objects, truth=True)),
                 ("vision: counts proportional to object patches",
                  make(Truth, dynamic=fixed, objects=objects, proportional=True)),
                 ("vision: object patches first, proportional counts",
                  make(Truth, dynamic=fixed, objects=objects, truth=True, proportional=True))]
    return rows


def table(results):
    head = ["variant", "r_mean", "vs as trained", "reduction", "GFLOPs vision / text / fusion", "vision tokens per layer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = results[0][1]["r_mean"]
    for label, m in results:
        lines.append("| " + " | ".join([
            label, f"{m['r_mean']:.2f}", f"{m['r_mean'] - base:+.2f}", f"{m['gflops_reduction']:.1%}",
            " / ".join(f"{m[f'gflops_{e}']:.4f}" for e in ENCODERS),
            " ".join(f"{mu:.1f}" for mu, _ in m["kept_tokens"]["vision"])]) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = evaluation_parser(__doc__.split("\n\n")[0], "python -m experiments.decompose")
    args = p.parse_args(argv)
    r = restore(args.checkpoint, args)
    with r.run:
        if r.madtp is None:
            train.fail(f"{args.checkpoint} is a dense model: decompose a compressed one (madtp-<counts>-<p>.pt)")
        results = []
        for label, pruner in rows_of(r):
            r.run.log(f"evaluating: {label}")
            results.append((label, train.evaluate(r.cfg, r.run, r.model, pruner, r.splits["test"], r.tokenizer)))
        md, name = table(results), f"decompose-{Path(args.checkpoint).stem}"
        r.run.log(md)
        train.write_json(r.run.out / f"{name}.json", dict(checkpoint=str(args.checkpoint), rows=[
            dict(variant=label, **m) for label, m in results]))
        train.write_atomic(r.run.out / f"{name}.md", lambda tmp: tmp.write_text(md + "\n"))
        r.run.log(f"wrote {r.run.out / name}.md and .json")
    return results


if __name__ == "__main__":
    main()
