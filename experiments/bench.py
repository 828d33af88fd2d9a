"""Speed: the dense VLT against MADTP, timed in turns, over a grid of sizes or a main job's models.

    python -m experiments.bench                              # random weights, CPU: batch 1 and 64
    python -m experiments.bench --device cuda                # GPU: batch 1 and 256
    python -m experiments.bench --checkpoints runs/default   # the main job's trained models, its test pairs

For each size (width, vision tokens, depths: from the tiny preset to the gpu preset) a VLT with
random weights, and a MADTP per count rule at a 50% and an 80% GFLOPs reduction, β calibrated on the
benchmark's own synthetic scenes as training calibrates it (train.calibrate). The models of one size
take turns round after round in one process, each keeping its best round; the dense model runs the
fused attention kernel in every layer, as a user's would. Prints one table (pairs/s, speedup over
dense, the ideal speedup dense GFLOPs / GFLOPs, the share of ideal, on a GPU the model FLOP/s and
MFU, and how many more aten calls a pruned layer makes than a dense one), where each breaks even, and
the process's peak RSS; writes bench-<device>.md and .json in --out. --calls also says which
function of madtp.py and vlt.py makes a pruned layer's aten calls. With --checkpoints, the models
are a main job's dense.pt and madtp-<counts>-<p>.pt, timed on its test pairs.
"""

import collections
import contextlib
import resource
from dataclasses import fields, replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import madtp as madtp_module
import train
import vlt as vlt_module
from experiments.common import bench_batches, best_times, load, unfinished
from madtp import COUNTS, MADTP, MADTPConfig, Trace
from vlt import VLT, VLTConfig

MODEL_FIELDS = {f.name for f in fields(VLTConfig)}
# name -> VLTConfig fields: the presets' models, and the gpu model on the default's 65 tokens
SIZES = {
    "tiny": {k: v for k, v in train.PRESETS["tiny"].items() if k in MODEL_FIELDS},
    "default": {},
    "gpu-65": dict(dim=384, heads=6, vision_layers=8, text_layers=4, fusion_layers=4),
    "gpu": {k: v for k, v in train.PRESETS["gpu"].items() if k in MODEL_FIELDS},
}
RATIOS = (0.5, 0.8)
IMAGES = 64          # synthetic scenes per size: calibration and timing inputs, two captions each
ROUNDS = 5           # timed rounds; each model keeps its best (the least disturbed)
PAIRS_AT_1 = 32      # pairs timed one at a time per round
# dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, for MFU; other devices get none
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
                   "L40S": 362e12, "L4": 121e12}
# what a pruned layer's aten calls are attributed to (--calls)
TRACED = {madtp_module: "mag_logits concept_attention normalise cls_score self_score mag_score importance "
                        "threshold keep_mask batch_max prune_tokens", vlt_module: "seq_of",
          MADTP: "prune_layer decide", vlt_module.Attention: "forward"}


def scenes(size):
    """The bench's scenes for a size, as a validation split, and their tokenizer."""
    vcfg = VLTConfig(**SIZES[size])
    split = data.synthetic_splits(2, IMAGES, 2, 2, vcfg.image_size, vcfg.patch_size, seed=0)["val"]
    return split, data.Tokenizer.build(split.captions, vcfg.max_text_len)


def models_of(size, cfg, run, split, tokenizer, counts=COUNTS, ratios=RATIOS):
    """({name: (model, madtp or None)}, {name: GFLOPs reduction}) for one size, β calibrated per
    count rule and target; M as in the preset the size comes from."""
    vcfg = VLTConfig(**dict(SIZES[size], vocab_size=len(tokenizer)))
    M = train.PRESETS["gpu"]["num_align_tokens"] if size.startswith("gpu") else MADTPConfig.num_align_tokens
    torch.manual_seed(0)
    model = VLT(vcfg).to(run.device).eval()
    models, reductions = {"dense": (model, None)}, {"dense": 0.0}
    for rule in counts:
        for p in ratios:
            madtp = MADTP(MADTPConfig(counts=rule, num_align_tokens=M), vcfg).to(run.device)
            madtp.beta.fill_(train.BETA_INIT)
            reduction = train.calibrate(replace(cfg, prune_ratio=p), run, model, madtp, split, tokenizer)
            models[f"{rule} {p:.0%}"], reductions[f"{rule} {p:.0%}"] = (model, madtp.eval()), reduction
    return models, reductions


@contextlib.contextmanager
def labelled():
    """Every function in TRACED runs inside a profiler label of its name, for as long as this lasts."""
    saved = [(owner, name, getattr(owner, name)) for owner, names in TRACED.items() for name in names.split()]

    def label(name, f):
        def run(*args, **kwargs):
            with torch.profiler.record_function("fn " + name):
                return f(*args, **kwargs)
        return run
    for owner, name, f in saved:
        setattr(owner, name, label(name if name != "forward" else "attention", f))
    try:
        yield
    finally:
        for owner, name, f in saved:
            setattr(owner, name, f)


@torch.no_grad()
def calls_by_function(model, madtp, batch):
    """{function: aten calls (nested included) of one forward}, each call counted in the innermost
    labelled function it ran in ("model": in none)."""
    with labelled(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(*batch, madtp.hooks(Trace()) if madtp is not None else None)
    counts = collections.Counter()
    for e in (e for e in prof.events() if e.name.startswith("aten::")):
        owner = e.cpu_parent
        while owner is not None and not owner.name.startswith("fn "):
            owner = owner.cpu_parent
        counts["model" if owner is None else owner.name[3:]] += 1
    return counts


def calls_table(by_function, layers):
    """Where a pruned layer's extra aten calls go: (pruned - dense) per function, per pruned layer."""
    lines = ["more aten calls per pruned layer, by function (batch 1):"]
    for name in (n for n in by_function if n != "dense"):
        extra = by_function[name].copy()
        extra.subtract(by_function["dense"])
        lines.append(f"  {name}: " + ", ".join(f"{f} {n / layers:.1f}" for f, n in extra.most_common() if n))
    return "\n".join(lines)


@torch.no_grad()
def model_flops(run, models, batches):
    """{name: FLOPs per pair} that the padded batches really execute (torch.utils.flop_counter)."""
    out = {}
    for name, (model, madtp) in models.items():
        with FlopCounterMode(display=False) as counter, run.autocast():
            for b in batches:
                model(*b, madtp.hooks(Trace()) if madtp is not None else None)
        out[name] = counter.get_total_flops() / sum(len(b[0]) for b in batches)
    return out


def trained(folder, run):
    """The models of a main job's --out folder: (models, reductions, its config, test split, tokenizer)."""
    models, reductions = {}, {}
    for path in [Path(folder) / "dense.pt"] + sorted(Path(folder).glob("madtp-*.pt")):
        ckpt = train.load_checkpoint(path)   # read once: hundreds of MB at the gpu preset
        if path.name != "dense.pt" and unfinished(ckpt):
            run.log(f"skipping {path}: saved mid-training (a main job stopped early)")
            continue
        cfg, model, madtp, tokenizer = load(path, run, ckpt=ckpt)
        name = "dense" if madtp is None else path.stem
        models[name] = model, madtp
        reductions[name] = 0.0 if madtp is None else ckpt["validation_reduction"]
    return models, reductions, model.cfg, train.load_splits(cfg, model.cfg, run)["test"], tokenizer


def rows_of(cfg, run, size, vcfg, models, reductions, split, tokenizer, large, show_calls, rounds=ROUNDS):
    """Pairs/s of each model at batch 1 and the large batch, timed in turns, with its speedup over
    dense, the ideal one, the share of ideal, MFU on a GPU, and its extra aten calls a layer."""
    peak = next((f for k, f in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(run.device)),
                None) if run.device.type == "cuda" else None
    one = bench_batches(cfg, run, split, tokenizer, 1, 1)[0]
    by_function = {name: calls_by_function(model, madtp, one) for name, (model, madtp) in models.items()}
    calls, rows = {name: sum(counts.values()) for name, counts in by_function.items()}, []
    layers = vcfg.vision_layers + vcfg.text_layers + vcfg.fusion_layers   # every layer prunes
    if show_calls:
        run.log(f"{size}:\n" + calls_table(by_function, layers))
    for bs in (1, large):
        batches = bench_batches(cfg, run, split, tokenizer, bs, PAIRS_AT_1 if bs == 1 else bs)
        run.log(f"{size}: timing at batch {bs}")
        best, pairs = best_times(run, models, batches, rounds, warmup=1), sum(len(b[0]) for b in batches)
        flops = model_flops(run, models, batches) if peak and bs == large else {}
        for name, reduction in reductions.items():
            speedup, ideal = best["dense"] / best[name], 1 / (1 - reduction)   # dense GFLOPs / GFLOPs
            rows.append(dict(size=size, tokens=1 + vcfg.num_patches, dim=vcfg.dim,
                             depths=f"{vcfg.vision_layers}+{vcfg.text_layers}+{vcfg.fusion_layers}",
                             model=name, batch=bs, reduction=reduction, pairs_per_s=pairs / best[name],
                             speedup=speedup, ideal=ideal, of_ideal=speedup / ideal,
                             mfu=flops[name] * pairs / best[name] / peak if name in flops else None,
                             calls_per_pruned_layer=(calls[name] - calls["dense"]) / layers
                             if name != "dense" else None))
    return rows


def bench(cfg, run, sizes, large, show_calls=False, rounds=ROUNDS):
    rows = []
    for size in sizes:
        split, tokenizer = scenes(size)
        run.log(f"{size}: calibrating {len(COUNTS) * len(RATIOS)} models")
        models, reductions = models_of(size, cfg, run, split, tokenizer)
        vcfg = models["dense"][0].cfg
        rows += rows_of(cfg, run, size, vcfg, models, reductions, split, tokenizer, large, show_calls, rounds)
    return rows


def table(rows, device):
    head = ("| size | vision tokens | width | layers | model | reduction | batch | pairs/s | speedup | ideal | "
            "of ideal | MFU | more aten calls per pruned layer |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        calls = "" if r["calls_per_pruned_layer"] is None else f"{r['calls_per_pruned_layer']:.0f}"
        mfu = "" if r["mfu"] is None else f"{r['mfu']:.1%}"
        lines.append(f"| {r['size']} | {r['tokens']} | {r['dim']} | {r['depths']} | {r['model']} | "
                     f"{r['reduction']:.1%} | {r['batch']} | {r['pairs_per_s']:.1f} | {r['speedup']:.2f} | "
                     f"{r['ideal']:.2f} | {r['of_ideal']:.2f} | {mfu} | {calls} |")
    lines += ["", f"Device: {device}. Where each breaks even (speedup >= 1 over the fused dense model):"]
    for model in dict.fromkeys(r["model"] for r in rows if r["model"] != "dense"):
        for bs in dict.fromkeys(r["batch"] for r in rows):
            wins = [r["size"] for r in rows if r["model"] == model and r["batch"] == bs and r["speedup"] >= 1]
            lines.append(f"- {model}, batch {bs}: " + (", ".join(wins) if wins else "at no size of the grid"))
    return "\n".join(lines)


def main(argv=None):
    p = train.Parser(description=__doc__.split("\n\n")[0], prog="python -m experiments.bench")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--sizes", default=",".join(SIZES), help="comma-separated, of: " + ", ".join(SIZES))
    p.add_argument("--batch-size", type=int, help="the large batch (default 64 on a CPU, 256 on a GPU)")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--calls", action="store_true", help="also where each pruned layer's aten calls go, by function")
    p.add_argument("--checkpoints", help="a main job's --out: time its dense.pt and madtp-*.pt instead")
    p.add_argument("--rounds", type=int, default=ROUNDS, help="timed rounds; each model keeps its best")
    args = p.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if not sizes or set(sizes) - set(SIZES):
        train.fail(f"--sizes takes names of {', '.join(SIZES)}, got {args.sizes!r}")
    cfg = train.TrainConfig(device=args.device, out=args.out)
    with train.Run(cfg) as run:
        large = args.batch_size or (256 if run.device.type == "cuda" else 64)
        cfg = replace(cfg, eval_batch_size=large)
        if args.checkpoints:
            models, reductions, vcfg, split, tokenizer = trained(args.checkpoints, run)
            rows = rows_of(cfg, run, Path(args.checkpoints).name, vcfg, models, reductions, split, tokenizer,
                           large, args.calls, args.rounds)
        else:
            rows = bench(cfg, run, sizes, large, args.calls, args.rounds)
        where = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else \
            f"CPU, {torch.get_num_threads()} threads"
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9   # Linux: KiB
        md = table(rows, where) + f"\n\nPeak RSS of the process: {rss:.2f} GB"
        run.log(md)
        name = f"bench-{run.device.type}"
        train.write_json(run.out / f"{name}.json", dict(rows=rows, device=where))
        train.write_atomic(run.out / f"{name}.md", lambda tmp: tmp.write_text(md + "\n"))
        run.log(f"\nwrote {run.out / (name + '.md')} and {run.out / (name + '.json')}")
    return rows


if __name__ == "__main__":
    main()
