"""Every method at every GFLOPs reduction, fine-tuned from one dense model, over several seeds.

    python -m experiments.compare --ratios 0.5,0.8 --seeds 0,1,2 --out runs/compare
    python -m experiments.compare --ratios 0.5 --arms madtp,madtp-static,cls-dynamic,cls-static --no-timed
    python -m experiments.compare --ratios 0.8 --arms madtp-static --control --prune-steps 600 --no-timed

Writes <name>.md (one row per method and target, ± the spread over seeds; "unpruned" is the
fine-tuned network evaluated with its pruning off) and <name>.json (every number of every seed) in
--out. One dense model is trained with --seed (or reused); each arm is then fine-tuned from it
with the same steps, once per seed, into <out>/seed<S>/<arm>-<p>.pt, and evaluated on the test
split. With --control, the dense model is also fine-tuned for the same steps at a 0% target (the
arm "control": cls-static, which then fuses about one token a layer into its package token): how
much of what an arm gains over dense is training the dense model had not finished. Finished
checkpoints and evaluations are reused, so an interrupted sweep continues where it stopped, and
seeds or arms can run as separate processes (each with its own --out holding a copy of dense.pt)
before one run collects them. Every other flag is train.py's, and applies to every arm.
"""

import argparse
import json
from dataclasses import asdict, replace

import torch

import data
import train
from madtp import ENCODERS, METHODS

CONTROL = "cls-static"   # the control's method: at a 0% target it keeps all but about one token a layer


def sweep(cfg, vcfg, mcfg, run, ratios, seeds, arms, name, timed=True, control=False):
    splits = train.load_splits(cfg, vcfg, run)
    tokenizer = data.Tokenizer.build(splits["train"].captions, vcfg.max_text_len)
    vcfg = replace(vcfg, vocab_size=len(tokenizer))
    test, base = splits["test"], run.out
    dense = train.stage_dense(cfg, run, vcfg, splits, tokenizer)
    # (arm, target, method, schedule); the control keeps (nearly) every token: no schedule to search
    plan = ([("dense", 0.0, None, cfg.schedule)] + ([("control", 0.0, CONTROL, "uniform")] if control else [])
            + [(arm, p, arm, cfg.schedule) for p in ratios for arm in arms])
    rows = []
    for seed in seeds:
        seed_rows, models = {}, {}
        for arm, p, method, schedule in plan:
            run.out = base / f"seed{seed}"
            run.out.mkdir(parents=True, exist_ok=True)
            acfg = replace(cfg, seed=seed, prune_ratio=p, schedule=schedule)
            model, madtp = (dense, None) if method is None else train.stage_compress(
                acfg, run, vcfg, replace(mcfg, method=method), splits, tokenizer, dense, schedules=base)
            cache = (base / "dense.eval.json") if arm == "dense" else (run.out / f"{arm}-{p:.2f}.eval.json")
            if cache.exists():   # accuracy and GFLOPs of a finished checkpoint never change
                m = json.loads(cache.read_text())
            else:
                run.log(f"evaluating {arm} at {p:.0%} (seed {seed}) on the test split")
                m = train.evaluate(acfg, run, model, madtp, test, tokenizer)
                # the fine-tuned weights with pruning off: how far stage 2 rebuilt the network around it
                m["r_mean_unpruned"] = m["r_mean"] if madtp is None else \
                    train.evaluate(acfg, run, model, None, test, tokenizer)["r_mean"]
                train.write_json(cache, m)
            key = "dense" if arm == "dense" else f"{arm} {p:.2f}"
            seed_rows[key], models[key] = dict(m, seed=seed, method=arm, target=p), (model, madtp)
        run.out = base
        if timed:   # timings are taken anew, all models of a seed in turns: every ratio is of one run
            run.log(f"timing {len(models)} models (seed {seed})")
            train.add_speed(cfg, run, seed_rows, models, test, tokenizer)
        for m in seed_rows.values():
            m["drop"] = seed_rows["dense"]["r_mean"] - m["r_mean"]
        rows += seed_rows.values()
    summary = summarise(rows, timed)
    md = table(summary, seeds, cfg.bench_batch_size, timed)
    run.log(md)
    train.write_json(base / f"{name}.json", dict(rows=rows, summary=summary, seeds=seeds, ratios=ratios,
                                                 config=asdict(cfg), madtp=asdict(mcfg), model=asdict(vcfg)))
    train.write_atomic(base / f"{name}.md", lambda tmp: tmp.write_text(md + "\n"))
    run.log(f"\nwrote {base / (name + '.md')} and {base / (name + '.json')}")
    return summary


SPEED = ("gflops_executed_batch", "pairs_per_s_batch1", "pairs_per_s_batch", "speedup_batch1", "speedup_batch",
         "ideal_speedup")


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
        for key in ("gflops_reduction", "gflops", "r_mean", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5",
                    "t2i_r10", "drop", "r_mean_unpruned") + (SPEED if timed else ()):
            row[key] = stat(lambda r: r[key])
        row["kept_per_layer"] = {e: [sum(r["kept_tokens"][e][l][0] for r in rs) / len(rs)
                                     for l in range(len(rs[0]["kept_tokens"][e]))] for e in ENCODERS}
        if "object_share" in rs[0]:
            row["object_recall"] = stat(lambda r: r["object_recall"]["per_layer"][-1])
            row["object_recall_cluttered"] = stat(lambda r: r["object_recall"]["cluttered"][-1])
            row["pearson_r"] = stat(lambda r: r["object_recall"]["pearson_r"][-1])
        out.append(row)
    return out


def table(summary, seeds, bs, timed=True):
    """<name>.md: one row per (method, target GFLOPs reduction); ± is the spread over seeds."""
    pm = (lambda v, f: f"{v[0]:{f}} ± {v[1]:{f}}") if len(seeds) > 1 else (lambda v, f: f"{v[0]:{f}}")
    cols = ["method", "target", "reduction", "GFLOPs/pair", "r_mean", "drop", "unpruned", "i2t R@1/5/10",
            "t2i R@1/5/10",
            "tokens per layer: vision \\| text \\| fusion", "object recall, all / cluttered 25%", "r(objects, kept)"]
    cols += [f"executed @{bs}", f"pairs/s @1 / @{bs}", f"speedup @1 / @{bs}", "ideal",
             f"of ideal @{bs}"] if timed else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in summary:
        truth = ([pm(r["object_recall"], ".2f") + " / " + pm(r["object_recall_cluttered"], ".2f"),
                  pm(r["pearson_r"], "+.2f")] if "object_recall" in r else ["-", "-"])
        speed = [f"{r['gflops_executed_batch'][0]:.4f}",
                 f"{r['pairs_per_s_batch1'][0]:.0f} / {r['pairs_per_s_batch'][0]:.0f}",
                 f"{r['speedup_batch1'][0]:.2f} / {r['speedup_batch'][0]:.2f}", f"{r['ideal_speedup'][0]:.2f}",
                 f"{r['speedup_batch'][0] / r['ideal_speedup'][0]:.2f}"] if timed else []
        lines.append("| " + " | ".join([
            r["method"], f"{r['target']:.0%}", pm([100 * x for x in r["gflops_reduction"]], ".1f") + "%",
            f"{r['gflops'][0]:.4f}", pm(r["r_mean"], ".1f"), pm(r["drop"], ".1f"), pm(r["r_mean_unpruned"], ".1f"),
            "/".join(f"{r[f'i2t_r{k}'][0]:.1f}" for k in train.RECALL_AT),
            "/".join(f"{r[f't2i_r{k}'][0]:.1f}" for k in train.RECALL_AT),
            " \\| ".join(" ".join(f"{k:.1f}" for k in r["kept_per_layer"][e]) for e in ENCODERS),
            *truth, *speed]) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = train.parser(__doc__.split("\n\n")[0], prog="python -m experiments.compare")
    p.add_argument("--ratios", default="0.5,0.8", help="GFLOPs reductions, comma-separated")
    p.add_argument("--seeds", default="0", help="fine-tuning seeds, comma-separated")
    p.add_argument("--arms", default="madtp,dtp-no-mag,cls-static,random", help="methods, comma-separated: "
                   + ", ".join(METHODS))
    p.add_argument("--name", default="results", help="<name>.md and <name>.json")
    p.add_argument("--timed", action=argparse.BooleanOptionalAction, default=True, help="time every model (pairs/s)")
    p.add_argument("--control", action="store_true", help="also fine-tune the dense model for the same steps at a 0% "
                   "target (the arm \"control\")")
    args = p.parse_args(argv)
    cfg, vcfg, mcfg = train.configs(args)
    ratios, seeds, arms = parse(args.ratios, float, "--ratios"), parse(args.seeds, int, "--seeds"), \
        parse(args.arms, str, "--arms")
    if not all(0 < r < 1 for r in ratios) or set(arms) - set(METHODS) or args.method or args.prune_ratio:
        train.fail(f"--ratios are reductions in (0, 1) and --arms methods of {', '.join(METHODS)} (not --method "
                   f"or --prune-ratio); got {args.ratios!r} and {args.arms!r}")
    train.check(args, cfg, vcfg, mcfg, methods=arms)
    with train.Run(cfg, resume=args.resume) as run:
        if run.distributed:
            train.fail("experiments.compare runs in one process; start it without torchrun")
        sweep(cfg, vcfg, mcfg, run, ratios, seeds, arms, args.name, args.timed, args.control)


def parse(text, kind, flag):
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        train.fail(f"{flag} takes a comma-separated list like 0.5,0.8 or 0,1,2 or madtp,cls-static, got {text!r}")
    return values


if __name__ == "__main__":
    main()
