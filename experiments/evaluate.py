"""Re-evaluate a checkpoint on the test split of the data it was trained on; optionally profile it.

    python -m experiments.evaluate runs/default/madtp-0.50.pt [--eval-batch-size 1] [--profile]
    python -m experiments.evaluate runs/default/madtp-0.50.pt --beta 0.001   # the same weights, barely pruned

Prints r_mean, GFLOPs per pair and pairs/s, and writes <out>/eval-<name>.json. With --profile, also
torch.profiler's top operators and the host syncs of one forward, unpruned and pruned, at batch 1
and at the large batch (CPU and, on a GPU, CUDA activity): where pruning saves (addmm, bmm) and
what it adds (gather, sort, small ops).
"""

from pathlib import Path

import torch

import train
from experiments.common import HostSyncs, evaluation_parser, restore

TOP_OPERATORS = 15   # rows of the profiler's table


def main(argv=None):
    p = evaluation_parser(__doc__.split("\n\n")[0], "python -m experiments.evaluate")
    p.add_argument("--profile", action="store_true", help="where the time goes, per operator")
    p.add_argument("--beta", type=float, help="a compressed checkpoint at this β instead (bars refitted "
                   "on the validation split)")
    args = p.parse_args(argv)
    r = restore(args.checkpoint, args)
    with r.run:
        if args.beta is not None:
            if r.madtp is None or not args.beta >= 0:
                train.fail(f"--beta re-prunes a compressed checkpoint at β >= 0; got {args.beta} for "
                           f"{'a dense one' if r.madtp is None else 'this one'}")
            r.madtp.beta.fill_(args.beta)
            train.fit_bars(r.cfg, r.run, r.model, r.madtp, r.splits["val"], r.tokenizer)
        m = train.evaluate(r.cfg, r.run, r.model, r.madtp, r.splits["test"], r.tokenizer)
        rows = dict(dense=dict(gflops=m["gflops_dense"]), model=m)   # the same network unpruned, for speedups
        train.add_speed(r.cfg, r.run, rows, dict(dense=(r.model, None), model=(r.model, r.madtp)),
                        r.splits["test"], r.tokenizer)
        if r.madtp is not None:
            m.update(method=r.madtp.cfg.method, beta=float(r.madtp.beta), tau=r.madtp.cfg.tau)
        out = r.run.out / f"eval-{Path(args.checkpoint).stem}.json"
        r.run.log(f"{args.checkpoint}: r_mean {m['r_mean']:.2f}, GFLOPs per pair {m['gflops']:.4f} (reduction "
                  f"{m['gflops_reduction']:.1%}), pairs/s {m['pairs_per_s_batch1']:.0f} at batch 1, "
                  f"{m['pairs_per_s_batch']:.0f} at batch {r.cfg.bench_batch_size}; writing {out}")
        train.write_json(out, m)
        if args.profile:
            profile(r)
    return m


@torch.no_grad()
def profile(r):
    run, cuda = r.run, r.run.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    for bs in (1, r.cfg.bench_batch_size):
        batches = train.bench_batches(r.cfg, r.splits["test"], r.tokenizer, bs)
        for name, madtp in (("unpruned", None), ("pruned", r.madtp)):
            for b in batches[:train.WARMUP_RUNS]:
                train.pair_forward(run, r.model, madtp, b)
            with HostSyncs() as syncs:
                train.pair_forward(run, r.model, madtp, batches[0])
            with torch.profiler.profile(activities=activities) as prof:
                for b in batches:
                    train.pair_forward(run, r.model, madtp, b)
                run.sync()
            ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / len(batches)
            run.log(f"\n{name}, batch {bs}, {sum(len(b[0]) for b in batches)} pairs; per forward: "
                    f"{ops:.0f} aten calls (nested included), {syncs.total} host syncs {syncs.calls}")
            run.log(prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                              row_limit=TOP_OPERATORS))


if __name__ == "__main__":
    main()
