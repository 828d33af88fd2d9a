"""Padded or packed: the pruned model in three layouts of its token stream, timed in turns.

    python -m experiments.layouts runs/default/madtp-sample-0.50.pt     # a trained checkpoint
    python -m experiments.layouts                                       # random weights, default size

Per-sample pruning leaves every sample of a batch with its own count; the batch is padded to its
longest. Three ways to run that batch: "padded", everything on the padded grid; "packed MLP" (what
vlt.py does), the MLP on the real tokens only; "packed", also the attention's projections on the
real tokens only, scattered into the grid for attention (FlashAttention's "unpad" layout, this
project's layout before). Attention itself runs on the grid in all three. Prints pairs/s over the
dense model at batch 1 and 64, the share of real tokens among the grid's slots, and writes
layouts.json in --out. docs/speed.md, "Padded or packed".
"""

import contextlib

import torch

import data
import train
import vlt
from experiments.common import bench_batches, best_times, evaluation_parser, restore
from madtp import MADTP, MADTPConfig, Trace

ROUNDS = 5


class OnRows(torch.nn.Module):
    """A linear layer applied to the real tokens of x (B, N, D) only, its padding rows zero."""

    def __init__(self, linear, rows):
        super().__init__()
        self.linear, self.rows = linear, rows

    def forward(self, x):
        flat = x.flatten(0, 1)
        out = self.linear(flat.index_select(0, self.rows))
        return flat.new_zeros(len(flat), out.shape[-1]).index_copy(0, self.rows, out).view(*x.shape[:2], -1)


@contextlib.contextmanager
def layout(name):
    """vlt.py's Block and Attention as the named layout would run them."""
    finish, attention = vlt.Block.finish, vlt.Attention.forward

    def padded_finish(self, x, seq, image=None, image_seq=None):   # the MLP on every slot
        return finish(self, x, vlt.Seq(seq.valid, seq.bias), image, image_seq)

    def packed_attention(self, x, ctx, ctx_seq, weights=False):   # the projections on the real tokens
        if x is not ctx or ctx_seq.rows is None:
            return attention(self, x, ctx, ctx_seq, weights)
        linears = self.q, self.kv, self.proj
        self.q, self.kv, self.proj = (OnRows(m, ctx_seq.rows) for m in linears)
        try:
            return attention(self, x, ctx, ctx_seq, weights)
        finally:
            self.q, self.kv, self.proj = linears
    if name == "padded":
        vlt.Block.finish = padded_finish
    if name == "packed":
        vlt.Attention.forward = packed_attention
    try:
        yield
    finally:
        vlt.Block.finish, vlt.Attention.forward = finish, attention


@torch.no_grad()
def measure(cfg, run, model, madtp, split, tokenizer):
    rows = {}
    for bs in (1, 64):
        batches = bench_batches(cfg, run, split, tokenizer, bs, 32 if bs == 1 else 4 * bs)
        trace = Trace()
        model(*batches[-1], madtp.hooks(trace))
        share = [round(r["valid_out"].float().mean().item(), 2) for r in trace.layers["vision"]]
        best = {}
        for _ in range(ROUNDS):
            for name in ("dense", "padded", "packed MLP", "packed"):
                with layout(name):
                    best[name] = min(best.get(name, float("inf")), best_times(
                        run, {name: (model, None if name == "dense" else madtp)}, batches, rounds=1, warmup=1)[name])
        rows[bs] = dict(real_share_vision=share, **{k: best["dense"] / v for k, v in best.items()})
        run.log(f"batch {bs}: real tokens per slot, vision layers {share}; over dense: " +
                ", ".join(f"{k} {best['dense'] / v:.2f}" for k, v in best.items()))
    return rows


def main(argv=None):
    p = evaluation_parser(__doc__.split("\n\n")[0], "python -m experiments.layouts", optional=True)
    p.set_defaults(out="runs/layouts")
    args = p.parse_args(argv)
    if args.checkpoint:
        r = restore(args.checkpoint, args)
        cfg, run, model, madtp, split, tokenizer = r.cfg, r.run, r.model, r.madtp, r.splits["test"], r.tokenizer
    else:   # random weights at the default size, β calibrated to 50% on synthetic scenes, as experiments.bench
        cfg = train.TrainConfig(device=args.device, out=args.out, eval_batch_size=64, prune_ratio=0.5)
        run, split = train.Run(cfg), data.synthetic_splits(2, 64, 2)["val"]
        tokenizer = data.Tokenizer.build(split.captions, vlt.VLTConfig.max_text_len)
        torch.manual_seed(0)
        model = vlt.VLT(vlt.VLTConfig(vocab_size=len(tokenizer))).eval()
        madtp = MADTP(MADTPConfig(counts="sample"), model.cfg)
        madtp.beta.fill_(train.BETA_INIT)
        train.calibrate(cfg, run, model, madtp, split, tokenizer)
    with run:
        rows = measure(cfg, run, model, madtp.eval(), split, tokenizer)
        train.write_json(run.out / "layouts.json", dict(checkpoint=str(args.checkpoint), rows=rows))
    return rows


if __name__ == "__main__":
    main()
