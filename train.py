"""Train a small VLT, compress it with MADTP, evaluate both and show the result.

    python train.py --device cuda                      # the whole story on synthetic scenes (gpu preset)
    python train.py --compare 0.5,0.7,0.8 --seeds 0,1,2 # every method at every reduction
    torchrun --nproc_per_node=2 train.py               # the same, DistributedDataParallel

Cao et al., "MADTP: Multimodal Alignment-Guided Dynamic Token Pruning for Accelerating
Vision-Language Transformer", CVPR 2024, arXiv 2403.02991 (official code github.com/double125/MADTP).
This file follows ../shared/SPEC.md sections 4 (compression fine-tuning and the budget), 5
(GFLOPs), 6 (evaluation) and 7 (baselines): (1) train the dense VLT on L_task, (2) fine-tune it
with L_task + α L_align while pruning, a ramped GFLOPs target and a controller on β, then calibrate
β on the validation split, (3) evaluate dense and compressed models on the test split: recalls,
GFLOPs per pair, tokens kept, pairs/s, and tokens.png.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import data
from madtp import (BUDGETS, ENCODERS, METHODS, MADTP, MADTPConfig, RULES, Trace, alignment_loss, dense_gflops,
                   dense_hooks, gflops)
from vlt import VLT, VLTConfig, task_loss

BETA_MIN, BETA_MAX = 1e-3, 1e3   # the range the controller and the calibration search move β in
BETA_INIT = 0.5                  # where stage 2 starts β: threshold methods still keep nearly everything
CALIBRATION_STEPS = 14           # bisection steps on log β; the range shrinks 2^14-fold
CALIBRATION_SPAN = 8.0           # the search looks for β within this factor of where training left it
WARMUP_RUNS = 3                  # timed forward passes thrown away before measuring pairs/s
TIMING_REPEATS = 3               # pairs/s is the best of this many timed passes (the least disturbed)
CHECKPOINT_VERSION = 2          # 2: MADTP's budget rule and its per-layer bars β_ℓ
TARGET_TOLERANCE = 0.02         # the calibrated reduction must land this close to the target (SPEC section 4)

# Sizes per preset. "tiny" runs the whole pipeline in well under a minute on a laptop CPU (tests);
# "default" is the synthetic-scene run the README reports (the CPU's preset); "gpu" is what
# --device cuda runs when no preset is given: the same scenes at 128 px with 8-px patches (257
# vision tokens) and a model wide and deep enough that a GPU multiplies matrices instead of waiting
# for kernel launches; "coco" suits real photos.
PRESETS = {
    "tiny": dict(model=dict(image_size=32, patch_size=8, dim=64, heads=2, vision_layers=2, text_layers=1,
                            fusion_layers=1, embed_dim=32),
                 num_train=400, num_val=100, num_test=100, dense_steps=300, prune_steps=80,
                 batch_size=32, eval_batch_size=64, num_align_tokens=16, itm_k=8, bench_pairs=32),
    "default": dict(model=dict(), num_train=4000, num_val=400, num_test=500, dense_steps=1000,
                    prune_steps=300, batch_size=64, eval_batch_size=64, num_align_tokens=32, itm_k=16,
                    bench_pairs=128),
    "gpu": dict(model=dict(image_size=128, patch_size=8, dim=384, heads=6, vision_layers=8, text_layers=4,
                           fusion_layers=4, embed_dim=256),
                num_train=4000, num_val=400, num_test=500, dense_steps=1500, prune_steps=500, batch_size=128,
                eval_batch_size=256, bench_batch_size=256, num_align_tokens=64, itm_k=16, bench_pairs=256),
    "coco": dict(model=dict(image_size=128, patch_size=16, dim=192, heads=3, vision_layers=6, text_layers=3,
                            fusion_layers=2, embed_dim=128, max_text_len=32),
                 num_train=0, num_val=0, num_test=0, dense_steps=3000, prune_steps=1000, batch_size=64,
                 eval_batch_size=64, num_align_tokens=64, itm_k=16, bench_pairs=128),
}


@dataclass
class TrainConfig:
    preset: str = "default"       # tiny | default | gpu | coco: sizes below come from PRESETS unless set
    data: str = "synthetic"       # synthetic scenes (no download) or coco
    coco_root: str = ""           # folder with the COCO images (and annotations/)
    coco_ann: str = ""            # comma-separated caption json files (official or Karpathy); "" = look in coco_root
    coco_num_images: int = 0      # use the first N images of the pooled annotations (0 = all)
    method: str = "madtp"         # madtp | dtp-no-mag | cls-static | random (SPEC section 7)
    prune: str = "vision,text,fusion"  # which encoders prune (the fusion encoder's text tokens)
    prune_ratio: float = 0.5      # p, the GFLOPs reduction to compress to
    budget: str = "layer"         # how β's cut is shared: a fitted bar per layer | per encoder | global (madtp.py)
    rule: str = "ratio"           # keep S > β_ℓ θ (ratio, SPEC) or n (S - θ) > β_ℓ (margin)
    first_layer: int = 0          # first pruned layer of every encoder
    out: str = "runs/default"     # checkpoints, metrics.json, train.log, tokens.png
    seed: int = 0                 # model initialisation and batch order; the data never changes with it
    device: str = "auto"          # auto picks CUDA when available
    batch_size: int = 64          # per process
    eval_batch_size: int = 64     # evaluation; results do not depend on it
    num_train: int = 4000         # synthetic images per split (coco: fractions below)
    num_val: int = 400
    num_test: int = 500
    captions_per_image: int = 2   # synthetic: distinct captions per image
    coco_val_fraction: float = 0.15   # share of COCO images held out for validation
    coco_test_fraction: float = 0.15  # ... and for the test split
    dense_steps: int = 1000       # optimiser steps of stage 1
    prune_steps: int = 300        # optimiser steps of stage 2 (every method gets the same)
    ramp: float = 0.4             # share of stage 2 over which the GFLOPs target rises from 0 to p
    lr: float = 5e-4              # AdamW peak learning rate, stage 1
    prune_lr: float = 5e-4        # AdamW peak learning rate, stage 2: as stage 1 (1e-4 recovered 4-5 points less)
    weight_decay: float = 0.05    # AdamW, as BLIP
    warmup: float = 0.05          # share of each stage with a linear learning-rate warm-up
    grad_clip: float = 1.0        # max gradient norm
    beta_gain: float = 0.5        # controller: log β += beta_gain * (target - realised reduction); the
                                  # reduction is steep in log β near the target, larger gains oscillate
    num_align_tokens: int = 32    # M
    tau: float = 0.1              # τ: small, so that θ sits at the background level of every sample (README)
    alpha: float = 0.1            # α
    itm_k: int = 16               # ITM re-ranks the top-k ITC candidates (BLIP's protocol)
    bench_batch_size: int = 64    # the large batch timed besides batch 1 (throughput)
    bench_pairs: int = 128        # pairs timed at batch 1 (at the large batch: at least 4 batches)
    save_every: int = 200         # steps between checkpoints (and on Ctrl-C)
    num_workers: int = 0          # DataLoader workers; synthetic images are pre-rendered, so 0 is fastest
    num_drawn: int = 4            # test scenes drawn in tokens.png: half the sparsest, half the most cluttered


# ---------------------------------------------------------------------------------------------
# small utilities: processes, logging, checkpoints

class Run:
    """Where this process stands: device, rank, and the log every rank-0 line goes to."""

    def __init__(self, device_flag, out):
        self.distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.device = pick_device(device_flag, int(os.environ.get("LOCAL_RANK", 0)))
        if self.distributed:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.main = self.rank == 0
        self.out = Path(out)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)

    def log(self, msg=""):
        if self.main:
            tqdm.write(msg)
            with open(self.out / "train.log", "a") as f:
                f.write(msg + "\n")

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def fail(msg):
    """Stop with one clear line instead of a traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def pick_device(flag, local_rank=0):
    if flag == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was requested but CUDA is not available on this machine "
             f"(torch {torch.__version__}); run with --device cpu or --device auto")
    if flag == "cuda" or (flag == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, for the MFU the timings print;
# a GPU not listed gets no MFU rather than a guessed one.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
                   "L40S": 362e12, "L4": 121e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in PEAK_BF16_FLOPS.items() if key in name), None)


def utilisation(run, flops_per_s):
    """Model FLOP/s (torch.utils.flop_counter's count), and the MFU where the device's peak is known."""
    peak = peak_flops(run.device)
    return f"{flops_per_s / 1e12:.2f} TFLOP/s" + (f", MFU {flops_per_s / peak:.1%}" if peak else "")


def save_checkpoint(path, ckpt):
    """Write to a temporary file and rename: a crash mid-write never leaves a broken checkpoint."""
    tmp = Path(str(path) + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def write_json(path, obj):
    """Atomically, like the checkpoints: comparison processes may read what another one writes."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def load_checkpoint(path):
    if not Path(path).is_file():
        fail(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, not torch's unpickling trace
        fail(f"{path} is not a readable checkpoint of this project ({type(e).__name__}: {str(e)[:200]})")
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        version = ckpt.get("version") if isinstance(ckpt, dict) else None
        fail(f"{path} is not a checkpoint of this version of train.py (it has version {version}, this train.py "
             f"reads {CHECKPOINT_VERSION}); train it again, or use the train.py that wrote it")
    return ckpt


def differences(saved: dict, current: dict):
    """'dim: 96 in the checkpoint, 128 now; ...' for every key whose values differ."""
    return "; ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now"
                     for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k))


# ---------------------------------------------------------------------------------------------
# data

def load_splits(cfg: TrainConfig, vcfg: VLTConfig):
    if cfg.data == "synthetic":
        return data.synthetic_splits(cfg.num_train, cfg.num_val, cfg.num_test, cfg.captions_per_image,
                                     vcfg.image_size, vcfg.patch_size, seed=0)
    if not cfg.coco_root:
        fail("--data coco needs --coco-root DIR (get a subset with: python data.py download-coco --root DIR "
             "--split val2017 --num-images 5000)")
    anns = [a for a in cfg.coco_ann.split(",") if a]
    try:
        return data.coco_splits(cfg.coco_root, anns, vcfg.image_size, num_images=cfg.coco_num_images or None,
                                val_fraction=cfg.coco_val_fraction, test_fraction=cfg.coco_test_fraction, seed=0)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))


class Collate:
    """A list of samples -> one batch; captions become token ids here, in the loader's worker."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, samples):
        ids, valid = self.tokenizer.encode([s["caption"] for s in samples])
        return dict(images=torch.stack([s["image"] for s in samples]), ids=ids, valid=valid,
                    image_ids=torch.tensor([s["image_id"] for s in samples]))


def train_batches(cfg, run, dataset, tokenizer, step):
    """Endless batches from `step` on, the same ones whether or not the run was interrupted:
    DistributedSampler shards and shuffles each epoch by (seed, epoch); resuming skips what was done."""
    sampler = DistributedSampler(dataset, num_replicas=run.world, rank=run.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    per_epoch = len(sampler) // cfg.batch_size
    if per_epoch == 0:
        fail(f"the training split has {len(dataset)} pairs, fewer than one batch of {cfg.batch_size} per process; "
             "lower --batch-size or use more data")
    epoch, skip = divmod(step, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        idx = list(sampler)
        batches = [idx[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(skip, per_epoch)]
        # its own generator: a DataLoader otherwise draws a seed from the global RNG, and a resumed
        # run, which builds its loader mid-epoch, would draw different hard negatives from then on
        yield from DataLoader(dataset, batch_sampler=batches, collate_fn=Collate(tokenizer),
                              num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
        epoch, skip = epoch + 1, 0


# ---------------------------------------------------------------------------------------------
# training (SPEC section 4)

class Objective(nn.Module):
    """L = L_task + α L_align as one module, so that DistributedDataParallel sees every parameter."""

    def __init__(self, model: VLT, madtp: MADTP = None):
        super().__init__()
        self.model, self.madtp = model, madtp

    def forward(self, images, ids, valid, image_ids):
        align = self.madtp is not None and self.madtp.cfg.method == "madtp"
        trace = Trace(features=align)
        hooks = self.madtp.hooks(trace) if self.madtp is not None else dense_hooks(trace)
        loss, info = task_loss(self.model, images, ids, valid, image_ids, hooks)
        parts = dict(task=loss.detach())
        if align:
            L_align = alignment_loss(trace.F["vision"], trace.F["text"])
            loss = loss + self.madtp.cfg.alpha * L_align
            parts["align"] = L_align.detach()
        return loss, parts, trace, info["image_of_pair"]


def realised_reduction(vcfg, trace, image_of_pair, text_tokens):
    """1 - GFLOPs / dense GFLOPs of a training batch's true pairs (the first B fusion passes)."""
    B = len(text_tokens)
    g = gflops(vcfg, trace, image_tokens=trace.layers["vision"][-1]["n_out"][image_of_pair])
    d = dense_gflops(vcfg, text_tokens)
    pruned = g["vision"].sum() + g["text"].sum() + g["fusion"][:B].sum()
    return 1 - pruned / sum(v.sum() for v in d.values())


def lr_at(step, steps, peak, warmup):
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    w = max(1, int(warmup * steps))
    if step < w:
        return peak * (step + 1) / w
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w))))


def train_stage(cfg, run, name, objective, steps, peak_lr, splits, tokenizer, ckpt_base, path, target=None):
    """The loop both stages share: AdamW, tqdm, atomic checkpoints every save_every steps and on
    Ctrl-C, a stop on a non-finite loss that keeps the last good checkpoint, and (stage 2) the
    controller that moves β after every step toward the ramped GFLOPs target."""
    model, madtp = objective.model, objective.madtp
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=cfg.weight_decay)
    step = 0
    if "optimizer" in ckpt_base:  # resuming: the same state, batches and random draws as if never stopped
        opt.load_state_dict(ckpt_base["optimizer"])
        step = ckpt_base["step"]
        torch.set_rng_state(ckpt_base["rng"])
        if run.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt_base["cuda_rng"], run.device)
    wrapped = nn.parallel.DistributedDataParallel(objective) if run.distributed else objective

    def save(done):
        ckpt = dict(ckpt_base, model=model.state_dict(), step=step, done=done, optimizer=opt.state_dict(),
                    rng=torch.get_rng_state())
        if run.device.type == "cuda":
            ckpt["cuda_rng"] = torch.cuda.get_rng_state(run.device)
        if madtp is not None:
            ckpt.update(madtp=madtp.state_dict(), beta=float(madtp.beta))
        if run.main:
            save_checkpoint(path, ckpt)

    dataset = data.PairDataset(splits["train"], train=True)
    bar = tqdm(total=steps, initial=step, desc=name, disable=not run.main, dynamic_ncols=True)
    batches = train_batches(cfg, run, dataset, tokenizer, step)
    objective.train()
    step_flops, timed_from = None, None   # model FLOPs of one step (counted on the first), (step, time) timing starts
    try:
        while step < steps:
            batch = next(batches)
            model.check_inputs(batch["images"], batch["ids"], batch["valid"])   # on the CPU: no sync
            batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, peak_lr, cfg.warmup)
            with FlopCounterMode(display=False) if step_flops is None else contextlib.nullcontext() as counter:
                with run.autocast():
                    loss, parts, trace, image_of_pair = wrapped(**batch)
                if not torch.isfinite(loss):  # stop before the update: the last checkpoint stays good
                    kept = f"the last good checkpoint is {path}" if path.exists() else "no checkpoint was written yet"
                    bar.close()
                    run.log(f"{name}: the loss became {loss.item()} at step {step}; stopping ({kept}). "
                            f"Try a lower learning rate.")
                    sys.exit(3)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            if counter is not None:   # the first step, counted (and slowed) by the FLOP counter: not timed
                step_flops = counter.get_total_flops() * run.world
                run.sync()
                timed_from = (step, time.perf_counter())
            post = {k: f"{v.item():.3f}" for k, v in parts.items()}
            if target is not None:
                goal = target * min(1.0, step / max(1, cfg.ramp * steps))
                r = realised_reduction(model.cfg, trace, image_of_pair, batch["valid"].sum(1)).to(run.device)
                if run.distributed:  # every process moves β the same way
                    dist.all_reduce(r)
                    r = r / run.world
                log_beta = madtp.beta.clamp_min(BETA_MIN).log() + cfg.beta_gain * (goal - r)
                madtp.beta.copy_(log_beta.exp().clamp(BETA_MIN, BETA_MAX))
                post.update(red=f"{r.item():.3f}", goal=f"{goal:.2f}", beta=f"{madtp.beta.item():.3f}")
            bar.set_postfix(post)
            bar.update()
            if step % cfg.save_every == 0 and step < steps:
                save(done=False)
    except KeyboardInterrupt:
        bar.close()
        save(done=False)
        run.log(f"\ninterrupted at step {step} of {name}; saved {path}. Continue with the same command and --resume.")
        sys.exit(130)
    bar.close()
    if timed_from is not None and step > timed_from[0]:
        run.sync()
        rate = (step - timed_from[0]) / (time.perf_counter() - timed_from[1])
        run.log(f"{name}: {rate:.2f} steps/s, {utilisation(run, step_flops * rate)} (wall clock, checkpoints included)")
    save(done=True)
    return objective


def dense_identity(cfg, vcfg, tokenizer):
    """What makes two dense checkpoints the same model: a reused one must match all of it."""
    keys = ["data", "coco_root", "coco_ann", "coco_num_images", "seed", "batch_size", "num_train", "num_val",
            "num_test", "captions_per_image", "dense_steps", "lr", "weight_decay", "warmup"]
    return dict({k: getattr(cfg, k) for k in keys}, **asdict(vcfg), vocabulary_size=len(tokenizer),
                vocabulary_hash=hash_words(tokenizer.state_dict()["vocab"]))


def hash_words(words):
    return hashlib.sha256("\n".join(words).encode()).hexdigest()[:16]


def prepare_stage(cfg, run, path, identity, what):
    """Load a stage's checkpoint if there is one: (checkpoint or None, done?). Refuse one from
    another configuration, and an unfinished one unless --resume says to continue it."""
    if not path.exists():
        return None, False
    ckpt = load_checkpoint(path)
    diff = differences(ckpt["identity"], identity)
    if diff:
        fail(f"{path} holds a {what} from another configuration ({diff}); use another --out or delete the file")
    if not ckpt["done"] and not run.resume:
        fail(f"{path} holds an unfinished {what} (step {ckpt['step']}); continue it with --resume, "
             f"or delete the file to start over")
    return ckpt, ckpt["done"]


def stage_dense(cfg, run, vcfg, splits, tokenizer):
    """Stage 1: train the dense VLT on L_task, or reuse a finished matching checkpoint."""
    path = run.out / "dense.pt"
    identity = dense_identity(cfg, vcfg, tokenizer)
    ckpt, done = prepare_stage(cfg, run, path, identity, "dense model")
    torch.manual_seed(cfg.seed)
    model = VLT(vcfg).to(run.device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    if done:
        run.log(f"stage 1: {path} matches this configuration; skipping dense training")
        return model
    base = ckpt or dict(version=CHECKPOINT_VERSION, kind="dense", identity=identity, vlt_config=asdict(vcfg),
                        train_config=asdict(cfg), tokenizer=tokenizer.state_dict())
    run.log(f"stage 1: training the dense VLT for {cfg.dense_steps} steps -> {path}")
    train_stage(cfg, run, "dense", Objective(model), cfg.dense_steps, cfg.lr, splits, tokenizer, base, path)
    return model


def stage_compress(cfg, run, vcfg, splits, tokenizer, dense_model, stem=None):
    """Stage 2: fine-tune a copy of the dense model with pruning to the target, then calibrate β on
    the validation split (SPEC section 4). The checkpoint is <stem or method>-<p>.pt in run.out."""
    encoders = set(cfg.prune.split(","))
    if not encoders <= set(ENCODERS):
        fail(f"--prune takes encoders from {','.join(ENCODERS)}, got {cfg.prune!r}")
    try:
        mcfg = MADTPConfig(method=cfg.method, num_align_tokens=cfg.num_align_tokens, tau=cfg.tau, alpha=cfg.alpha,
                           budget=cfg.budget, rule=cfg.rule, first_layer=cfg.first_layer,
                           **{f"prune_{e}": e in encoders for e in ENCODERS})
    except ValueError as e:
        fail(str(e))
    path = run.out / f"{stem or cfg.method}-{cfg.prune_ratio:.2f}.pt"
    identity = dict(dense_identity(cfg, vcfg, tokenizer), method=cfg.method, prune_ratio=cfg.prune_ratio,
                    prune_steps=cfg.prune_steps, prune_lr=cfg.prune_lr, ramp=cfg.ramp, beta_gain=cfg.beta_gain,
                    **{f"madtp_{k}": v for k, v in asdict(mcfg).items()})
    ckpt, done = prepare_stage(cfg, run, path, identity, "compressed model")
    model = VLT(vcfg).to(run.device)
    model.load_state_dict((ckpt or {}).get("model", dense_model.state_dict()))
    torch.manual_seed(cfg.seed)
    madtp = new_madtp(mcfg, vcfg).to(run.device)
    # only MADTP trains T: the other methods use it for counts or thresholds, never with a gradient
    madtp.T.requires_grad_(cfg.method == "madtp")
    madtp.beta.fill_(BETA_INIT)
    if ckpt is not None:
        madtp.load_state_dict(ckpt["madtp"])
    if done and ckpt.get("calibrated"):
        run.log(f"stage 2: {path} matches this configuration; skipping fine-tuning (β = {float(madtp.beta):.4f})")
        return model, madtp
    if not done:
        base = ckpt or dict(version=CHECKPOINT_VERSION, kind="compressed", identity=identity, vlt_config=asdict(vcfg),
                            madtp_config=asdict(mcfg), train_config=asdict(cfg), tokenizer=tokenizer.state_dict(),
                            tau=cfg.tau, target_reduction=cfg.prune_ratio)
        run.log(f"stage 2: fine-tuning with {cfg.method} to a {cfg.prune_ratio:.0%} GFLOPs reduction "
                f"for {cfg.prune_steps} steps -> {path}")
        train_stage(cfg, run, cfg.method, Objective(model, madtp), cfg.prune_steps, cfg.prune_lr, splits, tokenizer,
                    base, path, target=cfg.prune_ratio)
    beta, reduction = calibrate(cfg, run, model, madtp, splits["val"], tokenizer)
    madtp.beta.fill_(beta)
    run.log(f"stage 2: β calibrated on the validation split: β = {beta:.4f}, reduction {reduction:.3f}")
    if abs(reduction - cfg.prune_ratio) > TARGET_TOLERANCE:
        why = f" (--first-layer {cfg.first_layer} keeps whole layers unpruned)" if cfg.first_layer else ""
        run.log(f"warning: the calibrated reduction {reduction:.3f} misses the target {cfg.prune_ratio:.2f}; "
                f"this configuration may not reach it{why}")
    if run.main:
        ckpt = load_checkpoint(path)
        ckpt.update(madtp=madtp.state_dict(), beta=beta, validation_reduction=reduction, calibrated=True)
        save_checkpoint(path, ckpt)
    return model, madtp


def depths(vcfg):
    """(L_v, L_t, L_f): MADTP sizes its table of bars β_ℓ and its layer schedules by them."""
    return vcfg.vision_layers, vcfg.text_layers, vcfg.fusion_layers


def new_madtp(mcfg, vcfg):
    """A MADTP for a VLT of this config: its width, its depths and its longest sequence."""
    return MADTP(mcfg, vcfg.dim, depths(vcfg), max(1 + vcfg.num_patches, vcfg.max_text_len))


def fit_bars(cfg, run, model, madtp, split, tokenizer):
    """Set the bars β_ℓ of a fitted budget for the current β: one pass over the whole split as one
    batch in training mode, so that each layer keeps the share ρ of the split's tokens. Then frozen."""
    if madtp.cfg.budget == "global":
        return
    fit = Encoder(replace(cfg, eval_batch_size=len(split.captions)), run, model, madtp, tokenizer)
    madtp.train()
    fit.pair_stats(split)
    madtp.eval()


def calibrate(cfg, run, model, madtp, split, tokenizer):
    """Freeze β for evaluation: bisect log β so that the validation split's mean GFLOPs per pair
    is (1 - p) of dense. Token counts fall as β grows, so the search is well posed. With a fitted
    budget, each step first fits the bars β_ℓ on the whole split as one batch (training mode),
    then measures with them frozen; the best step's bars are kept."""
    enc = Encoder(cfg, run, model, madtp, tokenizer)
    trained = math.log(float(madtp.beta))
    lo = max(math.log(BETA_MIN), trained - math.log(CALIBRATION_SPAN))
    hi = min(math.log(BETA_MAX), trained + math.log(CALIBRATION_SPAN))
    best = (math.inf, None, None, None)
    for _ in tqdm(range(CALIBRATION_STEPS), desc="calibrate β", disable=not run.main, leave=False):
        mid = (lo + hi) / 2
        madtp.beta.fill_(math.exp(mid))
        fit_bars(cfg, run, model, madtp, split, tokenizer)
        r = enc.pair_stats(split)["gflops_reduction"]
        best = min(best, (abs(r - cfg.prune_ratio), math.exp(mid), r, madtp.bars.clone()), key=lambda t: t[0])
        lo, hi = (mid, hi) if r < cfg.prune_ratio else (lo, mid)
    madtp.bars.copy_(best[3])
    return best[1], best[2]


# ---------------------------------------------------------------------------------------------
# evaluation (SPEC sections 5 and 6)

class Encoder:
    """Runs a model (dense when madtp is None) over a split one batch at a time and keeps each
    sample's own valid tokens, so that re-batching (for fusion) cannot change any result."""

    def __init__(self, cfg, run, model, madtp, tokenizer):
        self.cfg, self.run, self.model, self.madtp, self.tokenizer = cfg, run, model.eval(), madtp, tokenizer
        if madtp is not None:   # frozen bars β_ℓ; calibrate() switches to fitting on purpose
            madtp.eval()

    def hooks(self, trace):
        return self.madtp.hooks(trace) if self.madtp is not None else dense_hooks(trace)

    @torch.no_grad()
    def images(self, split, positions=False):
        out = empty_outputs()
        loader = DataLoader(data.ImageDataset(split), batch_size=self.cfg.eval_batch_size,
                            num_workers=self.cfg.num_workers)
        for batch in loader:
            trace = Trace(positions=positions)
            with self.run.autocast():
                x, valid = self.model.encode_image(batch["image"].to(self.run.device), self.hooks(trace)["vision"])
                emb = self.model.embed_image(x)
            collect(out, "vision", x, valid, emb, trace, self.model.cfg)
        return finish(out)

    @torch.no_grad()
    def texts(self, captions, positions=False):
        out = empty_outputs()
        for i in range(0, len(captions), self.cfg.eval_batch_size):
            ids, valid = self.tokenizer.encode(captions[i:i + self.cfg.eval_batch_size])
            trace = Trace(positions=positions)
            with self.run.autocast():
                x, valid = self.model.encode_text(ids.to(self.run.device), valid.to(self.run.device),
                                                  self.hooks(trace)["text"])
                emb = self.model.embed_text(x)
            collect(out, "text", x, valid, emb, trace, self.model.cfg)
        return finish(out)

    @torch.no_grad()
    def fuse(self, text_tokens, image_tokens, pairs, slots=None):
        """ITM logit (positive minus negative) and fusion GFLOPs for (caption c, image i) pairs;
        with slots (the texts' "slots"), also which words each fusion layer kept."""
        out = dict(score=[], gflops=[], kept=[], positions=[])
        for i in range(0, len(pairs), self.cfg.eval_batch_size):
            chunk = pairs[i:i + self.cfg.eval_batch_size]
            t, t_valid = pad([text_tokens[c] for c, _ in chunk])
            v, v_valid = pad([image_tokens[j] for _, j in chunk])
            trace = Trace()
            if slots is not None:
                start = torch.full(t_valid.shape, -1, dtype=torch.long, device=self.run.device)    # (B, N)
                for b, (c, _) in enumerate(chunk):
                    start[b, : len(slots[c])] = slots[c]
                trace = Trace(positions=True, start=dict(fusion=start))
            with self.run.autocast():
                itm = self.model.fuse(t.to(self.run.device), t_valid.to(self.run.device), v.to(self.run.device),
                                      v_valid.to(self.run.device), self.hooks(trace)["fusion"]).float()
            out["score"].append(itm[:, 1] - itm[:, 0])
            out["gflops"].append(gflops(self.model.cfg, trace, image_tokens=v_valid.sum(1).to(self.run.device))["fusion"])
            out["kept"].append(torch.stack([r["n_out"] for r in trace.layers["fusion"]], 1))   # (B, L_f)
            if slots is not None:
                out["positions"] += [[r["kept"][b] for r in trace.layers["fusion"]] for b in range(len(t))]
        return dict(out, score=torch.cat(out["score"]), gflops=torch.cat(out["gflops"]), kept=torch.cat(out["kept"]))

    def pair_stats(self, split):
        """Mean GFLOPs per true pair and the reduction from dense, as the calibration needs them."""
        imgs, txts = self.images(split), self.texts(split.captions)
        pairs = list(enumerate(split.txt2img))
        fus = self.fuse(txts["tokens"], imgs["tokens"], pairs)
        return pair_gflops(self.model.cfg, split, self.tokenizer, imgs, txts, fus)


def empty_outputs():
    return dict(tokens=[], emb=[], gflops=[], kept=[], positions=[], slots=[])


def collect(out, encoder, x, valid, emb, trace, vcfg):
    """Keep what one encoded batch says about each of its samples: its own valid tokens (B x (n_b, D)),
    its ITC embedding, its GFLOPs, its token count after every layer and, if traced, which original
    tokens each layer kept and which one each stored token started as."""
    out["tokens"] += [t[v].float() for t, v in zip(x, valid)]
    out["emb"].append(emb.float())
    out["gflops"].append(gflops(vcfg, trace)[encoder])
    out["kept"].append(torch.stack([r["n_out"] for r in trace.layers[encoder]], 1))        # (B, L)
    if trace.positions:
        out["positions"] += [[r["kept"][b] for r in trace.layers[encoder]] for b in range(len(x))]
        # for text: the word each stored token started as, so that fusion's choices map back to words
        out["slots"] += [trace.layers[encoder][-1]["kept"][b][valid[b]] for b in range(len(x))]


def finish(out):
    return dict(out, emb=torch.cat(out["emb"]), gflops=torch.cat(out["gflops"]), kept=torch.cat(out["kept"]))


def pad(tokens):
    """A list of (n_b, D) token sets -> (B, N, D) zero-padded, valid (B, N)."""
    N = max(len(t) for t in tokens)
    x = torch.zeros(len(tokens), N, tokens[0].shape[-1], device=tokens[0].device)
    valid = torch.zeros(len(tokens), N, dtype=torch.bool)
    for b, t in enumerate(tokens):
        x[b, : len(t)] = t
        valid[b, : len(t)] = True
    return x, valid


def pair_gflops(vcfg, split, tokenizer, imgs, txts, fus):
    """SPEC section 5: a pair costs its image through the vision encoder, its caption through the
    text encoder and one fusion pass; averaged over the split's true pairs."""
    img_of = torch.tensor(split.txt2img)
    parts = dict(vision=imgs["gflops"].cpu()[img_of], text=txts["gflops"].cpu(), fusion=fus["gflops"].cpu())
    text_tokens = tokenizer.encode(split.captions)[1].sum(1)
    dense = dense_gflops(vcfg, text_tokens)
    total, dense_total = sum(parts.values()), sum(dense.values())
    return dict(gflops=total.mean().item(), gflops_dense=dense_total.mean().item(),
                gflops_reduction=1 - total.mean().item() / dense_total.mean().item(),
                **{f"gflops_{e}": parts[e].mean().item() for e in ENCODERS})


def rerank(sim, top, itm):
    """BLIP's scores: ITM logit + ITC similarity for each query's top-k candidates, -1e4 elsewhere.
    sim (Q, C) similarities, top (Q, k) candidate indices, itm (Q * k,) their ITM logits."""
    scores = torch.full_like(sim, -1e4)                                               # (Q, C)
    rows = torch.arange(len(top))[:, None].expand(-1, top.shape[1])                  # (Q, k)
    scores[rows, top] = itm.view(top.shape) + sim[rows, top]
    return scores


def recalls(scores_i2t, scores_t2i, split):
    """BLIP's itm_eval: Recall@1/5/10 for image->text (I, T) and text->image (T, I), and r_mean."""
    ranks_i = []
    for i, row in enumerate(scores_i2t):
        order = row.argsort(descending=True)
        ranks_i.append(min((order == c).nonzero()[0, 0].item() for c in split.img2txt[i]))
    ranks_t = []
    for c, col in enumerate(scores_t2i):
        order = col.argsort(descending=True)
        ranks_t.append((order == split.txt2img[c]).nonzero()[0, 0].item())
    ranks_i, ranks_t = torch.tensor(ranks_i), torch.tensor(ranks_t)
    r = {f"i2t_r{k}": 100 * (ranks_i < k).float().mean().item() for k in (1, 5, 10)}
    r.update({f"t2i_r{k}": 100 * (ranks_t < k).float().mean().item() for k in (1, 5, 10)})
    r["r_mean"] = sum(r.values()) / 6
    return r


@torch.no_grad()
def evaluate(cfg, run, model, madtp, split, tokenizer, draw_to=None):
    """Recalls with ITM re-ranking of the top-k ITC candidates, GFLOPs per pair, tokens kept per
    layer (mean and spread over samples) and, on synthetic scenes, how many kept patches show an object."""
    enc = Encoder(cfg, run, model, madtp, tokenizer)
    synthetic = split.object_patches(0) is not None
    imgs, txts = enc.images(split, positions=synthetic), enc.texts(split.captions, positions=synthetic)
    sim = imgs["emb"] @ txts["emb"].t()                                              # (I, T)
    k = min(cfg.itm_k, sim.shape[0], sim.shape[1])
    top_t = sim.topk(k, dim=1).indices                                               # (I, k) captions per image
    top_i = sim.topk(k, dim=0).indices.t()                                           # (T, k) images per caption
    pairs = [(c.item(), i) for i in range(len(top_t)) for c in top_t[i]] + \
            [(c, i.item()) for c in range(len(top_i)) for i in top_i[c]]
    itm = enc.fuse(txts["tokens"], imgs["tokens"], pairs)["score"].cpu()
    sim, n_i2t = sim.cpu(), top_t.numel()
    metrics = recalls(rerank(sim, top_t.cpu(), itm[:n_i2t]), rerank(sim.t(), top_i.cpu(), itm[n_i2t:]), split)
    fus = enc.fuse(txts["tokens"], imgs["tokens"], list(enumerate(split.txt2img)),
                   slots=txts["slots"] if synthetic else None)
    metrics.update(pair_gflops(model.cfg, split, tokenizer, imgs, txts, fus))
    metrics["kept_tokens"] = {e: [[s.float().mean().item(), s.float().std().item()] for s in kept.cpu().t()]
                              for e, kept in (("vision", imgs["kept"]), ("text", txts["kept"]), ("fusion", fus["kept"]))}
    if synthetic:
        metrics["object_share"] = object_share(split, imgs["positions"])
        metrics["content_share"] = content_share(split, tokenizer, txts["positions"])
        metrics["object_recall"] = object_recall(split, imgs["positions"])
        metrics["content_recall"] = {e: content_recall(split, tokenizer, pos)
                                     for e, pos in (("text", txts["positions"]), ("fusion", fus["positions"]))}
    if draw_to is not None and synthetic and run.main:
        draw_tokens(split, tokenizer, imgs, txts, fus, draw_to, cfg.num_drawn, model.cfg)
    return metrics


def kept_share(flags, positions):
    """Per layer: the share of kept tokens (CLS and package tokens aside) whose ground-truth flag is
    set. flags[s] (n,) bool per original token of sample s; positions[s][l] what layer l kept."""
    layers = len(positions[0])
    on, total = torch.zeros(layers), torch.zeros(layers)
    for flag, per_layer in zip(flags, positions):
        for l, pos in enumerate(per_layer):
            token = pos[pos >= 1].cpu() - 1
            on[l] += flag[token].sum()
            total[l] += len(token)
    return (on / total.clamp_min(1)).tolist()


def object_share(split, positions):
    """Per vision layer: the share of kept patches that show an object, and the same share over all
    patches for reference (what a random pruner would get)."""
    objects = [split.object_patches(i) for i in range(len(positions))]
    return dict(per_layer=kept_share(objects, positions),
                all_patches=torch.stack([o.float().mean() for o in objects]).mean().item())


def recall(flags, positions):
    """(S, L): for each sample s and layer l, the share of its flagged original tokens still present
    (kept, not fused) after layer l. flags[s] (n,) bool; positions[s][l] what layer l kept."""
    out = torch.zeros(len(flags), len(positions[0]))
    for s, (flag, per_layer) in enumerate(zip(flags, positions)):
        for l, pos in enumerate(per_layer):
            present = torch.zeros_like(flag)
            present[pos[pos >= 1].cpu() - 1] = True
            out[s, l] = (flag & present).sum() / flag.sum().clamp_min(1)
    return out


def object_recall(split, positions):
    """Per vision layer: the share of a scene's object patches still present, averaged over all
    scenes and over the most cluttered quarter (most object patches); and the Pearson r over scenes
    between a scene's object patches and the patches it kept (> 0: more content, more tokens)."""
    objects = [split.object_patches(i) for i in range(len(positions))]
    per_scene = recall(objects, positions)                                          # (S, L)
    count = torch.tensor([float(o.sum()) for o in objects])                         # (S,)
    cluttered = count.argsort(descending=True)[: max(1, len(count) // 4)]
    kept = torch.tensor([[float((pos >= 1).sum()) for pos in per_layer] for per_layer in positions])   # (S, L)
    return dict(per_layer=per_scene.mean(0).tolist(), cluttered=per_scene[cluttered].mean(0).tolist(),
                pearson_r=[pearson(count, k) for k in kept.t()])


def pearson(x, y):
    """Pearson correlation of two (S,) tensors; 0 where either does not vary (e.g. dense)."""
    x, y = x - x.mean(), y - y.mean()
    return (x @ y / (x.norm() * y.norm()).clamp_min(1e-12)).item()


def content_flags(split, tokenizer, num):
    """Per caption c < num: which of the words the tokenizer keeps carry content. [(n_c,) bool]"""
    return [torch.tensor(split.content_words(c)[: tokenizer.max_len - 1] or [False]) for c in range(num)]


def content_recall(split, tokenizer, positions):
    """Per text or fusion layer: the share of a caption's content words still present, averaged."""
    return recall(content_flags(split, tokenizer, len(positions)), positions).mean(0).tolist()


def content_share(split, tokenizer, positions):
    """Per text layer: the share of kept words that carry content (colour, shape, size, place)."""
    return dict(per_layer=kept_share(content_flags(split, tokenizer, len(positions)), positions))


def bench_batches(cfg, run, split, tokenizer, batch_size):
    """The pairs every model is timed on: test pairs in order, each batch padded only to its own
    longest caption."""
    n = cfg.bench_pairs if batch_size == 1 else max(cfg.bench_pairs, 4 * batch_size)
    c_of = [c % len(split.captions) for c in range(n)]
    images = torch.stack([split.image(split.txt2img[c]) for c in c_of])
    ids, valid = tokenizer.encode([split.captions[c] for c in c_of])
    batches = []
    for i in range(0, n, batch_size):
        N = int(valid[i:i + batch_size].sum(1).max())
        batches.append([t[i:i + batch_size].to(run.device) for t in (images, ids[:, :N], valid[:, :N])])
    return batches


def pair_forward(run, model, madtp, batch):
    with run.autocast():
        return model(*batch, madtp.hooks(Trace()) if madtp is not None else None)


@torch.no_grad()
def throughput(run, models, batches):
    """Pairs per second of whole retrieval pairs (image + caption + fusion) for each of
    models = {name: (model, madtp or None)}. The models take turns, round after round, and each
    keeps its best round: on a shared machine that is the least disturbed one, and turns make every
    ratio compare runs under the same conditions. Warm-up runs are discarded, the device is
    synchronised, and a dense model runs without hooks at all."""
    for model, madtp in models.values():
        model.eval()
        for b in batches[:WARMUP_RUNS]:
            pair_forward(run, model, madtp, b)
    best = {name: math.inf for name in models}
    for _ in range(TIMING_REPEATS):
        for name, (model, madtp) in models.items():
            run.sync()
            start = time.perf_counter()
            for b in batches:
                pair_forward(run, model, madtp, b)
            run.sync()
            best[name] = min(best[name], time.perf_counter() - start)
    n = sum(len(b[0]) for b in batches)
    return {name: n / t for name, t in best.items()}


@torch.no_grad()
def executed_gflops(run, model, madtp, batches):
    """What padded batches actually executed, per pair, as torch.utils.flop_counter counts it (/ 2:
    MACs). Above the per-sample count where attention runs over padding (SPEC section 5)."""
    with FlopCounterMode(display=False) as counter:
        for b in batches:
            pair_forward(run, model, madtp, b)
    return counter.get_total_flops() / 2 / 1e9 / sum(len(b[0]) for b in batches)


def add_speed(cfg, run, rows, models, split, tokenizer):
    """pairs/s at batch 1 and at bench_batch_size, speedups over rows["dense"], the ideal speedup
    (dense GFLOPs / GFLOPs), the GFLOPs per pair a padded batch really executed, and on a GPU whose
    peak is known, the model FLOPs utilisation of that large batch."""
    for key, bs in (("pairs_per_s_batch1", 1), ("pairs_per_s_batch", cfg.bench_batch_size)):
        batches = bench_batches(cfg, run, split, tokenizer, bs)
        for name, speed in throughput(run, models, batches).items():
            rows[name][key] = speed
    peak = peak_flops(run.device)
    for name, (model, madtp) in models.items():
        m = rows[name]
        m["gflops_executed_batch"] = executed_gflops(run, model, madtp, batches)
        m["tflops_batch"] = 2 * m["gflops_executed_batch"] * m["pairs_per_s_batch"] / 1e3   # 2 FLOPs per MAC
        m["mfu_batch"] = m["tflops_batch"] * 1e12 / peak if peak else None
    d = rows["dense"]
    for m in rows.values():
        m["speedup_batch1"] = m["pairs_per_s_batch1"] / d["pairs_per_s_batch1"]
        m["speedup_batch"] = m["pairs_per_s_batch"] / d["pairs_per_s_batch"]
        m["ideal_speedup"] = d["gflops"] / m["gflops"]


class HostSyncs(TorchFunctionMode):
    """Counts the calls that make the host wait for the device: reading a value back (bool, int,
    float, item, tolist, ...) and ops whose output size depends on values (nonzero, boolean-mask
    indexing, unique). A CPU runs them for free, so a count is how to see them there; on a GPU,
    torch.cuda.set_sync_debug_mode("warn") reports the same calls."""

    READS = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero", "masked_select",
             "unique", "cpu", "numpy"}

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        index = args[1] if name in ("__getitem__", "__setitem__") else None
        if name in self.READS or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                     for i in (index if isinstance(index, tuple) else (index,))):
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self):
        return sum(self.calls.values())


# ---------------------------------------------------------------------------------------------
# tokens.png: what the pruner kept

def draw_tokens(split, tokenizer, imgs, txts, fus, path, num, vcfg):
    """For a few test scenes, sparse and cluttered: the image, then per vision layer the image with
    its pruned patches dimmed; below, the caption once per text and fusion layer with the kept words
    boxed in green."""
    from torchvision.io import write_png
    from torchvision.utils import make_grid

    scale, p = max(1, 192 // vcfg.image_size), vcfg.patch_size
    grid = vcfg.image_size // p
    rows = []
    for i in drawn_scenes(split, num):
        img = (split.image(i) * torch.tensor(data.IMAGE_STD)[:, None, None] + torch.tensor(data.IMAGE_MEAN)[:, None, None])
        img = (img.clamp(0, 1) * 255).to(torch.uint8)
        panels = [img]
        for pos in imgs["positions"][i]:
            keep = torch.zeros(grid * grid, dtype=torch.bool)
            keep[pos[pos >= 1].cpu() - 1] = True
            mask = keep.view(grid, grid).repeat_interleave(p, 0).repeat_interleave(p, 1)
            panels.append(torch.where(mask, img, img // 4))
        panels = [c.repeat_interleave(scale, 1).repeat_interleave(scale, 2) for c in panels]
        c = split.img2txt[i][0]
        words = tokenizer.words(split.captions[c])
        strips = [word_strip(words, None, "caption")]
        strips += [word_strip(words, pos, f"text {l + 1}") for l, pos in enumerate(txts["positions"][c])]
        strips += [word_strip(words, pos, f"fusion {l + 1}") for l, pos in enumerate(fus["positions"][c])]
        top = torch.cat(panels, dim=2)
        W = max(top.shape[2], max(s.shape[2] for s in strips))
        rows.append(torch.cat([pad_width(top, W)] + [pad_width(s, W) for s in strips], dim=1))
    W = max(r.shape[2] for r in rows)
    picture = make_grid([pad_width(r, W) for r in rows], nrow=1, padding=8, pad_value=255)
    write_png(picture, str(path))


def drawn_scenes(split, num):
    """The num // 2 test scenes with the fewest object patches, then those with the most: where a
    budget that follows content must differ most."""
    count = torch.stack([split.object_patches(i).sum() for i in range(split.num_images)])
    order = count.argsort(stable=True).tolist()
    return order[: num // 2] + order[len(order) - (num - num // 2):]


WORD_W, WORD_H = 7, 16   # pixels per character and per line of the caption strips


def word_strip(words, pos, label):
    """One line: a label, then the caption's words; kept words (pos holds their index + 1) in green
    boxes, pruned ones in grey. pos None: every word in plain black."""
    from torchvision.utils import draw_bounding_boxes
    kept = set((pos[pos >= 1].cpu() - 1).tolist()) if pos is not None else set(range(len(words)))
    x, boxes, labels, colours = 0, [], [], []
    for text, on in [(label + ":", None)] + [(w, j in kept) for j, w in enumerate(words)]:
        w = WORD_W * len(text) + 6
        boxes.append([x, 1, x + w - 2, WORD_H - 1])
        labels.append(text)
        colours.append("black" if on is None or pos is None else ("green" if on else "lightgray"))
        x += w
    canvas = torch.full((3, WORD_H, x), 255, dtype=torch.uint8)
    return draw_bounding_boxes(canvas, torch.tensor(boxes), labels=labels, colors=colours, width=1)


def pad_width(img, W):
    return torch.cat([img, torch.full((3, img.shape[1], W - img.shape[2]), 255, dtype=torch.uint8)], dim=2)


# ---------------------------------------------------------------------------------------------
# the main job

def report(cfg, run, vcfg, tokenizer, splits, dense, compressed, madtp):
    """Stage 3: evaluate both models on the test split, time them, write metrics.json, print the table."""
    test = splits["test"]
    rows, models = {}, {}
    for name, model, md in (("dense", dense, None), (f"{cfg.method} {cfg.prune_ratio:.0%}", compressed, madtp)):
        run.log(f"stage 3: evaluating {name} on the test split ({test.num_images} images, {len(test.captions)} captions)")
        m = evaluate(cfg, run, model, md, test, tokenizer, draw_to=run.out / "tokens.png" if md is not None else None)
        if md is not None:
            m.update(method=cfg.method, prune_ratio=cfg.prune_ratio, beta=float(md.beta), tau=md.cfg.tau)
        rows[name], models[name] = m, (model, md)
    run.log("stage 3: timing both models")
    add_speed(cfg, run, rows, models, test, tokenizer)
    write_json(run.out / "metrics.json", rows)
    run.log(table(rows, cfg.bench_batch_size, run.device))
    run.log(f"\nwrote {run.out / 'metrics.json'}, {run.out / 'tokens.png'}, {run.out / 'train.log'}")
    return rows


def table(rows, bs, device):
    """The result at a glance: accuracy, compute and speed of each model, then tokens per layer."""
    head = (f"{'model':<16}{'r_mean':>7}{'i2t@1':>7}{'i2t@5':>7}{'i2t@10':>7}{'t2i@1':>7}{'t2i@5':>7}{'t2i@10':>7}"
            f"{'GFLOPs':>9}{'vis':>8}{'txt':>8}{'fus':>8}{'reduct':>8}{f'exec@{bs}':>9}{'pairs/s@1':>10}{f'@{bs}':>8}"
            f"{'speedup@1':>10}{f'@{bs}':>6}{'ideal':>7}{'of ideal':>9}")
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        lines.append(f"{name:<16}{m['r_mean']:>7.1f}" + "".join(f"{m[k]:>7.1f}" for k in
                     ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")) +
                     f"{m['gflops']:>9.4f}{m['gflops_vision']:>8.4f}{m['gflops_text']:>8.4f}{m['gflops_fusion']:>8.4f}"
                     f"{m['gflops_reduction']:>8.1%}{m['gflops_executed_batch']:>9.4f}"
                     f"{m['pairs_per_s_batch1']:>10.0f}{m['pairs_per_s_batch']:>8.0f}"
                     f"{m['speedup_batch1']:>10.2f}{m['speedup_batch']:>6.2f}{m['ideal_speedup']:>7.2f}"
                     f"{m['speedup_batch'] / m['ideal_speedup']:>9.2f}")
    lines.append(f"GFLOPs: per pair, each sample at its own token counts (MACs, fvcore's convention); exec@{bs}: "
                 f"what padded batches of {bs} really executed per pair (torch.utils.flop_counter / 2)")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    mfu = "; ".join(f"{name} {m['tflops_batch']:.1f} TFLOP/s, MFU {m['mfu_batch']:.1%}" for name, m in rows.items()
                    if m.get("mfu_batch") is not None)
    lines.append(f"pairs/s: {where}, whole pairs (image, caption, fusion), best of {TIMING_REPEATS} synchronised "
                 f"rounds after {WARMUP_RUNS} warm-up batches; of ideal = speedup@{bs} / ideal"
                 + (f"\nat batch {bs}: {mfu}" if mfu else ""))
    lines.append("\ntokens kept after each layer, mean ± std over test samples (CLS and package token included)")
    for name, m in rows.items():
        for e, per_layer in m["kept_tokens"].items():
            lines.append(f"  {name:<16}{e:<8}" + "  ".join(f"{mu:5.1f}±{sd:<4.1f}" for mu, sd in per_layer))
    for name, m in rows.items():
        if "object_share" in m:
            o, c = m["object_recall"], m["content_recall"]
            lines.append(f"\n  {name}: what the pruner kept, against the scenes' ground truth (per layer)")
            lines.append("    kept patches on objects:        " + " ".join(f"{s:5.0%}" for s in m["object_share"]["per_layer"])
                         + f"   (all patches: {m['object_share']['all_patches']:.0%})")
            lines.append("    object patches still present:   " + " ".join(f"{s:5.2f}" for s in o["per_layer"]))
            lines.append("      in the most cluttered 25%:    " + " ".join(f"{s:5.2f}" for s in o["cluttered"]))
            lines.append("    r(object patches, kept):        " + " ".join(f"{s:5.2f}" for s in o["pearson_r"]))
            lines.append("    content words present, text:    " + " ".join(f"{s:5.2f}" for s in c["text"])
                         + "   fusion: " + " ".join(f"{s:5.2f}" for s in c["fusion"]))
    return "\n".join(lines)


def build(cfg: TrainConfig, run):
    """Data, tokenizer and model config for a training configuration."""
    preset = PRESETS[cfg.preset]
    vcfg = VLTConfig(**preset["model"])
    splits = load_splits(cfg, vcfg)
    tokenizer = data.Tokenizer.build(splits["train"].captions, vcfg.max_text_len)
    vcfg = replace(vcfg, vocab_size=len(tokenizer))
    return vcfg, splits, tokenizer


def main_job(cfg, run):
    run.log(f"config: {json.dumps(asdict(cfg))}")
    vcfg, splits, tokenizer = build(cfg, run)
    run.log(f"model: {json.dumps(asdict(vcfg))}")
    run.log(f"data: {cfg.data}, {len(splits['train'].captions)} training pairs, "
            f"{splits['val'].num_images} validation and {splits['test'].num_images} test images; device {run.device}")
    dense = stage_dense(cfg, run, vcfg, splits, tokenizer)
    compressed, madtp = stage_compress(cfg, run, vcfg, splits, tokenizer, dense)
    if run.main:
        report(cfg, run, vcfg, tokenizer, splits, dense, compressed, madtp)


@torch.no_grad()
def where_time_goes(cfg, run, model, madtp, split, tokenizer, top=15):
    """torch.profiler's top operators for the network unpruned and pruned, at batch 1 and at the
    large batch (CPU and, on a GPU, CUDA activity): where pruning saves (addmm, bmm) and what it
    adds (gather, sort, small ops); and how often one forward makes the host wait for the device."""
    cuda = run.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    for bs in (1, cfg.bench_batch_size):
        batches = bench_batches(cfg, run, split, tokenizer, bs)
        for name, md in (("unpruned", None), ("pruned", madtp)):
            for b in batches[:WARMUP_RUNS]:
                pair_forward(run, model, md, b)
            with HostSyncs() as syncs:
                pair_forward(run, model, md, batches[0])
            with torch.profiler.profile(activities=activities) as prof:
                for b in batches:
                    pair_forward(run, model, md, b)
                run.sync()
            ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / len(batches)
            run.log(f"\n{name}, batch {bs}, {sum(len(b[0]) for b in batches)} pairs; per forward: "
                    f"{ops:.0f} aten calls (nested included), {syncs.total} host syncs {syncs.calls}")
            run.log(prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                              row_limit=top))


def eval_only(cfg, run, path, profile=False, beta=None):
    """Re-evaluate one checkpoint on the test split of the data it was trained on."""
    ckpt = load_checkpoint(path)
    saved = TrainConfig(**{k: v for k, v in ckpt["train_config"].items() if k in {f.name for f in fields(TrainConfig)}})
    cfg = replace(saved, eval_batch_size=cfg.eval_batch_size, bench_batch_size=cfg.bench_batch_size,
                  bench_pairs=cfg.bench_pairs, device=cfg.device, out=cfg.out,
                  coco_root=cfg.coco_root or saved.coco_root, num_workers=cfg.num_workers)
    vcfg = VLTConfig(**ckpt["vlt_config"])
    splits = load_splits(cfg, vcfg)
    tokenizer = data.Tokenizer.from_state_dict(ckpt["tokenizer"])
    model = VLT(vcfg).to(run.device)
    model.load_state_dict(ckpt["model"])
    madtp = None
    if ckpt["kind"] == "compressed":
        madtp = new_madtp(MADTPConfig(**ckpt["madtp_config"]), vcfg).to(run.device)
        madtp.load_state_dict(ckpt["madtp"])
        if beta is not None:   # e.g. near 0: how the fine-tuned weights do without pruning
            madtp.beta.fill_(beta)
            fit_bars(cfg, run, model, madtp, splits["val"], tokenizer)
    m = evaluate(cfg, run, model, madtp, splits["test"], tokenizer)
    rows = dict(dense=dict(gflops=m["gflops_dense"]), model=m)   # the same network unpruned, for speedups
    add_speed(cfg, run, rows, dict(dense=(model, None), model=(model, madtp)), splits["test"], tokenizer)
    if madtp is not None:
        m.update(method=madtp.cfg.method, beta=float(madtp.beta), tau=madtp.cfg.tau)
    if profile:
        where_time_goes(cfg, run, model, madtp, splits["test"], tokenizer)
    out = run.out / f"eval-{Path(path).stem}.json"
    write_json(out, m)
    run.log(f"{path}: r_mean {m['r_mean']:.2f}, GFLOPs per pair {m['gflops']:.4f} "
            f"(reduction {m['gflops_reduction']:.1%}), pairs/s {m['pairs_per_s_batch1']:.0f} at batch 1, "
            f"{m['pairs_per_s_batch']:.0f} at batch {cfg.bench_batch_size}; wrote {out}")
    return m


def parse_list(text, kind, flag):
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{flag} takes a comma-separated list like 0.5,0.7,0.8 or 0,1,2, got {text!r}")


# ---------------------------------------------------------------------------------------------
# the comparison behind the README's results table (SPEC section 7)

# The budget-rule ablation (README): MADTP with each way of sharing β's cut, and cls-static for
# reference. stem: (label, TrainConfig overrides; τ is given where the rule was measured with it)
ABLATION = {
    "global": ("one global β, τ = 1 (as first built)", dict(budget="global", tau=1.0)),
    "global-tau0.1": ("one global β, τ = 0.1", dict(budget="global", tau=0.1)),
    "encoder": ("a β per encoder, τ = 1", dict(budget="encoder", tau=1.0)),
    "layer": ("a β per layer, τ = 1", dict(budget="layer", tau=1.0)),
    "back": ("a β per layer, back-loaded shares, τ = 1", dict(budget="back", tau=1.0)),
    "layer-margin": ("a β per layer, margin rule, τ = 1", dict(budget="layer", rule="margin", tau=1.0)),
    "layer-tau0.1": ("a β per layer, τ = 0.1 (default)", dict(budget="layer", tau=0.1)),
    "global-from2": ("one global β, τ = 1, pruning from layer 2", dict(budget="global", first_layer=1, tau=1.0)),
    "global-from2-tau0.1": ("one global β, τ = 0.1, pruning from layer 2", dict(budget="global", first_layer=1, tau=0.1)),
    "layer-from2": ("a β per layer, τ = 1, pruning from layer 2", dict(budget="layer", first_layer=1, tau=1.0)),
    "cls-static": ("reference: cls-static", dict(method="cls-static")),   # τ does not enter cls-static
    "cls-static-from2": ("reference: cls-static, pruning from layer 2", dict(method="cls-static", first_layer=1, tau=1.0)),
}


def compare(cfg, run, ratios, seeds, only=None):
    """Every method (SPEC section 7) at every reduction: results.json and results.md, timed."""
    arms = {m: (m, dict(method=m)) for m in only or METHODS}
    return sweep(cfg, run, ratios, seeds, arms, "results", timed=True)


def ablation(cfg, run, ratios, seeds, only=None):
    """MADTP under each budget rule of ABLATION: ablation-<ratios>.json and .md, untimed."""
    arms = {stem: (ABLATION[stem][0], dict(dict(method="madtp"), **ABLATION[stem][1])) for stem in only or ABLATION}
    return sweep(cfg, run, ratios, seeds, arms, "ablation-" + "-".join(f"{p:.2f}" for p in ratios), timed=False)


def sweep(cfg, run, ratios, seeds, arms, name, timed):
    """One dense model (trained with --seed), then every arm {stem: (label, config overrides)} at
    every reduction fine-tuned from it with the same steps, once per fine-tuning seed, all evaluated
    on the test split; writes <name>.json and <name>.md. Finished checkpoints and their evaluations
    are reused, so an interrupted sweep continues where it stopped, and seeds (or ratios) can run
    as separate processes before one run collects them."""
    if run.distributed:
        fail("--compare and --ablation run in one process; start them without torchrun")
    vcfg, splits, tokenizer = build(cfg, run)
    test, base = splits["test"], run.out
    dense = stage_dense(cfg, run, vcfg, splits, tokenizer)
    rows = []
    for seed in seeds:
        run.out = base / f"seed{seed}"
        run.out.mkdir(parents=True, exist_ok=True)
        seed_rows, models = {}, {}
        for p in [0.0] + ratios:
            for stem, (label, over) in ({"dense": ("dense", {})} if p == 0 else arms).items():
                acfg = replace(cfg, seed=seed, prune_ratio=p, **over)
                model, madtp = (dense, None) if p == 0 else stage_compress(acfg, run, vcfg, splits, tokenizer, dense, stem)
                cache = (run.out / f"{stem}-{p:.2f}.eval.json") if p else (base / "dense.eval.json")
                if cache.exists():   # accuracy and GFLOPs of a finished checkpoint never change
                    m = json.loads(cache.read_text())
                else:
                    run.log(f"evaluating {label} at {p:.0%} (seed {seed}) on the test split")
                    m = evaluate(acfg, run, model, madtp, test, tokenizer)
                    write_json(cache, m)
                key = "dense" if p == 0 else f"{stem} {p:.2f}"
                seed_rows[key], models[key] = dict(m, seed=seed, method=label, target=p), (model, madtp)
        if timed:   # timings are always taken anew, all models of a seed in turns: every ratio is of one run
            run.log(f"timing {len(models)} models (seed {seed})")
            add_speed(cfg, run, seed_rows, models, test, tokenizer)
        for m in seed_rows.values():
            m["drop"] = seed_rows["dense"]["r_mean"] - m["r_mean"]
        rows += seed_rows.values()
    run.out = base
    summary = summarise(rows, timed)
    write_json(base / f"{name}.json", dict(rows=rows, summary=summary, seeds=seeds, ratios=ratios,
                                           config=asdict(cfg), model=asdict(vcfg)))
    md = results_table(summary, seeds, cfg.bench_batch_size) if timed else ablation_table(summary, seeds)
    (base / f"{name}.md").write_text(md + "\n")
    run.log(md)
    run.log(f"\nwrote {base / (name + '.md')} and {base / (name + '.json')}")
    return summary


def summarise(rows, timed=True):
    """Mean and standard deviation over seeds of every number, per (method, target)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["target"], r["method"]), []).append(r)
    out = []
    for (target, method), rs in groups.items():
        def stat(get):
            v = torch.tensor([float(get(r)) for r in rs])
            return [v.mean().item(), v.std().item() if len(v) > 1 else 0.0]
        row = dict(method=method, target=target, seeds=len(rs))
        speed = ("gflops_executed_batch", "pairs_per_s_batch1", "pairs_per_s_batch", "speedup_batch1",
                 "speedup_batch", "ideal_speedup")
        for key in ("gflops_reduction", "gflops", "r_mean", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5",
                    "t2i_r10", "drop") + (speed if timed else ()):
            row[key] = stat(lambda r: r[key])
        for e in ENCODERS:   # tokens kept per layer, averaged over the encoder's layers
            row[f"kept_{e}"] = stat(lambda r: sum(mu for mu, _ in r["kept_tokens"][e]) / len(r["kept_tokens"][e]))
        if "object_share" in rs[0]:
            row["object_share"] = stat(lambda r: sum(r["object_share"]["per_layer"]) / len(r["object_share"]["per_layer"]))
            row["object_recall"] = stat(lambda r: r["object_recall"]["per_layer"][-1])
            row["object_recall_cluttered"] = stat(lambda r: r["object_recall"]["cluttered"][-1])
            row["pearson_r"] = stat(lambda r: r["object_recall"]["pearson_r"][-1])
            row["content_recall"] = stat(lambda r: r["content_recall"]["text"][-1])
        row["kept_per_layer"] = {e: [sum(r["kept_tokens"][e][l][0] for r in rs) / len(rs)
                                     for l in range(len(rs[0]["kept_tokens"][e]))] for e in ENCODERS}
        out.append(row)
    return out


def spread_format(seeds):
    """(mean, std) -> "mean ± std" when there are several seeds, else "mean"."""
    return (lambda v, f: f"{v[0]:{f}} ± {v[1]:{f}}") if len(seeds) > 1 else (lambda v, f: f"{v[0]:{f}}")


def results_table(summary, seeds, eval_bs):
    """results.md: one row per (method, target GFLOPs reduction); ± is the spread over seeds."""
    pm = spread_format(seeds)
    cols = ["method", "target", "reduction", "GFLOPs/pair", f"executed @{eval_bs}", "r_mean", "drop",
            "i2t R@1/5/10", "t2i R@1/5/10", "kept v/t/f", "on objects", "object recall, all / cluttered 25%",
            "r(objects, kept)", f"pairs/s @1 / @{eval_bs}", f"speedup @1 / @{eval_bs}", "ideal",
            f"measured/ideal @{eval_bs}"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in summary:
        lines.append("| " + " | ".join([
            r["method"], f"{r['target']:.0%}", pm([100 * x for x in r["gflops_reduction"]], ".1f") + "%",
            f"{r['gflops'][0]:.4f}", f"{r['gflops_executed_batch'][0]:.4f}", pm(r["r_mean"], ".1f"), pm(r["drop"], ".1f"),
            "/".join(f"{r[f'i2t_r{k}'][0]:.1f}" for k in (1, 5, 10)),
            "/".join(f"{r[f't2i_r{k}'][0]:.1f}" for k in (1, 5, 10)),
            "/".join(f"{r[f'kept_{e}'][0]:.1f}" for e in ENCODERS),
            *([f"{r['object_share'][0]:.0%}", pm(r["object_recall"], ".2f") + " / " + pm(r["object_recall_cluttered"], ".2f"),
               pm(r["pearson_r"], "+.2f")] if "object_share" in r else ["-"] * 3),
            f"{r['pairs_per_s_batch1'][0]:.0f} / {r['pairs_per_s_batch'][0]:.0f}",
            f"{r['speedup_batch1'][0]:.2f} / {r['speedup_batch'][0]:.2f}", f"{r['ideal_speedup'][0]:.2f}",
            f"{r['speedup_batch'][0] / r['ideal_speedup'][0]:.2f}"]) + " |")
    return "\n".join(lines)


def ablation_table(summary, seeds):
    """ablation-<ratios>.md: one row per (budget rule, target): accuracy, where the cuts fall, what they hit."""
    pm = spread_format(seeds)
    cols = ["budget rule", "target", "reduction", "r_mean", "drop", "vision tokens per layer", "text", "fusion",
            "object recall, all / cluttered 25%", "r(objects, kept)", "content-word recall"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in summary:
        kept = r["kept_per_layer"]
        lines.append("| " + " | ".join([
            r["method"], f"{r['target']:.0%}", pm([100 * x for x in r["gflops_reduction"]], ".1f") + "%",
            pm(r["r_mean"], ".1f"), pm(r["drop"], ".1f")] + [" → ".join(f"{k:.1f}" for k in kept[e]) for e in ENCODERS] + [
            f"{r['object_recall'][0]:.2f} / {r['object_recall_cluttered'][0]:.2f}", f"{r['pearson_r'][0]:+.2f}",
            f"{r['content_recall'][0]:.2f}"]) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--data", choices=["synthetic", "coco"])
    p.add_argument("--coco-root")
    p.add_argument("--coco-ann", help="caption json file(s), comma-separated (official COCO or Karpathy format)")
    p.add_argument("--coco-num-images", type=int)
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="sizes (default: gpu on CUDA, default on the CPU, coco with --data coco)")
    p.add_argument("--method", choices=["madtp", "dtp-no-mag", "cls-static", "random"])
    p.add_argument("--prune-ratio", type=float, help="target GFLOPs reduction p, e.g. 0.5")
    p.add_argument("--prune", help="encoders that prune, comma-separated (default vision,text,fusion)")
    p.add_argument("--num-align-tokens", type=int, help="M, the number of alignment tokens")
    p.add_argument("--alpha", type=float, help="α, the weight of L_align")
    p.add_argument("--tau", type=float, help="τ, the temperature of the threshold θ's softmax")
    p.add_argument("--out")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
    p.add_argument("--eval-only", metavar="CKPT", help="re-evaluate a checkpoint on its test split")
    p.add_argument("--profile", action="store_true", help="with --eval-only: where the time goes, per operator")
    p.add_argument("--beta", type=float, help="with --eval-only: evaluate a compressed checkpoint at this β instead")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--bench-batch-size", type=int, help="the large batch timed besides batch 1")
    p.add_argument("--bench-pairs", type=int, help="pairs timed at batch 1")
    p.add_argument("--num-train", type=int, help="synthetic training images")
    p.add_argument("--num-val", type=int, help="synthetic validation images")
    p.add_argument("--num-test", type=int, help="synthetic test images")
    p.add_argument("--seed", type=int)
    p.add_argument("--dense-steps", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate of dense training")
    p.add_argument("--prune-lr", type=float, help="peak learning rate of compression fine-tuning")
    p.add_argument("--prune-steps", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--save-every", type=int, help="steps between checkpoints")
    p.add_argument("--compare", metavar="P,P,...", help="fine-tune every method at each reduction (results.md)")
    p.add_argument("--ablation", metavar="P,P,...", help="fine-tune MADTP with each budget rule at each reduction (ablation.md)")
    p.add_argument("--seeds", metavar="S,S,...", help="with --compare or --ablation: seeds to average over")
    p.add_argument("--arms", metavar="A,A,...", help="with --compare or --ablation: only these methods or rules "
                   f"(ablation: {','.join(ABLATION)}), e.g. to split the work over processes")
    p.add_argument("--budget", choices=BUDGETS, help="how β's cut is shared across layers (default layer)")
    p.add_argument("--rule", choices=RULES, help="the keep statistic a fitted bar is compared with (default ratio)")
    p.add_argument("--first-layer", type=int, help="first pruned layer of every encoder (default 0)")
    args = p.parse_args(argv)
    on_gpu = args.device == "cuda" or (args.device in (None, "auto") and torch.cuda.is_available())
    preset = args.preset or ("coco" if args.data == "coco" else "gpu" if on_gpu else "default")
    values = dict(PRESETS[preset], preset=preset)
    values.pop("model")
    if preset == "coco":
        values["data"] = "coco"
    values["out"] = f"runs/{preset}"
    for f in fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    cfg = TrainConfig(**values)
    if not 0 <= cfg.prune_ratio < 1:
        p.error(f"--prune-ratio must lie in [0, 1), got {cfg.prune_ratio}")
    return cfg, args


def main(argv=None):
    cfg, args = parse_args(argv)
    run = Run(cfg.device, cfg.out)
    run.resume = args.resume
    try:
        if args.eval_only:
            eval_only(cfg, run, args.eval_only, args.profile, args.beta)
        elif args.compare or args.ablation:
            known = METHODS if args.compare else ABLATION
            only = parse_list(args.arms or "", str, "--arms")
            if set(only) - set(known):
                fail(f"--arms takes {', '.join(known)}; got {args.arms!r}")
            sweep_of = compare if args.compare else ablation
            sweep_of(cfg, run, parse_list(args.compare or args.ablation, float, "--compare/--ablation"),
                     parse_list(args.seeds or str(cfg.seed), int, "--seeds"), only)
        else:
            main_job(cfg, run)
    finally:
        if run.distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
