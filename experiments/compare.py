"""Arms (experiments.methods.ARMS) at GFLOPs reductions, fine-tuned from one dense model, over seeds.

    python -m experiments.compare --ratios 0.5,0.8 --arms madtp-sample,madtp-batch-max,madtp-static,cls-static,random
    python -m experiments.compare --ratios 0.5 --arms madtp-static --seeds 0,1,2 --schedule searched
    python -m experiments.compare --ratios 0.5 --arms madtp-sample --taus 0.03,0.1,1   # τ of the θ rules

Writes <name>.md (one row per arm and target, ± the spread over seeds; "unpruned" is the fine-tuned
network evaluated with its pruning off) and <name>.json (every number of every seed) in --out. One
dense model is trained with --seed (or reused); each arm is then fine-tuned from it with the same
steps, once per seed, into <out>/seed<S>/<arm>-<p>.pt, and evaluated on the test split. With
--control, the dense model is also fine-tuned for the same steps at a 0% target: how much of what an
arm gains over dense is training the dense model had not finished. Finished checkpoints and
evaluations are reused, so an interrupted sweep continues where it stopped, and seeds or arms can
run as separate processes (each with its own --out holding a copy of dense.pt) before one run
collects them. Every other flag is train.py's and applies to every arm.
"""

import argparse
import json
from dataclasses import asdict, replace

import torch

import data
import train
from experiments.common import add_speed
from experiments.methods import ARMS, search_schedule, variant
from madtp import ENCODERS

SUMMED = ("gflops_reduction", "gflops", "r_mean", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
          "drop", "r_mean_unpruned")
SPEED = ("pairs_per_s_batch1", "pairs_per_s_batch", "speedup_batch1", "speedup_batch", "ideal_speedup")


def plan(cfg, run, vcfg, mcfg, splits, tokenizer, dense, ratios, arms, taus, schedule, control):
    """[(row name, target, τ, Options or None)]: dense, the control, then every arm at every target."""
    rows = [("dense", 0.0, None, None)] + [("control", 0.0, mcfg.tau, replace(ARMS["cls-static"], name="control"))] * control
    for p in ratios:
        cuts = []
        if schedule == "searched":
            cuts = search_schedule(replace(cfg, prune_ratio=p), run, vcfg, mcfg, splits["val"], tokenizer, dense,
                                   run.out / f"schedule-{p:.2f}.json")
        for arm in arms:
            for tau in taus:
                name = arm + f"-tau{tau:g}" * (len(taus) > 1) + "-searched" * (schedule == "searched")
                rows.append((name, p, tau, replace(ARMS[arm], name=name, cuts=cuts)))
    return rows


def evaluated(cfg, run, splits, tokenizer, model, madtp, cache):
    """The test metrics of a finished model, cached beside it (accuracy and GFLOPs never change)."""
    if cache.exists():
        return json.loads(cache.read_text())
    m = train.evaluate(cfg, run, model, madtp, splits["test"], tokenizer)
    # the fine-tuned weights with pruning off: how far stage 2 rebuilt the network around it
    m["r_mean_unpruned"] = m["r_mean"] if madtp is None else \
        train.evaluate(cfg, run, model, None, splits["test"], tokenizer)["r_mean"]
    train.write_json(cache, m)
    return m


def sweep(cfg, vcfg, mcfg, run, ratios, seeds, arms, taus, name, schedule, timed=True, control=False):
    splits = train.load_splits(cfg, vcfg, run)
    tokenizer = data.Tokenizer.build(splits["train"].captions, vcfg.max_text_len)
    vcfg = replace(vcfg, vocab_size=len(tokenizer))
    base, rows = run.out, []
    dense = train.stage_dense(cfg, run, vcfg, splits, tokenizer)
    arms_plan = plan(cfg, run, vcfg, mcfg, splits, tokenizer, dense, ratios, arms, taus, schedule, control)
    for seed in seeds:
        seed_rows, models = {}, {}
        for arm, p, tau, options in arms_plan:
            run.out = base / f"seed{seed}"
            run.out.mkdir(parents=True, exist_ok=True)
            acfg = replace(cfg, seed=seed, prune_ratio=p)
            # an arm's Options decide its counts: MADTPConfig.counts is held fixed, so that no
            # checkpoint's identity moves with the main path's default
            model, madtp = (dense, None) if options is None else train.stage_compress(
                acfg, run, vcfg, replace(mcfg, tau=tau, counts="sample"), splits, tokenizer, dense,
                make=variant(options))
            cache = base / "dense.eval.json" if options is None else run.out / f"{arm}-{p:.2f}.eval.json"
            key = "dense" if options is None else f"{arm} {p:.2f}"
            m = evaluated(acfg, run, splits, tokenizer, model, madtp, cache)
            seed_rows[key], models[key] = dict(m, seed=seed, method=arm, target=p), (model, madtp)
        run.out = base
        if timed:   # timings are taken anew, all models of a seed in turns: every ratio is of one run
            add_speed(cfg, run, seed_rows, models, splits["test"], tokenizer)
        for m in seed_rows.values():
            m["drop"] = seed_rows["dense"]["r_mean"] - m["r_mean"]
        rows += seed_rows.values()
    summary = summarise(rows, timed)
    md = table(summary, seeds, cfg.eval_batch_size, timed)
    run.log(md)
    train.write_json(base / f"{name}.json", dict(rows=rows, summary=summary, seeds=seeds, ratios=ratios, taus=taus,
                                                 config=asdict(cfg), madtp=asdict(mcfg), model=asdict(vcfg)))
    train.write_atomic(base / f"{name}.md", lambda tmp: tmp.write_text(md + "\n"))
    run.log(f"\nwrote {base / (name + '.md')} and {base / (name + '.json')}")
    return summary


def summarise(rows, timed=True):
    """Mean and standard deviation over seeds of every number, per (arm, target)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["target"], r["method"]), []).append(r)
    out = []
    for (target, method), rs in groups.items():
        def stat(key):
            v = torch.tensor([float(r[key]) for r in rs])
            return [v.mean().item(), v.std().item() if len(v) > 1 else 0.0]
        row = dict(method=method, target=target, seeds=len(rs), **{k: stat(k) for k in SUMMED + SPEED * timed})
        row["kept_per_layer"] = {e: [sum(r["kept_tokens"][e][l][0] for r in rs) / len(rs)
                                     for l in range(len(rs[0]["kept_tokens"][e]))] for e in ENCODERS}
        out.append(row)
    return out


def table(summary, seeds, bs, timed=True):
    """<name>.md: one row per (arm, target GFLOPs reduction); ± is the spread over seeds."""
    pm = (lambda v, f: f"{v[0]:{f}} ± {v[1]:{f}}") if len(seeds) > 1 else (lambda v, f: f"{v[0]:{f}}")
    cols = ["method", "target", "reduction", "GFLOPs/pair", "r_mean", "drop", "unpruned", "i2t R@1/5/10",
            "t2i R@1/5/10", "tokens per layer: vision \\| text \\| fusion"]
    cols += [f"pairs/s @1 / @{bs}", f"speedup @1 / @{bs}", "ideal", f"of ideal @{bs}"] if timed else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in summary:
        speed = [f"{r['pairs_per_s_batch1'][0]:.0f} / {r['pairs_per_s_batch'][0]:.0f}",
                 f"{r['speedup_batch1'][0]:.2f} / {r['speedup_batch'][0]:.2f}", f"{r['ideal_speedup'][0]:.2f}",
                 f"{r['speedup_batch'][0] / r['ideal_speedup'][0]:.2f}"] if timed else []
        lines.append("| " + " | ".join([
            r["method"], f"{r['target']:.0%}", pm([100 * x for x in r["gflops_reduction"]], ".1f") + "%",
            f"{r['gflops'][0]:.4f}", pm(r["r_mean"], ".1f"), pm(r["drop"], ".1f"), pm(r["r_mean_unpruned"], ".1f"),
            "/".join(f"{r[f'i2t_r{k}'][0]:.1f}" for k in train.RECALL_AT),
            "/".join(f"{r[f't2i_r{k}'][0]:.1f}" for k in train.RECALL_AT),
            " \\| ".join(" ".join(f"{k:.1f}" for k in r["kept_per_layer"][e]) for e in ENCODERS), *speed]) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = train.parser(__doc__.split("\n\n")[0], prog="python -m experiments.compare")
    p.add_argument("--ratios", default="0.5,0.8", help="GFLOPs reductions, comma-separated")
    p.add_argument("--seeds", default="0", help="fine-tuning seeds, comma-separated")
    p.add_argument("--arms", default="madtp-sample,dtp-no-mag,cls-static,random",
                   help="comma-separated, of: " + ", ".join(ARMS))
    p.add_argument("--taus", help="τ values for every arm, comma-separated (default: --tau's)")
    p.add_argument("--schedule", choices=("uniform", "searched"), default="uniform",
                   help="the cut weights of the fixed counts and bars: uniform, or searched on validation")
    p.add_argument("--name", default="results", help="<name>.md and <name>.json")
    p.add_argument("--timed", action=argparse.BooleanOptionalAction, default=True, help="time every model")
    p.add_argument("--control", action="store_true", help="also fine-tune the dense model at a 0%% target")
    args = p.parse_args(argv)
    cfg, vcfg, mcfg = train.configs(args)
    ratios, seeds, arms = parse(args.ratios, float, "--ratios"), parse(args.seeds, int, "--seeds"), \
        parse(args.arms, str, "--arms")
    taus = parse(args.taus, float, "--taus") if args.taus else [mcfg.tau]
    if not all(0 < r < 1 for r in ratios) or set(arms) - set(ARMS) or min(taus) <= 0 or args.prune_ratio:
        train.fail(f"--ratios are reductions in (0, 1), --taus positive and --arms of {', '.join(ARMS)} (not "
                   f"--prune-ratio); got {args.ratios!r}, {args.taus!r} and {args.arms!r}")
    with train.Run(cfg, resume=args.resume) as run:
        if run.distributed:
            train.fail("experiments.compare runs in one process; start it without torchrun")
        sweep(cfg, vcfg, mcfg, run, ratios, seeds, arms, taus, args.name, args.schedule, args.timed, args.control)


def parse(text, kind, flag):
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        train.fail(f"{flag} takes a comma-separated list like 0.5,0.8 or 0,1,2 or madtp-sample,cls-static, "
                   f"got {text!r}")
    return values


if __name__ == "__main__":
    main()
