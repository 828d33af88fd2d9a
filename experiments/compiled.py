"""--compile on this machine: the dense model and MADTP, eager against compiled, in turns.

    python -m experiments.compiled                                     # random weights, default size
    python -m experiments.compiled --device cuda --size gpu            # random weights, the gpu preset's
    python -m experiments.compiled runs/default/madtp-sample-0.50.pt   # a trained model, its test pairs

train.py --compile compiles the two halves of a block (vlt.compile_blocks) and the pruned layer's
decision (madtp.compile_pruner), once for all layers, with dynamic shapes. Here both the eager and
the compiled functions are kept, and each round times the dense model and the pruned one under
each, at batch 1 and at the large batch; the compile time is the wall time of the first passes
that compile (every shape that needs a graph). Prints the table and writes compiled.json in --out;
docs/speed.md, "Compiled".
"""

import time

import torch

import data
import madtp as madtp_module
import train
import vlt
from experiments.bench import IMAGES, SIZES
from experiments.common import bench_batches, best_times, evaluation_parser, restore
from madtp import MADTP, MADTPConfig

ROUNDS = 5
FUNCTIONS = ((vlt.Block, "attend"), (vlt.Block, "finish"), (madtp_module, "dtp_layer"))


def switch(compiled):
    """Bind the compiled or the eager functions (compiled: {(owner, name): function})."""
    for (owner, name), f in compiled.items():
        setattr(owner, name, f)


def main(argv=None):
    p = evaluation_parser(__doc__.split("\n\n")[0], "python -m experiments.compiled", optional=True)
    p.add_argument("--size", choices=tuple(SIZES), default="default", help="as experiments.bench's, random weights")
    p.set_defaults(out="runs/compiled")
    args = p.parse_args(argv)
    if args.checkpoint:
        r = restore(args.checkpoint, args)
        cfg, run, model, madtp, split, tokenizer = r.cfg, r.run, r.model, r.madtp, r.splits["test"], r.tokenizer
    else:   # random weights, β calibrated to 50% on synthetic scenes, as experiments.bench
        gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        cfg = train.TrainConfig(device=args.device, out=args.out, prune_ratio=0.5,
                                eval_batch_size=args.eval_batch_size or (256 if gpu else 64))
        vcfg = vlt.VLTConfig(**SIZES[args.size])
        run, split = train.Run(cfg), data.synthetic_splits(2, IMAGES, 2, image_size=vcfg.image_size,
                                                            patch_size=vcfg.patch_size)["val"]
        tokenizer = data.Tokenizer.build(split.captions, vcfg.max_text_len)
        torch.manual_seed(0)
        model = vlt.VLT(vlt.VLTConfig(**SIZES[args.size], vocab_size=len(tokenizer))).to(run.device).eval()
        M = train.PRESETS["gpu"]["num_align_tokens"] if args.size.startswith("gpu") else MADTPConfig.num_align_tokens
        madtp = MADTP(MADTPConfig(counts="sample", num_align_tokens=M), model.cfg).to(run.device)
        madtp.beta.fill_(train.BETA_INIT)
        train.calibrate(cfg, run, model, madtp, split, tokenizer)
    models = dict(dense=(model, None), madtp=(model, madtp.eval()))
    eager = {(owner, name): getattr(owner, name) for owner, name in FUNCTIONS}
    compiled = {k: torch.compile(f, dynamic=True) for k, f in eager.items()}
    with run:
        batches = {bs: bench_batches(cfg, run, split, tokenizer, bs, 32 if bs == 1 else 4 * bs)
                   for bs in (1, cfg.eval_batch_size)}
        switch(compiled)
        start = time.perf_counter()
        for bs in batches:   # every shape compiles here, for both models
            best_times(run, models, batches[bs], rounds=0, warmup=len(batches[bs]))
        compile_s, best = time.perf_counter() - start, {}
        for _ in range(ROUNDS):
            for mode, functions in (("eager", eager), ("compiled", compiled)):
                switch(functions)
                for bs, b in batches.items():
                    for name, seconds in best_times(run, models, b, rounds=1, warmup=1).items():
                        key = (name, bs, mode)
                        best[key] = min(best.get(key, float("inf")), seconds / sum(len(x[0]) for x in b))
        switch(eager)
        rows = [dict(model=name, batch=bs, eager=1 / best[(name, bs, "eager")],
                     compiled=1 / best[(name, bs, "compiled")]) for name in models for bs in batches]
        lines = ["| model | batch | eager pairs/s | compiled pairs/s | compiled / eager |", "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['batch']} | {r['eager']:.1f} | {r['compiled']:.1f} | "
                  f"{r['compiled'] / r['eager']:.2f} |" for r in rows]
        lines.append(f"\nCompile time (the first passes at every shape, both models): {compile_s:.0f} s; device "
                     f"{run.device}, {torch.get_num_threads()} threads")
        run.log("\n".join(lines))
        train.write_json(run.out / "compiled.json", dict(checkpoint=str(args.checkpoint), rows=rows,
                                                         compile_seconds=compile_s))
    return rows


if __name__ == "__main__":
    main()
