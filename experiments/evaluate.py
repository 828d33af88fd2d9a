"""Re-evaluate a checkpoint on the test split of the data it was trained on; optionally profile it.

    python -m experiments.evaluate runs/default/madtp-sample-0.50.pt [--eval-batch-size 1] [--profile]
    python -m experiments.evaluate runs/default/madtp-sample-0.50.pt --beta 0.001   # the same weights, barely pruned

Prints r_mean, GFLOPs per pair and pairs/s (against the same network unpruned), and writes
<out>/eval-<name>.json. With --profile, also torch.profiler's top operators, the aten calls and the
host syncs of one forward, unpruned and pruned, at batch 1 and at the evaluation batch (CPU and, on
a GPU, CUDA activity): where pruning saves (addmm, bmm) and what it adds (gather, sort, small ops).
"""

import argparse
from pathlib import Path

import torch

import train
from experiments.common import HostSyncs, add_speed, bench_batches, best_times, evaluation_parser, restore
from madtp import Trace

TOP_OPERATORS = 15   # rows of the profiler's table


def main(argv=None):
    p = evaluation_parser(__doc__.split("\n\n")[0], "python -m experiments.evaluate")
    p.add_argument("--profile", action="store_true", help="where the time goes, per operator")
    p.add_argument("--beta", type=float, help="a compressed checkpoint at this β instead")
    p.add_argument("--timed", action=argparse.BooleanOptionalAction, default=True,
                   help="also pairs/s against the same network unpruned")
    args = p.parse_args(argv)
    r = restore(args.checkpoint, args)
    with r.run:
        if args.beta is not None:
            if r.madtp is None or not args.beta >= 0:
                train.fail(f"--beta re-prunes a compressed checkpoint at β >= 0; got {args.beta} for "
                           f"{'a dense one' if r.madtp is None else 'this one'}")
            r.madtp.beta.fill_(args.beta)
        m = train.evaluate(r.cfg, r.run, r.model, r.madtp, r.splits["test"], r.tokenizer)
        if args.timed:   # against the same network unpruned
            rows = dict(dense=dict(gflops=m["gflops"] / (1 - m["gflops_reduction"])), model=m)
            add_speed(r.cfg, r.run, rows, dict(dense=(r.model, None), model=(r.model, r.madtp)),
                      r.splits["test"], r.tokenizer)
        if r.madtp is not None:
            m.update(pruner=r.madtp.spec, beta=float(r.madtp.beta), tau=r.madtp.cfg.tau)
        out = r.run.out / f"eval-{Path(args.checkpoint).stem}.json"
        speed = (f", pairs/s {m['pairs_per_s_batch1']:.0f} at batch 1, {m['pairs_per_s_batch']:.0f} at batch "
                 f"{r.cfg.eval_batch_size}") if args.timed else ""
        r.run.log(f"{args.checkpoint}: r_mean {m['r_mean']:.2f}, GFLOPs per pair {m['gflops']:.4f} (reduction "
                  f"{m['gflops_reduction']:.1%}){speed}; writing {out}")
        train.write_json(out, m)
        if args.profile:
            profile(r)
    return m


@torch.no_grad()
def profile(r):
    run, cuda = r.run, r.run.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * cuda
    models = dict(unpruned=(r.model, None), pruned=(r.model, r.madtp))
    for bs in (1, r.cfg.eval_batch_size):
        batches = bench_batches(r.cfg, run, r.splits["test"], r.tokenizer, bs, 4)
        for name, (model, madtp) in models.items():
            best_times(run, {name: (model, madtp)}, batches, rounds=0)   # the warm-up only
            hooks = (lambda: madtp.hooks(Trace())) if madtp is not None else (lambda: None)
            with HostSyncs() as syncs, run.autocast():
                model(*batches[0], hooks())
            with torch.profiler.profile(activities=activities) as prof, run.autocast():
                for b in batches:
                    model(*b, hooks())
                torch.cuda.synchronize() if cuda else None
            ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / len(batches)
            run.log(f"\n{name}, batch {bs}: per forward {ops:.0f} aten calls (nested included), {syncs.total} host "
                    f"syncs {syncs.calls}")
            run.log(prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                              row_limit=TOP_OPERATORS))


if __name__ == "__main__":
    main()
