"""Speed apart from training: the dense VLT against pruned ones, random weights, over a grid of sizes.

    python -m experiments.bench                  # CPU: batch 1 and 64
    python -m experiments.bench --device cuda    # GPU: batch 1 and 256

For each size (width, vision tokens, depths: from the tiny preset to the gpu preset) a VLT with
random weights, and for each method a MADTP at a 50% and an 80% GFLOPs reduction, β calibrated on the
benchmark's own synthetic scenes as training calibrates it (train.calibrate). The models of one size
take turns round after round in one process, each keeping its best round. The dense model runs the
fused attention kernel in every layer, as a user's would. Prints one table (pairs/s, speedup over
dense, the ideal speedup dense GFLOPs / GFLOPs, the share of ideal, and how many more aten calls a
pruned layer makes than a dense one), where each method breaks even, and the process's peak RSS;
writes bench-<device>.md and .json in --out.
"""

import collections
import contextlib
from dataclasses import fields, replace

import torch

import data
import madtp as madtp_module
import train
import vlt as vlt_module
from madtp import ENCODERS, MADTP, MADTPConfig
from vlt import VLT, VLTConfig

# name -> VLTConfig fields: the presets' models, and two that change only the tokens or only the width
SIZES = {
    "tiny": {k: v for k, v in train.PRESETS["tiny"].items() if k in {f.name for f in fields(VLTConfig)}},
    "default": {},
    "shallow": dict(dim=128, vision_layers=4),    # the earlier default: 4 vision layers at width 128
    "shallow-257": dict(dim=128, vision_layers=4, image_size=128),   # it on 257 vision tokens
    "gpu-65": dict(dim=384, heads=6, vision_layers=8, text_layers=4, fusion_layers=4),   # the gpu model on 65
    "gpu": {k: v for k, v in train.PRESETS["gpu"].items() if k in {f.name for f in fields(VLTConfig)}},
}
METHODS = ("madtp", "cls-static")
RATIOS = (0.5, 0.8)
IMAGES = 64          # synthetic scenes per size: calibration and timing inputs, two captions each
ROUNDS = 5           # timed rounds; each model keeps its best (the least disturbed)
PAIRS_AT_1 = 32      # pairs timed one at a time per round
# what a pruned layer's aten calls are attributed to (--calls): the functions of the method and of the
# model's seam; pack, unpack and real_slots twice, as madtp.py calls them by the names it imported
TRACED = {madtp_module: "mag_logits concept_attention masked normalise cls_score self_score mag_score "
                        "importance threshold keep_mask batch_max_mask share_count top_k_mask "
                        "package_weights prune_tokens random_scores pack unpack real_slots",
          vlt_module: "written_out attend cls_row pack unpack real_slots padding_bias seq_of",
          MADTP: "prune_layer importance keep top_k", madtp_module.Trace: "record"}


def models_of(size, cfg, run, split, tokenizer):
    """({name: (model, madtp or None)}, {name: GFLOPs reduction}) for one size, β calibrated per target;
    M as in the preset the size comes from."""
    vcfg = VLTConfig(**dict(SIZES[size], vocab_size=len(tokenizer)))
    M = train.PRESETS["gpu"]["num_align_tokens"] if size.startswith("gpu") else MADTPConfig.num_align_tokens
    torch.manual_seed(0)
    model = VLT(vcfg).to(run.device).eval()
    models, reductions = {"dense": (model, None)}, {"dense": 0.0}
    for method in METHODS:
        for p in RATIOS:
            name = f"{method} {p:.0%}"
            madtp = MADTP(MADTPConfig(method=method, num_align_tokens=M), vcfg).to(run.device)
            madtp.beta.fill_(train.BETA_INIT)
            beta, reductions[name] = train.calibrate(replace(cfg, prune_ratio=p), run, model, madtp, split, tokenizer)
            madtp.beta.fill_(beta)
            models[name] = model, madtp.eval()
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
        setattr(owner, name, label(name, f))
    try:
        yield
    finally:
        for owner, name, f in saved:
            setattr(owner, name, f)


@torch.no_grad()
def calls_by_function(run, model, madtp, batch):
    """{function: aten calls (nested included) of one forward}, each call counted in the innermost
    labelled function it ran in ("model": in none)."""
    with labelled(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train.pair_forward(run, model, madtp, batch)
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
    for name, layer_count in layers.items():
        extra = by_function[name].copy()
        extra.subtract(by_function["dense"])
        lines.append(f"  {name}: " + ", ".join(f"{f} {n / layer_count:.1f}"
                                               for f, n in extra.most_common() if n))
    return "\n".join(lines)


def bench(cfg, run, sizes, large, show_calls=False):
    rows = []
    for size in sizes:
        vcfg = VLTConfig(**SIZES[size])
        splits = data.synthetic_splits(2, IMAGES, 2, 2, vcfg.image_size, vcfg.patch_size, seed=0)
        split = splits["val"]
        tokenizer = data.Tokenizer.build(split.captions, vcfg.max_text_len)
        run.log(f"{size}: calibrating {len(METHODS) * len(RATIOS)} models")
        models, reductions = models_of(size, cfg, run, split, tokenizer)
        one = train.bench_batches(cfg, split, tokenizer, 1, 1)[0]
        by_function = {name: calls_by_function(run, model, madtp, one)
                       for name, (model, madtp) in models.items()}
        calls = {name: sum(counts.values()) for name, counts in by_function.items()}
        layers = {name: sum(madtp.prunes(e, l) for e in ENCODERS for l in range(madtp.depths[e]))
                  for name, (_, madtp) in models.items() if madtp is not None}
        if show_calls:
            run.log(f"{size}:\n" + calls_table(by_function, layers))
        for bs in (1, large):
            batches = train.bench_batches(cfg, split, tokenizer, bs, PAIRS_AT_1 if bs == 1 else bs)
            pairs = sum(len(b[0]) for b in batches)
            run.log(f"{size}: timing at batch {bs}")
            best = train.best_times(run, models, batches, rounds=ROUNDS, warmup=1)
            for name, reduction in reductions.items():
                speedup, ideal = best["dense"] / best[name], 1 / (1 - reduction)   # dense GFLOPs / GFLOPs
                rows.append(dict(size=size, tokens=1 + vcfg.num_patches, dim=vcfg.dim,
                                 depths=f"{vcfg.vision_layers}+{vcfg.text_layers}+{vcfg.fusion_layers}",
                                 model=name, batch=bs, reduction=reduction, pairs_per_s=pairs / best[name],
                                 speedup=speedup, ideal=ideal, of_ideal=speedup / ideal,
                                 calls_per_pruned_layer=(calls[name] - calls["dense"]) / layers[name]
                                 if name in layers else None))
    return rows


def table(rows, device):
    head = ("| size | vision tokens | width | layers | model | reduction | batch | pairs/s | speedup | ideal | "
            "of ideal | more aten calls per pruned layer |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        calls = "" if r["calls_per_pruned_layer"] is None else f"{r['calls_per_pruned_layer']:.0f}"
        lines.append(f"| {r['size']} | {r['tokens']} | {r['dim']} | {r['depths']} | {r['model']} | "
                     f"{r['reduction']:.1%} | {r['batch']} | {r['pairs_per_s']:.1f} | {r['speedup']:.2f} | "
                     f"{r['ideal']:.2f} | {r['of_ideal']:.2f} | {calls} |")
    lines += ["", f"Device: {device}. Where each method breaks even (speedup >= 1 over the fused dense model):"]
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
    p.add_argument("--calls", action="store_true",
                   help="also where each pruned layer's aten calls go, by function")
    args = p.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if not sizes or set(sizes) - set(SIZES):
        train.fail(f"--sizes takes names of {', '.join(SIZES)}, got {args.sizes!r}")
    cfg = train.TrainConfig(device=args.device, out=args.out)
    with train.Run(cfg) as run:
        large = args.batch_size or (256 if run.device.type == "cuda" else 64)
        cfg = replace(cfg, eval_batch_size=large)
        rows = bench(cfg, run, sizes, large, args.calls)
        where = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else \
            f"CPU, {torch.get_num_threads()} threads"
        md = table(rows, where) + f"\n\nPeak RSS of the process: {train.peak_rss():.2f} GB"
        run.log(md)
        name = f"bench-{run.device.type}"
        train.write_json(run.out / f"{name}.json", dict(rows=rows, device=where))
        train.write_atomic(run.out / f"{name}.md", lambda tmp: tmp.write_text(md + "\n"))
        run.log(f"\nwrote {run.out / (name + '.md')} and {run.out / (name + '.json')}")


if __name__ == "__main__":
    main()
