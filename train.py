"""Train a small VLT, compress it with MADTP, evaluate, print what it cost and what it saved.

    python train.py --device cuda          # the whole story on synthetic scenes (the gpu preset)
    python train.py --preset tiny          # the same in about a minute
    torchrun --nproc_per_node=2 train.py   # the same, DistributedDataParallel

Cao et al., "MADTP", CVPR 2024, arXiv 2403.02991; official code github.com/double125/MADTP. In the
order the main job runs: config, data, a model over a split (recalls, GFLOPs), the training loop
and its β controller, stage 1 (the dense VLT), stage 2 (for each count rule, fine-tuning toward a
ramped GFLOPs target, then β calibrated on validation), stage 3 (the test split), main; at the end,
the process (device, log, lock, signals, checkpoints).
"""

import argparse
import ctypes
import ctypes.util
import fcntl
import hashlib
import inspect
import json
import math
import os
import re
import signal
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

# Memory stays flat over a run: glibc's heap would keep the holes that tensors of changing shapes
# leave, so tensors of 2 MiB or more get mappings of their own, on huge pages (torch reads this at
# its first allocation: before `import torch`). A user's own setting wins. docs/speed.md, "Memory".
LIBC = ctypes.CDLL(ctypes.util.find_library("c"))
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
if hasattr(LIBC, "mallopt") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
    LIBC.mallopt(-3, 2 << 20)   # M_MMAP_THRESHOLD (malloc.h), in bytes

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import data
from madtp import (COUNTS, ENCODERS, MADTP, MADTPConfig, Trace, alignment_loss, compile_pruner,
                   dense_gflops, gflops, pair_gflops, realised_reduction)
from vlt import VLT, VLTConfig, check_fields, compile_blocks, flag, recalls, task_loss

BETA_INIT, BETA_MIN, BETA_MAX = 0.5, 1e-3, 1e3   # where stage 2 starts β, and where it may move
BETA_GAIN = 0.5             # the controller: log β += gain (target - reduction); more oscillates
RAMP = 0.4                  # share of stage 2 over which the target rises from 0 to p (EViT, UPop)
WARMUP = 0.05               # share of each stage with a linear learning-rate warm-up
WEIGHT_DECAY, GRAD_CLIP = 0.05, 1.0   # AdamW's, as BLIP's; the largest gradient norm
CALIBRATION_STEPS = 14      # bisection steps on log β, within this factor of training's β:
CALIBRATION_SPAN = 8.0
TARGET_TOLERANCE = 0.02     # the calibrated reduction must land this close to the target
RECALL_AT, ITM_K = (1, 5, 10), 16   # Recall@K; ITM re-ranks each query's top ITM_K (BLIP)
CHECKPOINT_VERSION = 4      # 4: one β for every layer, the count rule in the config
TRIM_EVERY = 10             # training steps between handing the heap's free pages back


# ---------------------------------------------------------------------------------------------
# config: this dataclass, vlt.VLTConfig and madtp.MADTPConfig; their fields are the flags

@dataclass
class TrainConfig:
    preset: str = "default"       # tiny | default | gpu | coco: sets the fields not given
    data: str = "synthetic"       # synthetic scenes (no download) or coco
    coco_root: str = ""           # folder with the COCO images (and annotations/)
    coco_ann: str = ""            # caption json files, comma-separated; "": found in --coco-root
    coco_num_images: int = 0      # the first N images of the pooled annotations (0 = all)
    out: str = ""                 # checkpoints, metrics.json, train.log ("": runs/<preset>)
    seed: int = 0                 # initialisation and batch order; never the data
    device: str = "auto"          # auto | cpu | cuda (auto picks CUDA when available)
    compile: bool = False         # torch.compile the blocks and the pruned layer (docs/speed.md)
    prune_ratio: float = 0.5      # p, the GFLOPs reduction to compress to
    batch_size: int = 64          # training pairs per step and process
    eval_batch_size: int = 64     # evaluation, calibration and timing (batch-max depends on it)
    num_train: int = 4000         # synthetic training images (coco: 70% of the images)
    num_val: int = 400            # synthetic validation images (coco: 15%)
    num_test: int = 500           # synthetic test images (coco: 15%)
    dense_steps: int = 2000       # optimiser steps of stage 1 (validation r_mean flat by the end)
    prune_steps: int = 300        # optimiser steps of stage 2, for each count rule
    lr: float = 5e-4              # AdamW peak learning rate, stage 1
    prune_lr: float = 5e-4        # AdamW peak learning rate, stage 2 (docs/findings.md A3)
    val_every: int = 400          # stage 1: steps between validation r_mean lines (0: none)
    num_workers: int = 0          # DataLoader workers for training batches (0: this process)
    save_every: int = 200         # steps between checkpoints (not a flag; presets set it)

    def __post_init__(self):   # every value that would only fail later, refused now
        K, ones, zeros = max(RECALL_AT), "eval_batch_size num_train num_val save_every", \
            "dense_steps prune_steps num_workers coco_num_images val_every"
        least = dict(batch_size=(2, ": ITM draws each pair's negatives from its batch"),
                     num_test=(K, f": Recall@{K} needs as many test images"),
                     **dict.fromkeys(ones.split(), (1, "")),
                     **dict.fromkeys(zeros.split(), (0, "")))
        check_fields(self, least, positive=("lr", "prune_lr"))
        if not 0 <= self.prune_ratio < 1:
            raise ValueError(f"--prune-ratio is a GFLOPs reduction in [0, 1), got "
                             f"{self.prune_ratio}")


# default: the README's CPU testbed, a 12-layer vision encoder (ViT-B's depth) at width 64; tiny:
# the story in a minute; gpu (--device cuda's): 257 vision tokens and a model wide enough that a
# GPU multiplies matrices instead of waiting for launches; coco: real photos.
PRESETS = {
    "tiny": dict(image_size=32, patch_size=8, dim=64, heads=2, vision_layers=2, text_layers=1,
                 fusion_layers=1, embed_dim=32, num_train=400, num_val=100, num_test=100,
                 dense_steps=300, prune_steps=80, batch_size=32, num_align_tokens=16),
    "default": dict(),
    "gpu": dict(image_size=128, patch_size=8, dim=384, heads=6, vision_layers=8, text_layers=4,
                fusion_layers=4, embed_dim=256, dense_steps=1500, prune_steps=500, batch_size=128,
                eval_batch_size=256, num_align_tokens=64, num_workers=4),
    "coco": dict(data="coco", image_size=128, patch_size=16, dim=192, heads=3, vision_layers=6,
                 text_layers=3, fusion_layers=2, embed_dim=128, max_text_len=32, dense_steps=3000,
                 prune_steps=1000, num_align_tokens=64),
}
CHOICES = dict(preset=tuple(PRESETS), data=("synthetic", "coco"), device=("auto", "cpu", "cuda"),
               counts=COUNTS)
NOT_FLAGS = {"vocab_size", "mlp_ratio", "init_temp", "save_every"}
ELSEWHERE = {"--eval-only": "evaluate", "--profile": "evaluate", "--beta": "evaluate",
             "--seeds": "compare", "--arms": "compare", "--method": "compare"}   # experiments.<...>


def fail(msg, code=2):
    """Stop with one clear line on stderr instead of a traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def field_help(cls):
    """{field: its comment}: the comment after a config field, and lines that continue it."""
    helps, name = {}, None
    for line in inspect.getsource(cls).splitlines():
        field, more = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)", line), re.match(r"\s+#\s*(.*)", line)
        if field:
            name, helps[field[1]] = field[1], field[2]
        elif more and name:
            helps[name] += " " + more[1]
    return helps


class Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs):   # no abbreviations: --beta must not quietly mean --beta-gain
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):   # one line, naming the command a flag of another command belongs to
        hint = "".join(f" ({f} belongs to python -m experiments.{c})" for f, c in ELSEWHERE.items()
                       if f in message)
        fail(f"{message}{hint}; see {self.prog} --help")


def parser(description=__doc__.split("\n\n")[0], prog="train.py"):
    """A flag per field of the three configs, its comment the help; unset ones take the preset's."""
    p = Parser(description=description, prog=prog)
    for cls in (TrainConfig, VLTConfig, MADTPConfig):
        helps = field_help(cls)
        for f in (f for f in fields(cls) if f.name not in NOT_FLAGS):
            kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else \
                dict(type=f.type)
            p.add_argument(flag(f.name), choices=CHOICES.get(f.name), help=helps[f.name].replace("%", "%%"),
                           **kind)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    return p


def configs(args):
    """(TrainConfig, VLTConfig, MADTPConfig): the preset's values, then the flags given, each config
    checking its own; then what no config can check alone, and flags this run would ignore."""
    cuda = args.device == "cuda" or (args.device in (None, "auto") and torch.cuda.is_available())
    preset = args.preset or ("coco" if args.data == "coco" else "gpu" if cuda else "default")
    values = dict(PRESETS[preset], preset=preset, out=f"runs/{preset}")
    values.update({k: v for k, v in vars(args).items() if v is not None})
    try:
        cfg, vcfg, mcfg = (cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})
                           for cls in (TrainConfig, VLTConfig, MADTPConfig))
    except ValueError as e:
        fail(str(e))
    synthetic, words = cfg.data == "synthetic", 1 + data.synthetic_max_words()
    if not synthetic and not cfg.coco_root:
        fail("--data coco needs --coco-root DIR (get a subset with: python data.py download-coco "
             "--root DIR --split val2017 --num-images 5000)")
    if synthetic and vcfg.max_text_len < words:
        fail(f"synthetic captions run to {words - 1} words: --max-text-len must be at least "
             f"{words}")
    ignored, other = ("coco_root coco_ann coco_num_images", "coco") if synthetic else \
        ("num_train num_val num_test", "synthetic")
    for name in (n for n in ignored.split() if getattr(args, n, None) is not None):
        fail(f"{flag(name)} does nothing in this run; it is for --data {other}")
    return cfg, vcfg, mcfg


# ---------------------------------------------------------------------------------------------
# data

def load_splits(cfg, vcfg, run):
    """Train, validation and test splits, each large enough for what the run asks of it."""
    ann = [a for a in cfg.coco_ann.split(",") if a]
    try:
        splits = data.synthetic_splits(cfg.num_train, cfg.num_val, cfg.num_test, 2, vcfg.image_size,
                                       vcfg.patch_size) if cfg.data == "synthetic" else \
            data.coco_splits(cfg.coco_root, ann, vcfg.image_size, cfg.coco_num_images or None,
                             warn=lambda m: run.log(f"warning: {m}"))
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    test, pairs, K = splits["test"], len(splits["train"].captions), max(RECALL_AT)
    if min(test.num_images, len(test.captions)) < K:
        fail(f"the test split has {test.num_images} images and {len(test.captions)} captions: "
             f"Recall@{K} needs at least {K} of each; use more images")
    if pairs < cfg.batch_size * run.world:
        fail(f"the training split has {pairs} pairs, fewer than one batch of {cfg.batch_size} per "
             "process; lower --batch-size or use more data")
    return splits


def dense_identity(cfg, vcfg, tokenizer):
    """What makes two dense checkpoints the same model: a reused one must match all of it."""
    keys = "data coco_root coco_ann coco_num_images seed batch_size num_train num_val num_test " \
           "dense_steps lr"
    words = hashlib.sha256("\n".join(tokenizer.vocab).encode()).hexdigest()[:16]
    return dict({k: getattr(cfg, k) for k in keys.split()}, **asdict(vcfg), vocabulary_hash=words)


# ---------------------------------------------------------------------------------------------
# a model over a split: what stage 1 validates with, stage 2 calibrates with and stage 3 reports

@torch.no_grad()
def encode(run, model, madtp, encoder, batches, width):
    """Each batch through the vision or text encoder -> per sample, on the device: tokens (S, width,
    D) and valid (S, width) padded to one width, input length, ITC embedding, and for a pruned
    model GFLOPs and the count after each layer."""
    out = dict(tokens=[], valid=[], length=[], emb=[], gflops=[], kept=[])
    run_encoder, head = ((model.encode_image, model.itc_vision) if encoder == "vision" else
                         (model.encode_text, model.itc_text))
    for batch in batches:
        batch, trace = [t.to(run.device, non_blocking=True) for t in batch], Trace()
        with run.autocast():
            x, seq = run_encoder(*batch, madtp.hooks(trace)[encoder] if madtp else None)
        pad = width - x.shape[1]
        out["emb"].append(model.embed(x, head))
        out["tokens"].append(nn.functional.pad(x.float(), (0, 0, 0, pad)))
        out["valid"].append(nn.functional.pad(seq.valid, (0, pad)))
        out["length"].append(batch[-1].sum(dim=1) if encoder == "text" else
                             torch.full((len(x),), width, device=x.device))
        if madtp is not None:
            out["gflops"].append(gflops(model.cfg, trace)[encoder])
            out["kept"].append(trace.counts(encoder))
    return {k: torch.cat(v) for k, v in out.items() if v}


@torch.no_grad()
def fuse(run, model, madtp, txt, img, pairs, bs):
    """ITM score (positive minus negative logit) of (caption, image) pairs (P, 2); for a pruned
    model also each pair's fusion GFLOPs and counts. Each batch is cut to its longest caption."""
    out = dict(score=[], gflops=[], kept=[])
    for c, i in (chunk.unbind(1) for chunk in pairs.to(run.device).split(bs)):
        width, trace = int(txt["valid"][c].sum(dim=1).max()), Trace()    # one read a batch
        image, image_valid = img["tokens"][i], img["valid"][i]
        with run.autocast():
            itm = model.fuse(txt["tokens"][c, :width], txt["valid"][c, :width], image, image_valid,
                             madtp.hooks(trace)["fusion"] if madtp else None).float()
        out["score"].append(itm[:, 1] - itm[:, 0])
        if madtp is not None:
            out["gflops"].append(gflops(model.cfg, trace, image_valid.sum(dim=1))["fusion"])
            out["kept"].append(trace.counts("fusion"))
    return {k: torch.cat(v) for k, v in out.items() if v}


def encode_split(cfg, run, model, madtp, split, tokenizer):
    """Every image and caption of a split, and each caption fused with its own image."""
    model.eval()
    bs, pad_to, C = cfg.eval_batch_size, tokenizer.max_len, len(split.captions)
    images = ([torch.stack([split.image(i) for i in range(s, min(s + bs, split.num_images))])]
              for s in range(0, split.num_images, bs))
    captions = (tokenizer.encode(split.captions[s:s + bs], pad_to) for s in range(0, C, bs))
    img = encode(run, model, madtp, "vision", images, 1 + model.cfg.num_patches)
    txt = encode(run, model, madtp, "text", captions, pad_to)
    txt2img = torch.tensor(split.txt2img, device=run.device)
    own = torch.stack([torch.arange(len(txt2img), device=run.device), txt2img], dim=1)   # (T, 2)
    return img, txt, fuse(run, model, madtp, txt, img, own, bs), txt2img


def pair_stats(vcfg, img, txt, own, txt2img):
    """GFLOPs per pair (each caption with its own image; per encoder too), the reduction from
    dense, and the tokens kept after each layer of each encoder, [mean, std] over samples."""
    lengths = txt["length"]
    if "gflops" not in img:   # the dense model: analytic, every token in every layer
        parts, counts = dense_gflops(vcfg, lengths), (img["length"], lengths, lengths)
        kept = {e: n[:, None].expand(-1, getattr(vcfg, f"{e}_layers")) for e, n in zip(ENCODERS, counts)}
    else:
        parts = dict(vision=img["gflops"][txt2img], text=txt["gflops"], fusion=own["gflops"])
        kept = dict(vision=img["kept"], text=txt["kept"], fusion=own["kept"])
    total, reduction = pair_gflops(vcfg, parts["vision"], parts["text"], parts["fusion"], lengths)
    return dict(gflops=total.item(), gflops_reduction=reduction.item(),
                **{f"gflops_{e}": parts[e].mean().item() for e in ENCODERS},
                kept_tokens={e: torch.stack([k.float().mean(0), k.float().std(0)], 1).tolist()
                             for e, k in kept.items()})


@torch.no_grad()
def evaluate(cfg, run, model, madtp, split, tokenizer):
    """Recalls with ITM re-ranking of each query's top-k ITC candidates (BLIP), GFLOPs per pair,
    and the tokens kept per layer (mean and spread over samples: the "dynamic" in DTP)."""
    img, txt, own, txt2img = encode_split(cfg, run, model, madtp, split, tokenizer)
    if not (img["emb"].isfinite().all() and txt["emb"].isfinite().all()):
        run.fail("the model's embeddings are not finite (its weights diverged); train it again "
                 "with a lower learning rate (--lr, --prune-lr)", code=3)
    sim = model.similarity(img["emb"], txt["emb"])                                   # (I, T)
    (I, T), k = sim.shape, min(ITM_K, *sim.shape)
    top_t, top_i = sim.topk(k, dim=1).indices, sim.topk(k, dim=0).indices.t()       # (I, k), (T, k)
    each = lambda n: torch.arange(n, device=sim.device).repeat_interleave(k)   # noqa: E731
    pairs = torch.cat([torch.stack([top_t.flatten(), each(I)], 1), torch.stack([each(T), top_i.flatten()], 1)])
    itm = fuse(run, model, madtp, txt, img, pairs, cfg.eval_batch_size)["score"]    # (c, i) pairs
    metrics = recalls(sim, top_t, top_i, itm[:I * k], itm[I * k:], txt2img, RECALL_AT)
    return dict(metrics, **pair_stats(model.cfg, img, txt, own, txt2img))


# ---------------------------------------------------------------------------------------------
# the training loop and the β controller

class Objective(nn.Module):
    """L = L_task + α L_align as one module, so that DistributedDataParallel sees all of it."""

    def __init__(self, model: VLT, madtp: MADTP = None):
        super().__init__()
        self.model, self.madtp = model, madtp

    def forward(self, images, ids, valid, image_ids):
        trace = Trace(features=self.madtp is not None)
        hooks = self.madtp.hooks(trace) if self.madtp is not None else None
        loss, image_of_pair = task_loss(self.model, images, ids, valid, image_ids, hooks)
        parts = dict(task=loss.detach())
        if trace.F:
            parts["align"] = alignment_loss(trace.F["vision"], trace.F["text"])
            loss = loss + self.madtp.cfg.alpha * parts["align"]
        return loss, parts, trace, image_of_pair


def lr_at(step, steps, peak):
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    w = max(1, int(WARMUP * steps))
    if step < w:
        return peak * (step + 1) / w
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w))))


def finite_everywhere(run, loss, norm):
    """(Whether the step's loss and gradient norm are finite in every process, loss, norm): one
    read of the device, and with several processes one all-reduce, so all stop at the same step."""
    values = torch.stack([loss.detach().float(), norm.float()])
    if run.distributed:
        dist.all_reduce(values)   # a sum: non-finite anywhere is non-finite here
    loss, norm = values.tolist()
    return math.isfinite(loss + norm), loss, norm


def move_beta(run, objective, trace, batch, image_of_pair, goal):
    """The controller: log β += gain (goal - the batch's GFLOPs reduction); every process moves β
    alike. Returns what the progress bar shows."""
    beta = objective.madtp.beta
    r = realised_reduction(objective.model.cfg, trace, image_of_pair, batch["valid"].sum(1))
    if run.distributed:
        dist.all_reduce(r)
        r = r / run.world
    log_beta = beta.clamp_min(BETA_MIN).log() + BETA_GAIN * (goal - r)
    beta.copy_(log_beta.exp().clamp(BETA_MIN, BETA_MAX))
    return dict(red=f"{r.item():.3f}", goal=f"{goal:.2f}", beta=f"{beta.item():.3f}")


def train_stage(cfg, run, name, objective, steps, peak_lr, splits, tokenizer, ckpt, path,
                target=None, validate=None):
    """The loop both stages share: AdamW; a checkpoint every save_every steps and after the step in
    progress on SIGINT or SIGTERM; no update from a non-finite loss or gradient; in stage 2, β moved
    each step toward the GFLOPs target ramped from 0 to p; validate (-> r_mean) every val_every."""
    params = [p for p in objective.parameters() if p.requires_grad]
    opt, step = torch.optim.AdamW(params, lr=peak_lr, weight_decay=WEIGHT_DECAY), ckpt.get("step", 0)
    if "optimizer" in ckpt:
        opt.load_state_dict(ckpt["optimizer"])
        restore_rng(run, ckpt)
    wrapped = nn.parallel.DistributedDataParallel(objective) if run.distributed else objective
    batches = data.train_batches(splits["train"], tokenizer, cfg.batch_size, cfg.seed, step, run.world,
                                 run.rank, cfg.num_workers, run.device.type == "cuda")
    bar = tqdm(total=steps, initial=step, desc=name, disable=not run.main, dynamic_ncols=True)
    objective.train()
    run.deferring = True   # a signal now waits for the step in progress
    while step < steps and not run.stopping():
        batch = next_batch(run, batches, objective.model)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr)
        with run.autocast():
            loss, parts, trace, image_of_pair = wrapped(**batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        finite, loss, norm = finite_everywhere(run, loss, norm)
        if not finite:
            bar.close()
            fail_non_finite(run, loss, norm, step, name, path)
        opt.step()
        step += 1
        post = {k: f"{v.item():.3f}" for k, v in parts.items()}
        if target is not None:
            goal = target * min(1, step / (RAMP * steps))
            post.update(move_beta(run, objective, trace, batch, image_of_pair, goal))
        bar.set_postfix(post)
        bar.update()
        if step % TRIM_EVERY == 0:
            release_memory()
        if validate is not None and cfg.val_every and (step % cfg.val_every == 0 or step == steps):
            log_validation(run, name, step, validate)
            objective.train()
        if step % cfg.save_every == 0 or step == steps or run.stop is not None:
            save_state(run, path, ckpt, objective, opt, step)
    run.deferring = False
    bar.close()
    if step < steps:   # stopped by a signal: the state after the last whole step is saved
        stop = signal.Signals(run.stop or signal.SIGTERM)
        run.fail(f"{stop.name} at step {step} of {name}; saved {path}. Continue with the same "
                 "command and --resume.", code=128 + stop)


def next_batch(run, batches, model):
    """The next training batch, its inputs checked on the CPU (no host sync), on the device."""
    batch = next(batches)
    model.check_inputs(batch["images"], batch["ids"], batch["valid"])
    return {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}


def log_validation(run, name, step, validate):
    """validate() draws from its own random state, so that validating leaves training's alone."""
    with torch.random.fork_rng(devices=[run.device] * (run.device.type == "cuda")):
        run.log(f"{name} step {step}: validation r_mean {validate():.1f}")


def fail_non_finite(run, loss, norm, step, name, path):
    """A non-finite loss or gradient ends the run (exit 3), the last good checkpoint kept."""
    what = f"the loss became {loss}" if not math.isfinite(loss) else f"the gradient norm became {norm}"
    kept = f"the last good checkpoint is {path}" if path.exists() else "no checkpoint was written"
    run.fail(f"{what} at step {step} of stage {name}; {kept}. Lower the learning rate (--lr, "
             "--prune-lr) and start again", code=3)


def restore_rng(run, ckpt):
    """The random state of a resumed run. A checkpoint written on another kind of device lacks (or
    does not need) the CUDA state: the run continues with a fresh one, and says so."""
    torch.set_rng_state(ckpt["rng"])
    if run.device.type == "cuda" and "cuda_rng" in ckpt:
        torch.cuda.set_rng_state(ckpt["cuda_rng"], run.device)
    elif run.device.type == "cuda":
        run.log("warning: the checkpoint was written without CUDA; the GPU's random draws start "
                "afresh")


def save_state(run, path, ckpt, objective, opt, step):
    """A training stage's checkpoint: weights, optimizer, random state, and MADTP's T and β."""
    ckpt.update(model=objective.model.state_dict(), step=step, optimizer=opt.state_dict(),
                rng=torch.get_rng_state())
    if run.device.type == "cuda":
        ckpt["cuda_rng"] = torch.cuda.get_rng_state(run.device)
    if objective.madtp is not None:
        ckpt["madtp"] = objective.madtp.state_dict()
    if run.main:
        save_checkpoint(path, ckpt)


# ---------------------------------------------------------------------------------------------
# stage 1: the dense VLT

def stage_dense(cfg, run, vcfg, splits, tokenizer):
    """Train the dense VLT on L_task, or reuse a finished matching checkpoint."""
    path, identity = run.out / "dense.pt", dense_identity(cfg, vcfg, tokenizer)
    ckpt = prepare_stage(run, path, identity, "dense model", cfg.dense_steps)
    torch.manual_seed(cfg.seed)
    model = VLT(vcfg).to(run.device)
    if "model" in ckpt:
        model.load_state_dict(ckpt["model"])
    if ckpt.get("step") == cfg.dense_steps:
        run.log(f"stage 1: {path} matches this configuration; skipping dense training")
        return model
    ckpt.update(identity=identity, config=dict(train=asdict(cfg), model=asdict(vcfg)),
                tokenizer=tokenizer.state_dict())
    run.log(f"stage 1: training the dense VLT for {cfg.dense_steps} steps -> {path}")
    train_stage(cfg, run, "dense", Objective(model), cfg.dense_steps, cfg.lr, splits, tokenizer, ckpt,
                path, validate=lambda: evaluate(cfg, run, model, None, splits["val"], tokenizer)["r_mean"])
    return model


# ---------------------------------------------------------------------------------------------
# stage 2: compression fine-tuning, then β calibrated on the validation split

def calibrate(cfg, run, model, madtp, split, tokenizer):
    """Freeze β for evaluation: bisect log β until the split's mean GFLOPs per pair is (1 - p) of
    dense (counts fall as β grows, so the search is well posed); keep the closest step's β."""
    trained, best = math.log(float(madtp.beta)), (math.inf, None, None)
    lo = max(math.log(BETA_MIN), trained - math.log(CALIBRATION_SPAN))
    hi = min(math.log(BETA_MAX), trained + math.log(CALIBRATION_SPAN))
    for _ in tqdm(range(CALIBRATION_STEPS), desc="calibrate β", disable=not run.main, leave=False):
        madtp.beta.fill_(math.exp((lo + hi) / 2))
        encoded = encode_split(cfg, run, model, madtp, split, tokenizer)
        r = pair_stats(model.cfg, *encoded)["gflops_reduction"]
        best = min(best, (abs(r - cfg.prune_ratio), float(madtp.beta), r))
        lo, hi = ((lo + hi) / 2, hi) if r < cfg.prune_ratio else (lo, (lo + hi) / 2)
    release_memory()
    madtp.beta.fill_(best[1])
    return best[2]


def stage_compress(cfg, run, vcfg, mcfg, splits, tokenizer, dense, make=MADTP):
    """Fine-tune a copy of the dense model while pruning toward the target, then calibrate β on the
    validation split: <name>-<p>.pt. make(mcfg, vcfg): the pruner, MADTP or a variant from
    experiments/, whose `spec` names it."""
    torch.manual_seed(cfg.seed)
    madtp = make(mcfg, vcfg).to(run.device)
    name = madtp.spec["name"]
    path = run.out / f"{name}-{cfg.prune_ratio:.2f}.pt"
    identity = dict(dense_identity(cfg, vcfg, tokenizer), **asdict(mcfg), pruner=madtp.spec,
                    **{k: getattr(cfg, k) for k in ("prune_ratio", "prune_lr", "prune_steps")})
    ckpt = prepare_stage(run, path, identity, "compressed model", cfg.prune_steps)
    model = VLT(vcfg).to(run.device)
    model.load_state_dict(ckpt.get("model", dense.state_dict()))
    madtp.beta.fill_(BETA_INIT)
    if "madtp" in ckpt:
        madtp.load_state_dict(ckpt["madtp"])
    if ckpt.get("calibrated"):
        run.log(f"stage 2: {path} matches this configuration; skipping it (β "
                f"{float(madtp.beta):.4f})")
        return model, madtp
    if ckpt.get("step") != cfg.prune_steps:
        ckpt.update(identity=identity, pruner=madtp.spec, tokenizer=tokenizer.state_dict(),
                    config=dict(train=asdict(cfg), model=asdict(vcfg), madtp=asdict(mcfg)))
        run.log(f"stage 2: fine-tuning {name} to a {cfg.prune_ratio:.0%} GFLOPs reduction for "
                f"{cfg.prune_steps} steps -> {path}")
        train_stage(cfg, run, name, Objective(model, madtp), cfg.prune_steps, cfg.prune_lr, splits,
                    tokenizer, ckpt, path, target=cfg.prune_ratio)
    reduction = calibrate(cfg, run, model, madtp, splits["val"], tokenizer)
    run.log(f"stage 2: β calibrated on the validation split: β = {float(madtp.beta):.4f}, "
            f"reduction {reduction:.3f}")
    if abs(reduction - cfg.prune_ratio) > TARGET_TOLERANCE:
        run.log(f"warning: the calibrated reduction {reduction:.3f} misses the target "
                f"{cfg.prune_ratio:.2f}")
    ckpt.update(madtp=madtp.state_dict(), validation_reduction=reduction, calibrated=True)
    if run.main:
        save_checkpoint(path, ckpt)
    return model, madtp


# ---------------------------------------------------------------------------------------------
# stage 3: every model on the test split, timed in turns, the report

def report(cfg, run, splits, tokenizer, models):
    """Evaluate every model {name: (model, madtp)} on the test split, print the table, write
    metrics.json. How fast each runs: python -m experiments.bench --checkpoints <out>."""
    test, rows = splits["test"], {}
    for name, (model, madtp) in models.items():
        run.log(f"stage 3: evaluating {name} on the test split ({test.num_images} images, "
                f"{len(test.captions)} captions)")
        rows[name] = evaluate(cfg, run, model, madtp, test, tokenizer)
        rows[name]["ideal_speedup"] = rows["dense"]["gflops"] / rows[name]["gflops"]
        if madtp is not None:
            rows[name].update(counts=madtp.cfg.counts, beta=float(madtp.beta), tau=madtp.cfg.tau)
    run.log(table(rows, cfg.eval_batch_size))   # printed first: a failed write loses nothing
    write_json(run.out / "metrics.json", rows)
    run.log(f"\nwrote {run.out / 'metrics.json'} and {run.out / 'train.log'}; the models' speed: "
            f"python -m experiments.bench --checkpoints {run.out}")
    return rows


def table(rows, bs):
    """The result at a glance: accuracy and compute of each model, then the tokens of each layer."""
    cols = [("r_mean", "r_mean", ".1f"), *((f"{d}@{k}", f"{d}_r{k}", ".1f") for d in ("i2t", "t2i")
                                           for k in RECALL_AT), ("GFLOPs", "gflops", ".4f"),
            *((n, f"gflops_{e}", ".4f") for n, e in zip(("vision", "text", "fusion"), ENCODERS)),
            ("reduction", "gflops_reduction", ".1%"), ("ideal speedup", "ideal_speedup", ".2f")]
    lines = [f"{'model':<22}" + "".join(f"{n:>9}" for n, _, _ in cols[:-1]) + f"{cols[-1][0]:>14}"]
    lines += ["-" * len(lines[0])] + [
        f"{name:<22}" + "".join(f"{m[k]:>9{f}}" for _, k, f in cols[:-1]) + f"{m['ideal_speedup']:>14.2f}"
        for name, m in rows.items()]
    lines += [f"GFLOPs: per pair, each sample at its own token counts (MACs, fvcore's convention); "
              f"batch-max at batch {bs}; ideal speedup: dense GFLOPs / GFLOPs",
              "\ntokens after each layer, mean ± std over test samples (CLS and x_fuse included)"]
    lines += [f"  {name:<22}{e:<8}" + "  ".join(f"{mu:5.1f}±{sd:<4.1f}" for mu, sd in layers)
              for name, m in rows.items() for e, layers in m["kept_tokens"].items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the main job

def main(argv=None):
    args = parser().parse_args(argv)
    cfg, vcfg, mcfg = configs(args)
    with Run(cfg, resume=args.resume) as run:
        run.log("config: " + json.dumps(dict(train=asdict(cfg), model=asdict(vcfg), madtp=asdict(mcfg))))
        splits = load_splits(cfg, vcfg, run)
        tokenizer = data.Tokenizer.build(splits["train"].captions, vcfg.max_text_len)
        vcfg = replace(vcfg, vocab_size=len(tokenizer))
        run.log(f"data: {cfg.data}, {len(splits['train'].captions)} training pairs, "
                f"{splits['val'].num_images} validation and {splits['test'].num_images} test "
                f"images; device {run.device}, torch {torch.__version__}")   # a result names its build
        models = {"dense": (stage_dense(cfg, run, vcfg, splits, tokenizer), None)}
        for counts in COUNTS if args.counts is None else [mcfg.counts]:   # both, unless one given
            models[f"madtp {cfg.prune_ratio:.0%} {counts}"] = stage_compress(
                cfg, run, vcfg, replace(mcfg, counts=counts), splits, tokenizer, models["dense"][0])
        if run.main:
            report(cfg, run, splits, tokenizer, models)


# ---------------------------------------------------------------------------------------------
# the process, from the training loop on: device, log, one run per --out, signals, files

class Interrupted(Exception):
    """SIGINT or SIGTERM outside a training step: stop at once, keeping what was saved."""


class Run:
    """Where this process stands: device, rank, log, the lock on --out, and what stops it. A signal
    during a training step waits for the step to end, so that the checkpoint saved then is exactly
    the state after a step and --resume continues as if never stopped; a second does not wait."""

    def __init__(self, cfg: TrainConfig, resume=False):
        self.world, self.rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
        self.distributed, self.main, self.resume = self.world > 1, self.rank == 0, resume
        self.device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
        self.out, self.stop, self.deferring = Path(cfg.out), None, False
        self.lock = lock(self.out) if self.main else None
        if self.distributed:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT,
                                                                        signal.SIGTERM)}
        if cfg.compile:
            compile_blocks()
            compile_pruner()

    def on_signal(self, signum, frame):
        if not self.deferring or self.stop is not None:
            raise Interrupted(signum)
        self.stop = signum

    def stopping(self):
        """Whether to stop before the next step; with several processes, all stop at the same."""
        if not self.distributed:
            return self.stop is not None
        stop = torch.tensor(float(self.stop is not None), device=self.device)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        return bool(stop.item())

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        """Release the lock and the handlers however the run ends; a signal outside a training
        step becomes one line and exit 128 + its number."""
        self.close()
        if isinstance(error, Interrupted):
            self.fail(f"{signal.Signals(error.args[0]).name}: stopped; what was finished in "
                      f"{self.out} is kept, and the same command continues it (with --resume for an "
                      "unfinished training stage)", code=128 + error.args[0])

    def close(self):
        for s, handler in self.handlers.items():
            signal.signal(s, handler)
        if self.lock is not None:
            self.lock.close()
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def log(self, msg="", error=False):
        if self.main:
            tqdm.write(msg, file=sys.stderr if error else None)
            with open(self.out / "train.log", "a") as f:
                f.write(msg + "\n")

    def fail(self, msg, code=2):
        self.log(f"error: {msg}", error=True)
        sys.exit(code)

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")


def release_memory():
    """Hand the C heap's free pages back to the OS (glibc only; elsewhere nothing to do)."""
    if hasattr(LIBC, "malloc_trim"):
        LIBC.malloc_trim(0)


def pick_device(name, local_rank=0):
    if name == "cuda" and not torch.cuda.is_available():
        fail(f"--device cuda was requested but CUDA is not available on this machine (torch "
             f"{torch.__version__}); run with --device cpu or --device auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        gpus = torch.cuda.device_count()
        fail(f"this process is local rank {local_rank} but the machine has {gpus} GPU(s); start "
             f"torchrun with --nproc_per_node={gpus} or fewer")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def lock(out):
    """One run per --out: an exclusive lock on out/.lock, which the OS releases however it ends."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / ".lock", "a+")
    except OSError as e:
        fail(f"cannot write to --out {out} ({e.strerror}); choose a folder you can write to")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        fail(f"another run (pid {f.read().strip() or '?'}) is using --out {out}; wait for it or "
             "use another --out")
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def write_atomic(path, save):
    """save(tmp), then rename: a crash never leaves a half-written file, and the temporary file is
    named for this process, so that no other process can rename it half-written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        fail(f"could not write {path} ({e.strerror or e}); free some space or choose another --out")


def save_checkpoint(path, ckpt):
    write_atomic(path, lambda tmp: torch.save(dict(ckpt, version=CHECKPOINT_VERSION), tmp))


def write_json(path, obj):
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def load_checkpoint(path):
    """A checkpoint of this version with finite weights; anything else refused with the reason."""
    if not Path(path).is_file():
        fail(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # a truncated or foreign file: say which, not torch's unpickling trace
        fail(f"{path} is not a readable checkpoint of this project ({type(e).__name__}: "
             f"{str(e)[:200]})")
    version = ckpt.get("version") if isinstance(ckpt, dict) else None
    if version != CHECKPOINT_VERSION:
        fail(f"{path} is not a checkpoint of this version of train.py (it has version {version}, "
             f"this train.py reads {CHECKPOINT_VERSION}); train it again, or use the train.py that "
             "wrote it")
    for part in ("model", "madtp"):
        for name, t in ckpt.get(part, {}).items():
            if t.is_floating_point() and not t.isfinite().all():
                fail(f"{path}: {part} tensor {name} holds non-finite values (the run diverged "
                     "before it was saved); train it again with a lower learning rate")
    return ckpt


def prepare_stage(run, path, identity, what, steps):
    """A stage's checkpoint, {} if there is none. One from another configuration is refused, and an
    unfinished one too unless --resume says to continue it."""
    if not path.exists():
        return {}
    ckpt = load_checkpoint(path)
    diff = "; ".join(f"{k}: {ckpt['identity'].get(k)!r} in the checkpoint, {identity.get(k)!r} now"
                     for k in sorted(set(ckpt["identity"]) | set(identity))
                     if ckpt["identity"].get(k) != identity.get(k))
    if diff:
        fail(f"{path} holds a {what} from another configuration ({diff}); use another --out or "
             "delete it")
    if ckpt["step"] < steps and not run.resume:
        fail(f"{path} holds an unfinished {what} (step {ckpt['step']}); continue it with --resume, "
             "or delete the file to start over")
    return ckpt


if __name__ == "__main__":
    main()
