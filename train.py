"""Train a small VLT, compress it with MADTP, evaluate both, print what it cost and what it saved.

    python train.py --device cuda          # the whole story on synthetic scenes (the gpu preset)
    python train.py --preset tiny          # the same in well under a minute
    torchrun --nproc_per_node=2 train.py   # the same, DistributedDataParallel

Cao et al., "MADTP: Multimodal Alignment-Guided Dynamic Token Pruning for Accelerating
Vision-Language Transformer", CVPR 2024, arXiv 2403.02991; official code github.com/double125/MADTP.
The file reads in the order the main job runs, each part using only what is above it: config ->
data -> a model over a split (recalls, GFLOPs per pair) -> the training loop and its β controller
-> stage 1, the dense VLT on L_task -> stage 2, the schedule, compression fine-tuning on
L_task + α L_align while pruning toward a ramped GFLOPs target, β calibrated on the validation
split -> stage 3, both models on the test split and timed -> main; at the end, the process
(device, log, lock, signals, checkpoint files). Sweeps, re-evaluation, the decomposition, the
benchmark and the profiler are in experiments/.
"""

import argparse
import contextlib
import ctypes
import ctypes.util
import fcntl
import hashlib
import inspect
import json
import math
import os
import re
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

# The CPU allocator, set before the first tensor (torch reads THP_MEM_ALLOC_ENABLE at its first
# allocation; docs/speed.md, Memory). Batches of varying shapes leave holes in glibc's heap that it
# keeps, so memory would grow with every step. Tensors of 2 MiB or more therefore get mappings of
# their own, which go back to the OS when freed (glibc's mmap threshold), backed by transparent huge
# pages, so that mapping them afresh costs little speed. A user's own setting of either wins.
LIBC = ctypes.CDLL(ctypes.util.find_library("c"))
M_MMAP_THRESHOLD = -3            # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 2 << 20         # bytes; torch advises huge pages from this size on
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
if hasattr(LIBC, "mallopt") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
    LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import data
from madtp import (BUDGETS, ENCODERS, MADTP, METHODS, MADTPConfig, Trace, alignment_loss,
                   dense_hooks, gflops, pair_gflops, realised_reduction, search_cuts)
from vlt import VLT, VLTConfig, check_fields, flag, recalls, task_loss

BETA_MIN, BETA_MAX = 1e-3, 1e3   # the range the controller and the calibration move β in
BETA_INIT = 0.5                  # where stage 2 starts β
CALIBRATION_STEPS = 14           # bisection steps on log β; the range shrinks 2^14-fold
CALIBRATION_SPAN = 8.0           # calibration looks for β within this factor of training's
TARGET_TOLERANCE = 0.02          # the calibrated reduction must land this close to the target
SEARCH_STEP = 0.5                # a schedule-search step deepens a layer's cut: share x 2^-0.5
SEARCH_PAIRS = 256               # validation pairs that score each candidate schedule
RECALL_AT = (1, 5, 10)           # Recall@K; K candidates are needed for each
WARMUP_RUNS = 3                  # timed forward passes thrown away before measuring pairs/s
TIMING_REPEATS = 3               # pairs/s: the best (least disturbed) of this many passes
CHECKPOINT_VERSION = 3           # 3: the schedule's cut weights w_ℓ
TRIM_EVERY = 10                  # training steps between handing the heap's free pages back (docs/speed.md)


# ---------------------------------------------------------------------------------------------
# config: this dataclass, vlt.VLTConfig and madtp.MADTPConfig; every field is a flag

@dataclass
class TrainConfig:
    preset: str = "default"       # tiny | default | shallow | varied | gpu | coco
    data: str = "synthetic"       # synthetic scenes (no download) or coco
    scene_objects: int = 3        # synthetic: 1 to this many objects a scene (9: all)
    coco_root: str = ""           # folder with the COCO images (and annotations/)
    coco_ann: str = ""            # caption json files, comma-separated; "": found
    coco_num_images: int = 0      # the first N images of the pooled annotations (0 = all)
    out: str = ""                 # checkpoints, metrics, train.log ("": runs/<preset>)
    seed: int = 0                 # initialisation and batch order; never the data
    device: str = "auto"          # auto | cpu | cuda (auto picks CUDA when available)
    prune_ratio: float = 0.5      # p, the GFLOPs reduction to compress to
    schedule: str = "uniform"     # uniform | searched (docs/budget.md)
    batch_size: int = 64          # training pairs per step and process
    eval_batch_size: int = 64     # evaluation; results do not depend on it
    num_train: int = 4000         # synthetic training images (coco: the fractions below)
    num_val: int = 400            # synthetic validation images
    num_test: int = 500           # synthetic test images
    captions_per_image: int = 2   # synthetic: distinct captions per image
    coco_val_fraction: float = 0.15   # share of COCO images held out for validation
    coco_test_fraction: float = 0.15  # share of COCO images held out for the test split
    dense_steps: int = 2000       # optimiser steps of stage 1 (validation r_mean flat by the end)
    prune_steps: int = 300        # optimiser steps of stage 2 (every method gets the same)
    ramp: float = 0.4             # share of stage 2 over which the GFLOPs target rises from 0 to p
    lr: float = 5e-4              # AdamW peak learning rate, stage 1
    prune_lr: float = 5e-4        # AdamW peak learning rate, stage 2 (docs/findings.md: the sweep)
    weight_decay: float = 0.05    # AdamW, as BLIP
    warmup: float = 0.05          # share of each stage with a linear learning-rate warm-up
    grad_clip: float = 1.0        # max gradient norm
    beta_gain: float = 0.5        # controller: log β += gain (target - reduction); more oscillates
    itm_k: int = 16               # ITM re-ranks the top-k ITC candidates (BLIP's protocol)
    bench_batch_size: int = 64    # the large batch timed besides batch 1 (throughput)
    bench_pairs: int = 128        # pairs timed at batch 1 (at the large batch: at least 4 batches)
    save_every: int = 200         # steps between checkpoints (and one on SIGINT or SIGTERM)
    val_every: int = 400          # stage 1: steps between validation r_mean lines
    num_workers: int = 0          # DataLoader workers (0: fastest for synthetic)
    num_drawn: int = 4            # test scenes in tokens.png: half the sparsest, half the fullest

    def __post_init__(self):
        """Every value that would only fail later, refused now (fields are named as their flags)."""
        K = max(RECALL_AT)
        at_least = dict(batch_size=(2, ": ITM draws each pair's negatives from its batch"),
                        itm_k=(K, f": Recall@{K} ranks the top {K} candidates by ITM"),
                        num_test=(K, f": Recall@{K} needs as many test images"))
        for least, names in ((1, "eval_batch_size bench_batch_size bench_pairs num_train num_val "
                                 "save_every captions_per_image scene_objects"),
                             (0, "dense_steps prune_steps num_workers coco_num_images num_drawn "
                                 "val_every")):
            at_least.update(dict.fromkeys(names.split(), (least, "")))
        check_fields(self, at_least, positive=("lr", "prune_lr", "grad_clip", "beta_gain"))
        for name, ok, what in (
                ("prune_ratio", 0 <= self.prune_ratio < 1, "is a GFLOPs reduction in [0, 1)"),
                ("ramp", 0 <= self.ramp <= 1, "is a share of stage 2, in [0, 1]"),
                ("warmup", 0 <= self.warmup <= 1, "is a share of a stage, in [0, 1]"),
                ("weight_decay", self.weight_decay >= 0, "cannot be negative")):
            if not ok:
                raise ValueError(f"--{flag(name)} {what}, got {getattr(self, name)}")


# default: the README's (CPU) testbed, a ViT-deep vision encoder (12 layers, as ViT-B) at width 64;
# shallow: the earlier default, kept for docs/findings.md; tiny: the story in under a minute; varied:
# scenes that fill the grid; gpu (--device cuda's): 257 vision tokens, a model wide enough that a GPU
# multiplies matrices instead of waiting for launches; coco: real photos.
PRESETS = {
    "tiny": dict(image_size=32, patch_size=8, dim=64, heads=2, vision_layers=2, text_layers=1,
                 fusion_layers=1, embed_dim=32, num_train=400, num_val=100, num_test=100,
                 dense_steps=300, prune_steps=80, batch_size=32, num_align_tokens=16, itm_k=10,
                 bench_pairs=16, bench_batch_size=32),
    "default": dict(),
    "shallow": dict(dim=128, vision_layers=4, dense_steps=1000, prune_lr=5e-4, val_every=0),
    "varied": dict(scene_objects=9, max_text_len=1 + data.synthetic_max_words(9)),
    "gpu": dict(image_size=128, patch_size=8, dim=384, heads=6, vision_layers=8, text_layers=4,
                fusion_layers=4, embed_dim=256, dense_steps=1500, prune_steps=500, batch_size=128,
                eval_batch_size=256, bench_batch_size=256, num_align_tokens=64, bench_pairs=256),
    "coco": dict(data="coco", image_size=128, patch_size=16, dim=192, heads=3, vision_layers=6,
                 text_layers=3, fusion_layers=2, embed_dim=128, max_text_len=32, dense_steps=3000,
                 prune_steps=1000, num_align_tokens=64),
}
CHOICES = dict(preset=tuple(PRESETS), data=("synthetic", "coco"), device=("auto", "cpu", "cuda"),
               schedule=("uniform", "searched"), method=tuple(METHODS), budget=BUDGETS)
NOT_FLAGS = {"vocab_size"}   # set from the tokenizer
ELSEWHERE = {"--eval-only": "experiments.evaluate", "--profile": "experiments.evaluate",
             "--beta": "experiments.evaluate", "--compare": "experiments.compare",
             "--seeds": "experiments.compare", "--arms": "experiments.compare"}


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
        hint = "".join(f" ({f} belongs to python -m {c})" for f, c in ELSEWHERE.items() if f in message)
        fail(f"{message}{hint}; see {self.prog} --help")


def parser(description=__doc__.split("\n\n")[0], prog="train.py"):
    """A flag per field of the three configs, its comment the help; unset ones take the preset's."""
    p = Parser(description=description, prog=prog)
    for cls in (TrainConfig, VLTConfig, MADTPConfig):
        helps = field_help(cls)
        for f in (f for f in fields(cls) if f.name not in NOT_FLAGS):
            kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else {"type": f.type}
            p.add_argument("--" + flag(f.name), choices=CHOICES.get(f.name), help=helps[f.name], **kind)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    return p


def configs(args):
    """(TrainConfig, VLTConfig, MADTPConfig): the preset's values, then the flags given; each
    config checks its own values."""
    on_gpu = args.device == "cuda" or (args.device in (None, "auto") and torch.cuda.is_available())
    preset = args.preset or ("coco" if args.data == "coco" else "gpu" if on_gpu else "default")
    values = dict(PRESETS[preset], preset=preset, out=f"runs/{preset}")
    values.update({k: v for k, v in vars(args).items() if v is not None})
    try:
        return tuple(cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})
                     for cls in (TrainConfig, VLTConfig, MADTPConfig))
    except ValueError as e:
        fail(str(e))


# ---------------------------------------------------------------------------------------------
# data

def load_splits(cfg, vcfg, run):
    """Train, validation and test splits, each large enough for what the run asks of it."""
    if cfg.data == "synthetic":
        splits = data.synthetic_splits(cfg.num_train, cfg.num_val, cfg.num_test,
                                       cfg.captions_per_image, vcfg.image_size, vcfg.patch_size,
                                       seed=0, max_objects=cfg.scene_objects)
    else:
        try:
            splits = data.coco_splits(cfg.coco_root, [a for a in cfg.coco_ann.split(",") if a],
                                      vcfg.image_size, cfg.coco_num_images or None,
                                      val_fraction=cfg.coco_val_fraction,
                                      test_fraction=cfg.coco_test_fraction,
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
    keys = ("data scene_objects coco_root coco_ann coco_num_images seed batch_size num_train "
            "num_val num_test captions_per_image dense_steps lr weight_decay warmup").split()
    words = hashlib.sha256("\n".join(tokenizer.vocab).encode()).hexdigest()[:16]
    return dict({k: getattr(cfg, k) for k in keys}, **asdict(vcfg), vocabulary_size=len(tokenizer),
                vocabulary_hash=words)


# ---------------------------------------------------------------------------------------------
# a model over a split: what stage 1 validates with, stage 2 calibrates with and stage 3 reports

def hooks_of(madtp, trace):
    """MADTP's pruning hooks, or the dense model's (which only record) when madtp is None."""
    return madtp.hooks(trace) if madtp is not None else dense_hooks(trace)


CONCATENATED = ("emb", "gflops", "kept", "length")   # the encoders' per-batch outputs joined into one tensor


class Encoder:
    """Runs a model (dense when madtp is None) over a split a batch at a time and keeps each
    sample's own valid tokens, so that re-batching them (for fusion) cannot change any result."""

    def __init__(self, cfg, run, model, madtp, tokenizer):
        self.cfg, self.run, self.madtp, self.tokenizer = cfg, run, madtp, tokenizer
        self.model, self.bs = model.eval(), cfg.eval_batch_size
        if madtp is not None:   # frozen bars β_ℓ; fit_bars switches to fitting on purpose
            madtp.eval()

    @torch.no_grad()
    def run_encoder(self, encoder, inputs, positions=False):
        """Each batch of inputs through the vision or text encoder -> per sample: its tokens, ITC
        embedding, GFLOPs, count after each layer, input length (text) and, with positions, which
        tokens each layer kept."""
        out = dict(tokens=[], emb=[], gflops=[], kept=[], length=[], positions=[], slots=[])
        model = self.model
        encode, embed = ((model.encode_image, model.embed_image) if encoder == "vision" else
                         (model.encode_text, model.embed_text))
        for batch in inputs:
            trace, B = Trace(positions=positions), len(batch[0])
            with self.run.autocast():
                x, valid = encode(*[t.to(self.run.device) for t in batch],
                                  hooks_of(self.madtp, trace)[encoder])
                out["emb"].append(embed(x).float())
            layers = trace.layers[encoder]
            out["tokens"] += [t[v].float() for t, v in zip(x, valid)]
            out["gflops"].append(gflops(model.cfg, trace)[encoder])
            out["kept"].append(torch.stack([r["n_out"] for r in layers], 1))        # (B, L)
            if encoder == "text":   # the captions' lengths, for the dense GFLOPs of a pair
                out["length"].append(batch[-1].sum(1))                              # (B,)
            if positions:   # and for text, the word each final token started as (for fusion's)
                out["positions"] += [[r["kept"][b] for r in layers] for b in range(B)]
                out["slots"] += [layers[-1]["kept"][b][valid[b]] for b in range(B)]
        return dict(out, **{k: torch.cat(v) for k, v in out.items() if k in CONCATENATED and v})

    def images(self, split, positions=False):
        loader = DataLoader(data.ImageDataset(split), self.bs, num_workers=self.cfg.num_workers)
        return self.run_encoder("vision", ([b["image"]] for b in loader), positions)

    def texts(self, captions, positions=False):
        batches = (self.tokenizer.encode(captions[i:i + self.bs])
                   for i in range(0, len(captions), self.bs))
        return self.run_encoder("text", batches, positions)

    @torch.no_grad()
    def fuse(self, text_tokens, image_tokens, pairs, slots=None):
        """ITM logit (positive minus negative) and fusion GFLOPs for (caption c, image i) pairs;
        with slots (the texts' "slots"), also which words each fusion layer kept."""
        out, device = dict(score=[], gflops=[], kept=[], positions=[]), self.run.device
        for i in range(0, len(pairs), self.bs):
            captions, images = zip(*pairs[i:i + self.bs])
            t, t_valid = padded([text_tokens[c] for c in captions], device)            # (B, N, D)
            v, v_valid = padded([image_tokens[j] for j in images], device)             # (B, N_v, D)
            start = None if slots is None else dict(
                fusion=padded([slots[c] for c in captions], device, -1)[0])            # (B, N)
            trace = Trace(positions=slots is not None, start=start)
            with self.run.autocast():
                itm = self.model.fuse(t, t_valid, v, v_valid, hooks_of(self.madtp, trace)["fusion"])
            itm = itm.float()
            layers = trace.layers["fusion"]
            out["score"].append(itm[:, 1] - itm[:, 0])
            out["gflops"].append(gflops(self.model.cfg, trace, v_valid.sum(1))["fusion"])
            out["kept"].append(torch.stack([r["n_out"] for r in layers], 1))           # (B, L_f)
            if slots is not None:
                out["positions"] += [[r["kept"][b] for r in layers] for b in range(len(t))]
        return dict(out, **{k: torch.cat(out[k]) for k in ("score", "gflops", "kept")})

    def split_gflops(self, split):
        """Mean GFLOPs per true pair and the reduction from dense, as calibration needs them."""
        imgs, txts = self.images(split), self.texts(split.captions)
        fus = self.fuse(txts["tokens"], imgs["tokens"], list(enumerate(split.txt2img)))
        release_memory()   # calibration runs this at each of its steps (and fit_bars with it)
        return pair_stats(self.model.cfg, split, imgs, txts, fus)


def padded(rows, device, value=0):
    """A list of (n_b, ...) tensors -> (B, N, ...) padded with value, and valid (B, N)."""
    lengths = torch.tensor([len(r) for r in rows], device=device)
    x = pad_sequence([r.to(device) for r in rows], batch_first=True, padding_value=value)
    return x, torch.arange(x.shape[1], device=device)[None, :] < lengths[:, None]


def pair_stats(vcfg, split, imgs, txts, fus):
    """madtp.pair_gflops of the encoders' outputs on a split (each caption with its own image)."""
    return pair_gflops(vcfg, imgs["gflops"].cpu(), txts["gflops"].cpu(), fus["gflops"].cpu(),
                       torch.tensor(split.txt2img), txts["length"].cpu())


@torch.no_grad()
def evaluate(cfg, run, model, madtp, split, tokenizer, draw_to=None):
    """Recalls with ITM re-ranking of each query's top-k ITC candidates (BLIP), GFLOPs per pair,
    tokens kept per layer (mean and spread over samples) and, on synthetic scenes, what the pruner
    kept of the ground truth."""
    enc, synthetic = Encoder(cfg, run, model, madtp, tokenizer), split.object_patches(0) is not None
    imgs, txts = enc.images(split, synthetic), enc.texts(split.captions, synthetic)
    if not (imgs["emb"].isfinite().all() and txts["emb"].isfinite().all()):
        run.fail("the model's embeddings are not finite (its weights diverged); train it again "
                 "with a lower learning rate (--lr, --prune-lr)", code=3)
    sim = imgs["emb"] @ txts["emb"].t()                                                # (I, T)
    k = min(cfg.itm_k, *sim.shape)
    top_t, top_i = sim.topk(k, dim=1).indices, sim.topk(k, dim=0).indices.t()     # (I, k), (T, k)
    pairs = ([(c, i) for i in range(len(top_t)) for c in top_t[i].tolist()] +
             [(c, i) for c in range(len(top_i)) for i in top_i[c].tolist()])
    itm = enc.fuse(txts["tokens"], imgs["tokens"], pairs)["score"].cpu()
    metrics = recalls(sim.cpu(), top_t.cpu(), top_i.cpu(), itm[:top_t.numel()], itm[top_t.numel():],
                      split.img2txt, split.txt2img, RECALL_AT)
    fus = enc.fuse(txts["tokens"], imgs["tokens"], list(enumerate(split.txt2img)),
                   slots=txts["slots"] if synthetic else None)
    metrics.update(pair_stats(model.cfg, split, imgs, txts, fus))
    metrics["kept_tokens"] = {e: [[s.float().mean().item(), s.float().std().item()]
                                  for s in out["kept"].cpu().t()]
                              for e, out in (("vision", imgs), ("text", txts), ("fusion", fus))}
    if synthetic:
        words, pos = tokenizer.max_len - 1, dict(text=txts["positions"], fusion=fus["positions"])
        metrics.update(object_share=data.object_share(split, imgs["positions"]),
                       content_share=data.content_share(split, words, pos["text"]),
                       object_recall=data.object_recall(split, imgs["positions"]),
                       content_recall={e: data.content_recall(split, words, p)
                                       for e, p in pos.items()})
        if draw_to is not None and run.main:
            data.draw_kept(split, tokenizer.words, imgs["positions"], pos["text"], pos["fusion"],
                           model.cfg.patch_size, cfg.num_drawn, draw_to)
    release_memory()
    return metrics


# ---------------------------------------------------------------------------------------------
# the training loop and the β controller

class Objective(nn.Module):
    """L = L_task + α L_align as one module, so that DistributedDataParallel sees all of it."""

    def __init__(self, model: VLT, madtp: MADTP = None):
        super().__init__()
        self.model, self.madtp = model, madtp

    def forward(self, images, ids, valid, image_ids):
        align = self.madtp is not None and self.madtp.aligned
        trace = Trace(features=align)
        loss, info = task_loss(self.model, images, ids, valid, image_ids, hooks_of(self.madtp, trace))
        parts = dict(task=loss.detach())
        if align:
            L_align = alignment_loss(trace.F["vision"], trace.F["text"])
            loss = loss + self.madtp.cfg.alpha * L_align
            parts["align"] = L_align.detach()
        return loss, parts, trace, info["image_of_pair"]


def lr_at(step, steps, peak, warmup):
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    w = max(1, int(warmup * steps))
    if step < w:
        return peak * (step + 1) / w
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w))))


# dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, for MFU; others get none
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12,
                   "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def peak_flops(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return next((f for key, f in PEAK_BF16_FLOPS.items() if key in name), None) if name else None


def log_speed(run, name, step_flops, step, from_step, from_time):
    """The stage's steps/s from the second step on (the first ran under the FLOP counter), its model
    FLOP/s (torch.utils.flop_counter's count) and the MFU where the device's peak is known."""
    run.sync()
    rate = (step - from_step) / (time.perf_counter() - from_time)
    flops, peak = step_flops * rate, peak_flops(run.device)
    mfu = f", MFU {flops / peak:.1%}" if peak else ""
    run.log(f"{name}: {rate:.2f} steps/s, {flops / 1e12:.2f} TFLOP/s{mfu} (wall clock, checkpoints and "
            f"validation included); peak RSS so far {peak_rss():.2f} GB")


def optimizer(run, params, peak_lr, weight_decay, ckpt_base):
    """(AdamW, the step to start from): when resuming, the same state, batches and random draws as
    if never stopped."""
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=weight_decay)
    if "optimizer" not in ckpt_base:
        return opt, 0
    opt.load_state_dict(ckpt_base["optimizer"])
    torch.set_rng_state(ckpt_base["rng"])
    if run.device.type == "cuda":
        torch.cuda.set_rng_state(ckpt_base["cuda_rng"], run.device)
    return opt, ckpt_base["step"]


def save_state(run, path, ckpt_base, objective, opt, step, done):
    """The checkpoint of a training stage: weights, optimizer, random state, and MADTP's β."""
    ckpt = dict(ckpt_base, model=objective.model.state_dict(), step=step, done=done,
                optimizer=opt.state_dict(), rng=torch.get_rng_state())
    if run.device.type == "cuda":
        ckpt["cuda_rng"] = torch.cuda.get_rng_state(run.device)
    if objective.madtp is not None:
        ckpt.update(madtp=objective.madtp.state_dict(), beta=float(objective.madtp.beta))
    if run.main:
        save_checkpoint(path, ckpt)


def stop_if_diverged(run, bar, loss, norm, step, name, path):
    """A finite loss can still overflow its gradient: no update from either (one read of the
    device for both), and the last good checkpoint kept."""
    loss_value, norm_value = torch.stack([loss.detach().float(), norm.float()]).tolist()
    if math.isfinite(loss_value + norm_value):
        return
    bar.close()
    what = (f"the loss became {loss_value}" if not math.isfinite(loss_value) else
            f"the gradient norm became {norm_value}")
    kept = f"the last good checkpoint is {path}" if path.exists() else "no checkpoint was written"
    run.fail(f"{what} at step {step} of stage {name}; {kept}. Lower the learning rate (--lr, "
             "--prune-lr) and start again", code=3)


def move_beta(cfg, run, objective, trace, batch, image_of_pair, goal):
    """The controller: log β += gain (goal - the batch's GFLOPs reduction); every process moves β
    alike. Returns what the progress bar shows."""
    madtp = objective.madtp
    r = realised_reduction(objective.model.cfg, trace, image_of_pair, batch["valid"].sum(1))
    r = r.to(run.device)
    if run.distributed:
        dist.all_reduce(r)
        r = r / run.world
    log_beta = madtp.beta.clamp_min(BETA_MIN).log() + cfg.beta_gain * (goal - r)
    madtp.beta.copy_(log_beta.exp().clamp(BETA_MIN, BETA_MAX))
    return dict(red=f"{r.item():.3f}", goal=f"{goal:.2f}", beta=f"{madtp.beta.item():.3f}")


def train_stage(cfg, run, name, objective, steps, peak_lr, splits, tokenizer, ckpt_base, path,
                target=None, validate=None):
    """The loop both stages share: AdamW; atomic checkpoints every save_every steps and after the
    step in progress on SIGINT or SIGTERM; no update from a non-finite loss or gradient; in stage 2
    (target p), β moved after every step toward the GFLOPs target ramped from 0 to p; with validate
    (a function returning r_mean), a validation line every val_every steps."""
    params = [p for p in objective.parameters() if p.requires_grad]
    opt, step = optimizer(run, params, peak_lr, cfg.weight_decay, ckpt_base)
    wrapped = nn.parallel.DistributedDataParallel(objective) if run.distributed else objective
    bar = tqdm(total=steps, initial=step, desc=name, disable=not run.main, dynamic_ncols=True)
    batches = data.train_batches(data.PairDataset(splits["train"], train=True), tokenizer, cfg.batch_size,
                                 cfg.seed, step, run.world, run.rank, cfg.num_workers)
    objective.train()
    step_flops, timed_from, run.deferring = None, None, True   # the first step's FLOPs; timed from
    while step < steps and not run.stopping():
        batch = next(batches)
        objective.model.check_inputs(batch["images"], batch["ids"], batch["valid"])   # CPU: no sync
        batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr, cfg.warmup)
        first = step_flops is None
        with FlopCounterMode(display=False) if first else contextlib.nullcontext() as counter:
            with run.autocast():
                loss, parts, trace, image_of_pair = wrapped(**batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        stop_if_diverged(run, bar, loss, norm, step, name, path)
        opt.step()
        step += 1
        if step % TRIM_EVERY == 0:
            release_memory()
        if first:   # the first step, counted (and slowed) by the FLOP counter: not timed
            step_flops = counter.get_total_flops() * run.world
            run.sync()
            timed_from = (step, time.perf_counter())
        post = {k: f"{v.item():.3f}" for k, v in parts.items()}
        if target is not None:
            goal = target * min(1.0, step / max(1, cfg.ramp * steps))
            post.update(move_beta(cfg, run, objective, trace, batch, image_of_pair, goal))
        bar.set_postfix(post)
        bar.update()
        if validate is not None and cfg.val_every and (step % cfg.val_every == 0 or step == steps):
            # its own random stream (a DataLoader draws a seed): the curve cannot move training
            with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
                run.log(f"{name} step {step}: validation r_mean {validate():.1f}")
            objective.train()
        if step % cfg.save_every == 0 and step < steps:
            save_state(run, path, ckpt_base, objective, opt, step, done=False)
    run.deferring = False
    bar.close()
    save_state(run, path, ckpt_base, objective, opt, step, done=step == steps)
    if step < steps:   # stopped by a signal: saved the state after the last whole step
        stop = signal.Signals(run.stop or signal.SIGTERM)
        run.log(f"\n{stop.name} at step {step} of {name}; saved {path}. Continue with the same "
                "command and --resume.", error=True)
        sys.exit(128 + stop)
    if timed_from is not None and step > timed_from[0]:
        log_speed(run, name, step_flops, step, *timed_from)


# ---------------------------------------------------------------------------------------------
# stage 1: the dense VLT

def stage_dense(cfg, run, vcfg, splits, tokenizer):
    """Train the dense VLT on L_task, or reuse a finished matching checkpoint."""
    path = run.out / "dense.pt"
    identity = dense_identity(cfg, vcfg, tokenizer)
    ckpt, done = prepare_stage(run, path, identity, "dense model")
    torch.manual_seed(cfg.seed)
    model = VLT(vcfg).to(run.device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    if done:
        run.log(f"stage 1: {path} matches this configuration; skipping dense training")
        return model
    base = ckpt or dict(version=CHECKPOINT_VERSION, kind="dense", identity=identity,
                        vlt_config=asdict(vcfg), train_config=asdict(cfg),
                        tokenizer=tokenizer.state_dict())
    run.log(f"stage 1: training the dense VLT for {cfg.dense_steps} steps -> {path}")

    def validate():
        return evaluate(cfg, run, model, None, splits["val"], tokenizer)["r_mean"]
    train_stage(cfg, run, "dense", Objective(model), cfg.dense_steps, cfg.lr, splits, tokenizer,
                base, path, validate=validate)
    return model


# ---------------------------------------------------------------------------------------------
# stage 2: the schedule, compression fine-tuning, β calibrated on the validation split

def search_schedule(cfg, run, vcfg, mcfg, split, tokenizer, dense, folder=None):
    """The cut weights w_ℓ for target p (madtp.search_cuts), searched on validation pairs with the
    dense model frozen, as DiffRate searches its rates on a frozen ViT; a candidate costs its
    validation L_task, with fixed ITM negatives. Scored with S_cls at fixed counts, which needs no
    alignment tokens, so that every method prunes on the same schedule. Cached per target."""
    cache = (folder or run.out) / f"schedule-{cfg.prune_ratio:.2f}.json"
    mcfg = replace(mcfg, method="cls-static")
    key = dict(dense_identity(cfg, vcfg, tokenizer), prune_ratio=cfg.prune_ratio,   # what it depends on
               first_layer=mcfg.first_layer,
               **{f"prune_{e}": getattr(mcfg, f"prune_{e}") for e in ENCODERS})
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    if cached.get("key") == key:
        return torch.tensor(cached["cuts"])
    probe = MADTP(mcfg, vcfg).to(run.device).eval()
    probe.beta.fill_(1.0)                                                   # ρ_ℓ = 2^(-w_ℓ)
    captions = [cs[0] for cs in split.img2txt[:SEARCH_PAIRS]]               # one caption per image
    ids, valid = tokenizer.encode([split.captions[c] for c in captions])
    images = torch.stack([split.image(split.txt2img[c]) for c in captions])
    batch = [t.to(run.device) for t in (images, ids, valid, torch.arange(len(captions)))]
    with torch.no_grad(), run.autocast():   # fixed ITM negatives: the dense model's hardest
        out = dense.eval()(*batch[:3])
    sim = (out["e_img"] @ out["e_txt"].t()).fill_diagonal_(-math.inf)      # (B, B) image x caption
    negatives = sim.argmax(dim=1), sim.argmax(dim=0)                       # per image, per caption
    bar = tqdm(desc="schedule search (candidates)", disable=not run.main, leave=False)

    @torch.no_grad()
    def cost(cuts):   # (validation L_task, GFLOPs reduction) under these cut weights
        probe.cuts.copy_(cuts)
        trace = Trace()
        with run.autocast():
            loss, info = task_loss(dense, *batch, probe.hooks(trace), negatives)
        bar.update()
        r = realised_reduction(vcfg, trace, info["image_of_pair"], batch[2].sum(1))
        return loss.item(), r.item()

    layers = [(e, l) for e, enc in enumerate(ENCODERS) for l in range(probe.depths[enc])
              if probe.prunes(enc, l)]
    cuts = search_cuts(cost, layers, probe.cuts.shape, cfg.prune_ratio, SEARCH_STEP)
    bar.close()
    cuts = cuts / cuts[cuts > 0].mean()   # mean 1 where it cuts, as uniform's: β keeps its scale
    run.log("stage 2: schedule searched on the validation split, cut weights w_ℓ: " + "; ".join(
        f"{e} " + " ".join(f"{w:.2f}" for w in cuts[i, :probe.depths[e]].tolist())
        for i, e in enumerate(ENCODERS)))
    if run.main:
        write_json(cache, dict(key=key, cuts=cuts.tolist()))
    return cuts


def fit_bars(cfg, run, model, madtp, split, tokenizer):
    """Fit the layer budget's bars β_ℓ to the current β: the whole split as one batch, in
    training mode, so that each layer keeps the share ρ_ℓ of the split's tokens; then frozen."""
    if madtp.cfg.budget == "layer":
        whole = replace(cfg, eval_batch_size=len(split.captions))
        fit = Encoder(whole, run, model, madtp, tokenizer)
        madtp.train()   # after Encoder, which freezes the bars
        fit.split_gflops(split)
        madtp.eval()


def calibrate(cfg, run, model, madtp, split, tokenizer):
    """Freeze β for evaluation: bisect log β until the split's mean GFLOPs per pair is (1 - p) of
    dense (counts fall as β grows, so the search is well posed), fitting the bars at every step;
    the best step's β and bars are kept."""
    enc, trained = Encoder(cfg, run, model, madtp, tokenizer), math.log(float(madtp.beta))
    lo = max(math.log(BETA_MIN), trained - math.log(CALIBRATION_SPAN))
    hi = min(math.log(BETA_MAX), trained + math.log(CALIBRATION_SPAN))
    best = (math.inf, None, None, None)
    for _ in tqdm(range(CALIBRATION_STEPS), desc="calibrate β", disable=not run.main, leave=False):
        mid = (lo + hi) / 2
        madtp.beta.fill_(math.exp(mid))
        fit_bars(cfg, run, model, madtp, split, tokenizer)
        r = enc.split_gflops(split)["gflops_reduction"]
        step = (abs(r - cfg.prune_ratio), math.exp(mid), r, madtp.bars.clone())
        best = min(best, step, key=lambda t: t[0])
        lo, hi = (mid, hi) if r < cfg.prune_ratio else (lo, mid)
    madtp.bars.copy_(best[3])
    return best[1], best[2]


def stage_compress(cfg, run, vcfg, mcfg, splits, tokenizer, dense, schedules=None):
    """Fine-tune a copy of the dense model while pruning toward the target, then calibrate β on
    the validation split; the checkpoint is <method>-<p>.pt in run.out, a searched schedule cached
    in `schedules` (default run.out)."""
    path = run.out / f"{mcfg.method}-{cfg.prune_ratio:.2f}.pt"
    identity = dict(dense_identity(cfg, vcfg, tokenizer),
                    **{f"madtp_{k}": v for k, v in asdict(mcfg).items()},
                    **{k: getattr(cfg, k) for k in ("prune_ratio", "prune_lr", "prune_steps", "ramp",
                                                    "beta_gain", "schedule")})
    ckpt, done = prepare_stage(run, path, identity, "compressed model")
    searched = ckpt is None and cfg.schedule == "searched"
    cuts = (search_schedule(cfg, run, vcfg, mcfg, splits["val"], tokenizer, dense, schedules)
            if searched else None)
    model = VLT(vcfg).to(run.device)
    model.load_state_dict((ckpt or {}).get("model", dense.state_dict()))
    torch.manual_seed(cfg.seed)
    madtp = MADTP(mcfg, vcfg).to(run.device)
    madtp.T.requires_grad_(madtp.aligned)   # only a score that uses the concepts trains them
    madtp.beta.fill_(BETA_INIT)
    if ckpt is not None:
        madtp.load_state_dict(ckpt["madtp"])
    elif cuts is not None:
        madtp.cuts.copy_(cuts)
    if done and ckpt.get("calibrated"):
        run.log(f"stage 2: {path} matches this configuration; skipping fine-tuning "
                f"(β = {float(madtp.beta):.4f})")
        return model, madtp
    if not done:
        base = ckpt or dict(version=CHECKPOINT_VERSION, kind="compressed", identity=identity,
                            tau=mcfg.tau, vlt_config=asdict(vcfg), madtp_config=asdict(mcfg),
                            train_config=asdict(cfg), tokenizer=tokenizer.state_dict(),
                            target_reduction=cfg.prune_ratio)
        run.log(f"stage 2: fine-tuning with {mcfg.method} to a {cfg.prune_ratio:.0%} GFLOPs "
                f"reduction for {cfg.prune_steps} steps -> {path}")
        train_stage(cfg, run, mcfg.method, Objective(model, madtp), cfg.prune_steps, cfg.prune_lr,
                    splits, tokenizer, base, path, target=cfg.prune_ratio)
    beta, reduction = calibrate(cfg, run, model, madtp, splits["val"], tokenizer)
    madtp.beta.fill_(beta)
    run.log(f"stage 2: β calibrated on the validation split: β = {beta:.4f}, "
            f"reduction {reduction:.3f}")
    if abs(reduction - cfg.prune_ratio) > TARGET_TOLERANCE:
        why = f" (--first-layer {mcfg.first_layer} keeps layers unpruned)" * bool(mcfg.first_layer)
        run.log(f"warning: the calibrated reduction {reduction:.3f} misses the target "
                f"{cfg.prune_ratio:.2f}; this configuration may not reach it{why}")
    if run.main:
        ckpt = load_checkpoint(path)
        ckpt.update(madtp=madtp.state_dict(), beta=beta, validation_reduction=reduction,
                    calibrated=True)
        save_checkpoint(path, ckpt)
    return model, madtp


# ---------------------------------------------------------------------------------------------
# stage 3: evaluation on the test split, timing, the report

def bench_batches(cfg, split, tokenizer, batch_size, n=None):
    """The n pairs every model is timed on (by default bench_pairs at batch 1, at least 4 batches
    else): test pairs in order, each batch padded to its longest caption."""
    n = n or (cfg.bench_pairs if batch_size == 1 else max(cfg.bench_pairs, 4 * batch_size))
    c_of = [c % len(split.captions) for c in range(n)]
    images = torch.stack([split.image(split.txt2img[c]) for c in c_of])
    ids, valid = tokenizer.encode([split.captions[c] for c in c_of])
    return [(images[i:i + batch_size], ids[i:i + batch_size, :N], valid[i:i + batch_size, :N])
            for i in range(0, n, batch_size) for N in [int(valid[i:i + batch_size].sum(1).max())]]


def pair_forward(run, model, madtp, batch):
    """One timed forward of whole pairs; the dense model without hooks, as a user would run it."""
    with run.autocast():
        hooks = madtp.hooks(Trace()) if madtp is not None else None
        return model(*[t.to(run.device) for t in batch], hooks)


@torch.no_grad()
def best_times(run, models, batches, rounds=TIMING_REPEATS, warmup=WARMUP_RUNS):
    """{name: seconds} of a pass over batches for each of models {name: (model, madtp)}: the models
    take turns round after round and each keeps its best round (on a shared machine, the least
    disturbed; turns make every ratio compare like with like), warm-up discarded, device synced."""
    best = {}
    for model, madtp in models.values():
        for b in batches[:warmup]:
            pair_forward(run, model.eval(), madtp, b)
    for _, (name, (model, madtp)) in ((r, m) for r in range(rounds) for m in models.items()):
        run.sync()
        start = time.perf_counter()
        for b in batches:
            pair_forward(run, model, madtp, b)
        run.sync()
        best[name] = min(best.get(name, math.inf), time.perf_counter() - start)
    return best


@torch.no_grad()
def add_speed(cfg, run, rows, models, split, tokenizer):
    """Pairs/s of whole pairs (image, caption, fusion) at batch 1 and bench_batch_size, the models
    {name: (model, madtp)} timed in turns (best_times); speedups over rows["dense"], the ideal one
    (dense GFLOPs / GFLOPs), what padded batches executed per pair (flop_counter / 2), TFLOP/s, MFU."""
    for key, bs in (("pairs_per_s_batch1", 1), ("pairs_per_s_batch", cfg.bench_batch_size)):
        batches = bench_batches(cfg, split, tokenizer, bs)
        best = best_times(run, models, batches)
        for name in models:
            rows[name][key] = sum(len(b[0]) for b in batches) / best[name]
    for name, (model, madtp) in models.items():
        with FlopCounterMode(display=False) as counter:
            for b in batches:
                pair_forward(run, model, madtp, b)
        m, peak = rows[name], peak_flops(run.device)
        pairs = sum(len(b[0]) for b in batches)
        m["gflops_executed_batch"] = counter.get_total_flops() / 2 / 1e9 / pairs
        m["tflops_batch"] = 2 * m["gflops_executed_batch"] * m["pairs_per_s_batch"] / 1e3   # 2 a MAC
        m["mfu_batch"] = m["tflops_batch"] * 1e12 / peak if peak else None
    for m in rows.values():
        m["speedup_batch1"] = m["pairs_per_s_batch1"] / rows["dense"]["pairs_per_s_batch1"]
        m["speedup_batch"] = m["pairs_per_s_batch"] / rows["dense"]["pairs_per_s_batch"]
        m["ideal_speedup"] = rows["dense"]["gflops"] / m["gflops"]


def report(cfg, run, mcfg, tokenizer, splits, dense, compressed, madtp):
    """Evaluate both models on the test split, time them, print the table, write metrics.json."""
    test, rows, models = splits["test"], {}, {}
    pruned = f"{mcfg.method} {cfg.prune_ratio:.0%}"
    for name, model, md in (("dense", dense, None), (pruned, compressed, madtp)):
        run.log(f"stage 3: evaluating {name} on the test split ({test.num_images} images, "
                f"{len(test.captions)} captions)")
        draw = run.out / "tokens.png" if md else None
        rows[name] = evaluate(cfg, run, model, md, test, tokenizer, draw)
        if md is not None:
            rows[name].update(method=mcfg.method, prune_ratio=cfg.prune_ratio, beta=float(md.beta),
                              tau=mcfg.tau)
        models[name] = model, md
    run.log("stage 3: timing both models")
    add_speed(cfg, run, rows, models, test, tokenizer)
    run.log(table(rows, cfg.bench_batch_size, run.device))   # printed first: a failed write loses nothing
    write_json(run.out / "metrics.json", rows)
    run.log("\nwrote " + ", ".join(str(run.out / f) for f in ("metrics.json", "tokens.png", "train.log")))
    return rows


def table(rows, bs, device):
    """The result at a glance: accuracy, compute and speed of each model, then tokens per layer."""
    cols = [("r_mean", "r_mean", 7, ".1f"),
            *((f"{d}@{k}", f"{d}_r{k}", 7, ".1f") for d in ("i2t", "t2i") for k in RECALL_AT),
            ("GFLOPs", "gflops", 9, ".4f"),
            *((n, f"gflops_{e}", 8, ".4f") for n, e in zip(("vis", "txt", "fus"), ENCODERS)),
            ("reduct", "gflops_reduction", 8, ".1%"),
            (f"exec@{bs}", "gflops_executed_batch", 9, ".4f"),
            ("pairs/s@1", "pairs_per_s_batch1", 10, ".0f"), (f"@{bs}", "pairs_per_s_batch", 8, ".0f"),
            ("speedup@1", "speedup_batch1", 10, ".2f"), (f"@{bs}", "speedup_batch", 6, ".2f"),
            ("ideal", "ideal_speedup", 7, ".2f")]
    head = f"{'model':<20}" + "".join(f"{n:>{w}}" for n, _, w, _ in cols) + f"{'of ideal':>9}"
    lines = [head, "-" * len(head)]
    lines += [f"{name:<20}" + "".join(f"{m[k]:>{w}{f}}" for _, k, w, f in cols)
              + f"{m['speedup_batch'] / m['ideal_speedup']:>9.2f}" for name, m in rows.items()]
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else
             f"CPU, {torch.get_num_threads()} threads")
    mfu = "; ".join(f"{name} {m['tflops_batch']:.1f} TFLOP/s, MFU {m['mfu_batch']:.1%}"
                    for name, m in rows.items() if m.get("mfu_batch") is not None)
    lines += [f"GFLOPs: per pair, each sample at its own token counts (MACs, fvcore's convention); "
              f"exec@{bs}: what padded batches of {bs} really executed per pair "
              "(torch.utils.flop_counter / 2)",
              f"pairs/s: {where}, whole pairs (image, caption, fusion), best of {TIMING_REPEATS} "
              f"synchronised rounds after {WARMUP_RUNS} warm-up batches; of ideal = speedup@{bs} / ideal"
              + (f"\nat batch {bs}: {mfu}" if mfu else ""),
              "\ntokens kept after each layer, mean ± std over test samples (CLS and package token "
              "included)"]
    lines += [f"  {name:<20}{e:<8}" + "  ".join(f"{mu:5.1f}±{sd:<4.1f}" for mu, sd in per_layer)
              for name, m in rows.items() for e, per_layer in m["kept_tokens"].items()]
    for name, m in ((n, m) for n, m in rows.items() if "object_share" in m):
        o, c, share = m["object_recall"], m["content_recall"], m["object_share"]
        row = lambda xs, f: " ".join(f"{x:5{f}}" for x in xs)   # noqa: E731
        lines += [f"\n  {name}: what the pruner kept, against the scenes' ground truth (per layer)",
                  f"    kept patches on objects:        {row(share['per_layer'], '.0%')}"
                  f"   (all patches: {share['all_patches']:.0%})",
                  f"    object patches still present:   {row(o['per_layer'], '.2f')}",
                  f"      in the most cluttered 25%:    {row(o['cluttered'], '.2f')}",
                  f"    r(object patches, kept):        {row(o['pearson_r'], '.2f')}",
                  f"    content words present, text:    {row(c['text'], '.2f')}   "
                  f"fusion: {row(c['fusion'], '.2f')}"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the main job

def main(argv=None):
    args = parser().parse_args(argv)
    cfg, vcfg, mcfg = configs(args)
    check(args, cfg, vcfg, mcfg)
    with Run(cfg, resume=args.resume) as run:
        for name, c in (("config", cfg), ("madtp", mcfg)):
            run.log(f"{name}: {json.dumps(asdict(c))}")
        splits = load_splits(cfg, vcfg, run)
        tokenizer = data.Tokenizer.build(splits["train"].captions, vcfg.max_text_len)
        vcfg = replace(vcfg, vocab_size=len(tokenizer))
        run.log(f"model: {json.dumps(asdict(vcfg))}")
        run.log(f"data: {cfg.data}, {len(splits['train'].captions)} training pairs, "
                f"{splits['val'].num_images} validation and {splits['test'].num_images} test images; "
                f"device {run.device}, torch {torch.__version__}")   # a result names the build that made it
        dense = stage_dense(cfg, run, vcfg, splits, tokenizer)
        compressed, madtp = stage_compress(cfg, run, vcfg, mcfg, splits, tokenizer, dense)
        if run.main:
            report(cfg, run, mcfg, tokenizer, splits, dense, compressed, madtp)


def check(args, cfg: TrainConfig, vcfg: VLTConfig, mcfg: MADTPConfig, methods=None):
    """What no config can check alone, and every flag given that this run would ignore, refused
    before any work (each config checks its own values). methods: those the run trains."""
    depth = max(vcfg.vision_layers, vcfg.text_layers, vcfg.fusion_layers)
    synthetic, grid = cfg.data == "synthetic", data.GRID ** 2
    words = 1 + data.synthetic_max_words(min(cfg.scene_objects, grid))
    checks = [
        (mcfg.first_layer >= depth, f"--first-layer {mcfg.first_layer} leaves no layer to prune: the "
                                    f"deepest encoder has {depth} layers, counted from 0"),
        (not (mcfg.prune_vision or mcfg.prune_text or mcfg.prune_fusion),
         "--no-prune-vision, --no-prune-text and --no-prune-fusion together leave nothing to "
         "prune"),
        (not synthetic and not cfg.coco_root, "--data coco needs --coco-root DIR (get a subset with: "
         "python data.py download-coco --root DIR --split val2017 --num-images 5000)"),
        (synthetic and cfg.scene_objects > grid, f"--scene-objects is 1 to {grid} (one object per "
         f"cell of the grid), got {cfg.scene_objects}"),
        (synthetic and vcfg.max_text_len < words, f"captions of up to {cfg.scene_objects} objects run to "
         f"{words - 1} words: --max-text-len must be at least {words} (--preset varied sets it)"),
        (cfg.schedule == "searched" and (mcfg.budget == "global" or mcfg.method == "madtp-official"),
         "--schedule searched shares the cut by layer: the global budget and madtp-official "
         "ignore it"),
    ]
    methods = methods or [mcfg.method]
    counts, scores = {METHODS[m][1] for m in methods}, {METHODS[m][0] for m in methods}
    names = lambda rule: ", ".join(m for m in METHODS if rule(METHODS[m][1]))   # noqa: E731
    per_sample = f"the methods with per-sample counts ({names(lambda c: c == 'theta')})"
    from_theta = f"the methods whose counts come from θ ({names(lambda c: c != 'share')})"
    used = {**dict.fromkeys(["scene_objects", "num_train", "num_val", "num_test",
                             "captions_per_image"], (synthetic, "--data synthetic")),
            **dict.fromkeys(["coco_root", "coco_ann", "coco_num_images", "coco_val_fraction",
                             "coco_test_fraction"], (not synthetic, "--data coco")),
            **dict.fromkeys(["tau", *(f"dynamic_{e}" for e in ENCODERS)],
                            (counts != {"share"}, from_theta)),
            "budget": ("theta" in counts, per_sample),
            "count_range": ("theta" in counts and mcfg.budget == "layer",
                            per_sample + " under --budget layer"),
            "alpha": ("S" in scores, "the methods that train MAG's concepts (madtp, madtp-static, "
                                     "madtp-official)"),
            "num_align_tokens": (scores != {"S_cls"} or "theta" in counts, "every method but cls-static")}
    checks += [(getattr(args, k, None) is not None and not on,
                f"--{flag(k)} does nothing in this run; it is for {who}")
               for k, (on, who) in used.items()]
    for wrong, msg in checks:
        if wrong:
            fail(msg)


# ---------------------------------------------------------------------------------------------
# the process, used from the training loop on: device, log, one run per --out, signals, files

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
        self.handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def on_signal(self, signum, frame):
        if not self.deferring or self.stop is not None:
            raise Interrupted(signum)
        self.stop = signum

    def stopping(self):
        """Whether to stop before the next step; with several processes, all stop at the same."""
        if not self.distributed:
            return self.stop is not None
        flag = torch.tensor(float(self.stop is not None), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        """Release the lock and the handlers however the run ends; a signal outside a training step
        (which saves by itself) becomes one line and exit 128 + its number."""
        self.close()
        if isinstance(error, Interrupted):
            signum = error.args[0]
            self.fail(f"{signal.Signals(signum).name}: stopped; what was finished in {self.out} is "
                      "kept, and the same command continues it (with --resume for an unfinished "
                      "training stage)", code=128 + signum)

    def close(self):
        for s, handler in self.handlers.items():
            signal.signal(s, handler)
        if self.lock is not None:
            self.lock.close()
        if self.distributed:
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

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def release_memory():
    """Hand the C heap's free pages back to the OS: the tensors under the mmap threshold still leave
    holes in it (docs/speed.md, Memory). Not glibc (macOS, musl): nothing to do."""
    if hasattr(LIBC, "malloc_trim"):
        LIBC.malloc_trim(0)


def peak_rss():
    """The process's peak resident memory in GB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def pick_device(flag, local_rank=0):
    if flag == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was requested but CUDA is not available on this machine "
             f"(torch {torch.__version__}); run with --device cpu or --device auto")
    if flag == "cuda" or (flag == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


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
        fail(f"another run (pid {f.read().strip() or '?'}) is using --out {out}; wait for it or use "
             "another --out")
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
    write_atomic(path, lambda tmp: torch.save(ckpt, tmp))


def write_json(path, obj):
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def load_checkpoint(path):
    """A checkpoint of this version with finite weights; anything else refused with the reason."""
    if not Path(path).is_file():
        fail(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, not torch's unpickling trace
        fail(f"{path} is not a readable checkpoint of this project "
             f"({type(e).__name__}: {str(e)[:200]})")
    version = ckpt.get("version") if isinstance(ckpt, dict) else None
    if version != CHECKPOINT_VERSION:
        fail(f"{path} is not a checkpoint of this version of train.py (it has version {version}, "
             f"this train.py reads {CHECKPOINT_VERSION}); train it again, or use the train.py that "
             "wrote it")
    for part in ("model", "madtp"):
        for name, t in ckpt.get(part, {}).items():   # bars are -inf until fitted: fine there
            if t.is_floating_point() and (t.isnan().any() or (name != "bars" and t.isinf().any())):
                fail(f"{path}: {part} tensor {name} holds non-finite values (the run diverged before "
                     "it was saved); train it again with a lower learning rate")
    return ckpt


def prepare_stage(run, path, identity, what):
    """A stage's checkpoint if there is one: (checkpoint or None, done?). One from another
    configuration is refused, and an unfinished one too unless --resume says to continue it."""
    if not path.exists():
        return None, False
    ckpt = load_checkpoint(path)
    diff = "; ".join(f"{k}: {ckpt['identity'].get(k)!r} in the checkpoint, {identity.get(k)!r} now"
                     for k in sorted(set(ckpt["identity"]) | set(identity))
                     if ckpt["identity"].get(k) != identity.get(k))
    if diff:
        fail(f"{path} holds a {what} from another configuration ({diff}); use another --out or "
             "delete it")
    if not ckpt["done"] and not run.resume:
        fail(f"{path} holds an unfinished {what} (step {ckpt['step']}); continue it with --resume, "
             f"or delete the file to start over")
    return ckpt, ckpt["done"]


if __name__ == "__main__":
    main()
