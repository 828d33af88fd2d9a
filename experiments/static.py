"""Static widths: MADTP under the batch maximum with a fixed width per pruned layer, so that a
pruned forward reads nothing on the host and a whole forward can be one CUDA graph.

    python -m experiments.static --device cuda --size gpu          # random weights, β calibrated to 50%
    python -m experiments.static runs/default/madtp-batch-max-0.50.pt   # a trained model, its test pairs

The dynamic layer reads the longest sample W on the host in every pruned layer (prune_tokens), which
drains a GPU's queue and keeps the forward's shapes data-dependent (docs/speed.md: on an H200 the
pruned forward was host-bound). Here W_l is fixed before timing: the widest the layer was over the
calibration batches, at the timed batch size, plus MARGIN slots. A layer then always outputs W_l
slots: a batch that keeps fewer is padded (masked, like caption padding); a sample that would keep
more than W_l - 2 keeps its W_l - 2 highest scores and fuses the rest into x_fuse, an overflow,
counted. Captions are padded to max_text_len, so that every input has one shape.

A second cut rides along: under bf16 autocast the pruned layers write their attention weights out
in fp32 (vlt.Attention, so that the keep decision sees fp32 weights) and cast them back for A V;
"weights bf16" keeps them in bf16 and casts only what the pruner reads, after the reduction.

Reports, on the timed batches: how far the static model's outputs (ITC embeddings, ITM logits) lie
from the dynamic one's, the overflows, the keep decisions that bf16 weights change, the host syncs
of one forward (none is the point), the FLOPs each model executes (padding included) and pairs/s
of dense and MADTP in turns, eager and, on a GPU, replayed as CUDA graphs (torch.cuda.graph: one
capture, then each batch copied in and replayed). With a checkpoint, also the test r_mean of each
pruned model. With --compile-forward, also the dense and the fixed-width model (bf16 weights) as
one torch.compile'd forward each (on a GPU in mode "reduce-overhead", which adds CUDA graphs), and
their compile times. Writes static-<device>.md and .json in --out.
"""

import contextlib
import copy
import itertools
import time
from dataclasses import replace

import torch

import train
from experiments.bench import SIZES, model_flops, models_of, scenes
from experiments.common import HostSyncs, bench_batches, best_times, evaluation_parser, restore
from madtp import ENCODERS, Trace, prune_tokens
from vlt import Attention, Weights

MARGIN = 0          # slots added to each layer's widest calibration width
ROUNDS = 5          # timed rounds, each model keeping its best
CAPTURE_WARMUP = 3  # eager passes on a side stream before a CUDA graph is captured (PyTorch's advice)
ATTENTION = Attention.forward


def capped(keep, S, C):
    """keep (B, n) cut to each sample's C highest scores where it keeps more (a score tied with the
    C-th is kept too); and how many samples had to be cut. S >= 0, exactly 0 at padding."""
    kth = torch.where(keep, S, -1.0).topk(C, dim=1).values[:, -1:]                 # (B, 1), -1 if fewer
    return keep & (S >= kth), (keep.sum(dim=1) > C).sum()


class Static:
    """Mixed into MADTP or a variant of experiments/ (static_of): its pruned layers output fixed
    widths, self.widths {encoder: [W_l]}, CLS and x_fuse included; self.overflows counts the cuts
    (while counting: compiled code whose graph writes a buffer may lose its CUDA graph)."""

    counting = True

    @property
    def spec(self):
        return dict(super().spec, widths="static")

    def prune_layer(self, encoder, trace, consts, layer, x_in, x, seq, A):
        T, inv_tau, ramp = consts
        S, keep = self.decide(encoder, layer, x_in, seq, A, trace, T, inv_tau)
        W = self.widths[encoder][layer]
        if W < x.shape[1]:   # else every sample fits: a dynamic W is at most the input's N
            keep, cut = capped(keep, S, W - 2)
            if self.counting:
                self.overflows += cut
        x, out, idx = prune_tokens(x, keep, S, ramp, min(W, x.shape[1]))
        trace.record(encoder, seq.valid, out.valid, keep, idx)
        return x, out


@torch.no_grad()
def widths_of(run, model, madtp, batches):
    """{encoder: [W_l]}: the widest each pruned layer of the dynamic model was over batches, + MARGIN."""
    widest = {e: [] for e in ENCODERS}
    for b in batches:
        trace = Trace()
        with run.autocast():
            model(*b, madtp.hooks(trace))
        for e, layers in trace.layers.items():
            seen = [r["valid_out"].shape[1] for r in layers]
            widest[e] = [max(w) for w in itertools.zip_longest(widest[e], seen, fillvalue=0)]
    return {e: [w + MARGIN for w in ws] for e, ws in widest.items()}


def static_of(madtp, widths):
    """A copy of a trained or calibrated MADTP or variant (its T, β and decision) with fixed widths."""
    static = copy.deepcopy(madtp)
    static.__class__ = type(f"Static{type(madtp).__name__}", (Static, type(madtp)), {})
    static.widths = widths
    static.register_buffer("overflows", torch.zeros((), dtype=torch.long, device=madtp.T.device), persistent=False)
    return static.eval()


def attention_low_weights(self, x, ctx, ctx_seq, weights=False):
    """vlt.Attention.forward with the written-out weights A in the logits' dtype (bf16 under
    autocast) instead of fp32: no fp32 A (B H, N, Nc) to write and read, none to cast back for
    A V; what the pruner reads (the CLS row, the max over heads) goes to fp32 after the reduction."""
    if not weights:
        return ATTENTION(self, x, ctx, ctx_seq)
    (B, N, D), Nc, H = x.shape, ctx.shape[1], self.heads
    q = self.q(x).view(B, N, H, D // H).transpose(1, 2)                           # (B, H, N, d)
    k, v = self.kv(ctx).view(B, Nc, 2, H, D // H).permute(2, 0, 3, 1, 4)         # 2 x (B, H, Nc, d)
    q, k, v = (q * self.scale).flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)   # (B H, N, d)
    logits = torch.bmm(q, k.transpose(1, 2)) if ctx_seq.bias is None else torch.baddbmm(
        ctx_seq.bias.expand(B, H, 1, Nc).flatten(0, 1), q, k.transpose(1, 2))     # (B H, N, Nc)
    A = logits.softmax(dim=-1, dtype=logits.dtype)
    out, A = torch.bmm(A, v).view(B, H, N, D // H), A.view(B, H, N, Nc)
    return self.proj(out.transpose(1, 2).reshape(B, N, D)), Weights(A[:, :, 0].float(), A.amax(dim=1).float())


@contextlib.contextmanager
def weights_dtype(low):
    """While this lasts, with low, every Attention writes its weights out in the logits' dtype."""
    Attention.forward = attention_low_weights if low else ATTENTION
    try:
        yield
    finally:
        Attention.forward = ATTENTION


def eager(run, model, madtp, low=False):
    """A forward of a batch as a user runs it, the hooks formed anew each call; low: the weights
    in the logits' dtype."""
    def forward(*batch):
        with torch.no_grad(), run.autocast(), weights_dtype(low):
            return model(*batch, madtp.hooks(Trace()) if madtp is not None else None)
    return forward


class Untraced(Trace):
    """A Trace that keeps nothing, for a forward formed once and called many times: compiled code
    would guard on the lengths of a Trace's growing lists and recompile at every call."""

    def record(self, *args, **kwargs):
        pass


def graphed(model, madtp, batch, low=False):
    """A forward captured once as a CUDA graph on batch's shapes, then replayed on each batch's
    values (copied into the captured inputs). The hooks' constants are formed before the capture:
    a graph cannot copy from the host."""
    hooks, inputs = madtp.hooks(Untraced()) if madtp is not None else None, [t.clone() for t in batch]

    def forward():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False), weights_dtype(low):
            return model(*inputs, hooks)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(CAPTURE_WARMUP):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = forward()

    def replay(*batch):
        for t, new in zip(inputs, batch):
            t.copy_(new)
        graph.replay()
        return out
    return replay


def largest_difference(a, b):
    """max |a - b| over the ITC embeddings and ITM logits of two forwards of the same batch."""
    return max((a[k].float() - b[k].float()).abs().max().item() for k in ("e_img", "e_txt", "itm"))


@torch.no_grad()
def flips(run, model, madtp, batches):
    """The share of keep decisions (valid prunable tokens, every pruned layer) that change when the
    weights are written out in the logits' dtype: madtp with fixed widths, so that layers align."""
    differ = total = 0
    for b in batches:
        traces = [Trace(), Trace()]
        for low, trace in zip((False, True), traces):
            with run.autocast(), weights_dtype(low):
                model(*b, madtp.hooks(trace))
        for e in ENCODERS:
            for r, r_low in zip(traces[0].layers[e], traces[1].layers[e]):
                v = r["valid_in"][:, 1:]
                differ, total = differ + int(((r["keep"] != r_low["keep"]) & v).sum()), total + int(v.sum())
    return differ / total


def compiled(run, model, madtp, batch, low=False):
    """The forward under torch.compile, the hooks formed once, compiled and warmed on batch's
    shapes; -> (forward, seconds it took to compile). With fixed widths a whole forward is one graph
    (no break), so inductor can fuse a pruned layer's small operators; on a GPU, mode
    "reduce-overhead" also replays it as a CUDA graph."""
    if isinstance(madtp, Static):
        madtp = copy.deepcopy(madtp)
        madtp.counting = False
    hooks = madtp.hooks(Untraced()) if madtp is not None else None
    f = torch.compile(lambda *b: model(*b, hooks), mode="reduce-overhead" if run.device.type == "cuda" else None)

    def forward(*batch):
        with torch.no_grad(), run.autocast(), weights_dtype(low):
            return f(*batch)
    start = time.perf_counter()
    for _ in range(CAPTURE_WARMUP):
        forward(*batch)
    return forward, time.perf_counter() - start


def measure(cfg, run, model, madtp, calibration, test, tokenizer, bs, rounds, evaluate=False, bf16=False,
            compile=False):
    """The report's numbers: {widths, overflows, difference, flips, host syncs, rows [(model, GFLOPs
    per pair, pairs/s)], and with evaluate, the test r_mean of the pruned models}."""
    calib = bench_batches(cfg, run, calibration, tokenizer, bs, 0, cut=False)
    timed = bench_batches(cfg, run, test, tokenizer, bs, 0, cut=False)
    static = static_of(madtp, widths_of(run, model, madtp, calib))
    out = dict(widths=static.widths, batch=bs, batches=len(timed), device=str(run.device), bf16=bf16)
    out["difference"] = max(largest_difference(eager(run, model, madtp)(*b), eager(run, model, static)(*b))
                            for b in timed)
    out["overflows"] = int(static.overflows)   # samples cut, summed over layers and batches
    out["flips"] = flips(run, model, static, timed)
    for name, m in (("host_syncs", static), ("host_syncs_dynamic", madtp)):
        with HostSyncs() as syncs:
            eager(run, model, m)(*timed[0])
        out[name] = syncs.calls
    entries = {"dense": None, "madtp": madtp, "static": static, "static, weights bf16": static}
    models = {name: eager(run, model, m, low=name.endswith("bf16")) for name, m in entries.items()}
    flops = model_flops(run, {name: (model, m) for name, m in entries.items() if not name.endswith("bf16")}, timed)
    if run.device.type == "cuda":
        models.update({f"{name}, graph": graphed(model, entries[name], timed[0], low=name.endswith("bf16"))
                       for name in ("dense", "static", "static, weights bf16")})
    out["compile_seconds"] = {}
    for name in ("dense", "static, weights bf16") if compile else ():
        models[f"{name}, compiled"], out["compile_seconds"][name] = compiled(
            run, model, entries[name], timed[0], low=name.endswith("bf16"))
    seconds, pairs = best_times(run, models, timed, rounds, warmup=1), sum(len(b[0]) for b in timed)
    base = lambda name: name.split(", ")[0]   # noqa: E731  (variants execute their model's FLOPs)
    out["rows"] = [dict(model=name, gflops=flops[base(name)] / 2e9, pairs_per_s=pairs / s)
                   for name, s in seconds.items()]   # flop_counter counts 2 per multiply-accumulate
    if evaluate:
        static.overflows.zero_()
        test_cfg = replace(cfg, eval_batch_size=bs)
        out["r_mean"] = {}
        for name, m in list(entries.items())[1:]:
            with weights_dtype(name.endswith("bf16")):
                out["r_mean"][name] = train.evaluate(test_cfg, run, model, m, test, tokenizer)["r_mean"]
        out["overflows_test"] = int(static.overflows)   # both static rows
    return out


def table(r):
    """static-<device>.md: the speed table and the checks beside it."""
    dense = {row["model"]: row["pairs_per_s"] for row in r["rows"] if row["model"].startswith("dense")}
    fastest = max(dense.values())
    lines = [f"| model | executed GFLOPs per pair | pairs/s at batch {r['batch']} | speedup over eager dense | "
             "over the fastest dense |", "|---|---|---|---|---|"]
    lines += [f"| {row['model']} | {row['gflops']:.4f} | {row['pairs_per_s']:.1f} | "
              f"{row['pairs_per_s'] / dense['dense']:.2f} | {row['pairs_per_s'] / fastest:.2f} |" for row in r["rows"]]
    lines += ["", f"Device: {r['device']}. Widths W_l (CLS and x_fuse included): " +
              "; ".join(f"{e} {' '.join(map(str, ws))}" for e, ws in r["widths"].items() if ws),
              f"Over the {r['batches']} timed batches: samples cut by a width {r['overflows']}, the largest "
              f"difference from the dynamic model's outputs {r['difference']:.2e}; host syncs of one forward: "
              f"static {r['host_syncs'] or 'none'}, dynamic {r['host_syncs_dynamic']}."]
    if r["compile_seconds"]:
        lines.append("Compiling (with 3 warm-up passes): " + ", ".join(
            f"{k} {v:.0f} s" for k, v in r["compile_seconds"].items()) + ".")
    lines.append(f"Keep decisions that change with the weights in bf16: {r['flips']:.2%}" +
                 ("." if r["bf16"] else " (no autocast here: the same model twice)."))
    if "r_mean" in r:
        lines.append(f"Test r_mean at batch {r['batch']}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["r_mean"].items())
                     + f" (samples cut by a width, both static rows: {r['overflows_test']}).")
    return "\n".join(lines)


def main(argv=None):
    p = evaluation_parser(__doc__.split("\n\n")[0], "python -m experiments.static", optional=True)
    p.add_argument("--size", choices=tuple(SIZES), default="default", help="without a checkpoint: the model size")
    p.add_argument("--ratio", type=float, default=0.5, help="without a checkpoint: the GFLOPs reduction of β")
    p.add_argument("--batch-size", type=int, help="the timed batch (default 64 on a CPU, 256 on a GPU)")
    p.add_argument("--rounds", type=int, default=ROUNDS, help="timed rounds; each model keeps its best")
    p.add_argument("--compile-forward", action="store_true", help="also the dense and the fixed-width model (bf16 "
                   "weights) under torch.compile, reduce-overhead on a GPU")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on a CPU too, as on a GPU (where the "
                   "weights' dtype matters)")
    p.set_defaults(out="runs/static")
    args = p.parse_args(argv)
    if (args.batch_size is not None and args.batch_size < 1) or args.rounds < 1:
        train.fail(f"--batch-size and --rounds must be at least 1, got {args.batch_size} and {args.rounds}")
    if args.checkpoint:
        r = restore(args.checkpoint, args)
        if r.madtp is None:
            train.fail(f"{args.checkpoint} is a dense model; give a madtp-<counts>-<p>.pt")
        cfg, run, model, madtp = r.cfg, r.run, r.model, r.madtp
        calibration, test, tokenizer = r.splits["val"], r.splits["test"], r.tokenizer
    else:
        cfg = train.TrainConfig(device=args.device, out=args.out)
        run = train.Run(cfg)
    if args.bf16:
        run.autocast = lambda: torch.autocast(run.device.type, dtype=torch.bfloat16)
    with run:
        if not args.checkpoint:
            run.log(f"{args.size}: calibrating β to {args.ratio:.0%}")
            calibration, tokenizer = scenes(args.size)
            test = calibration
            models = models_of(args.size, cfg, run, calibration, tokenizer, ("batch-max",), (args.ratio,))[0]
            model, madtp = models[f"batch-max {args.ratio:.0%}"]
        bs = args.batch_size or (256 if run.device.type == "cuda" else 64)
        r = measure(cfg, run, model, madtp, calibration, test, tokenizer, bs, args.rounds, bool(args.checkpoint),
                    bf16=args.bf16 or run.device.type == "cuda", compile=args.compile_forward)
        md = table(r)
        run.log(md)
        name = f"static-{run.device.type}"
        train.write_json(run.out / f"{name}.json", r)
        train.write_atomic(run.out / f"{name}.md", lambda tmp: tmp.write_text(md + "\n"))
        run.log(f"\nwrote {run.out / (name + '.md')} and {run.out / (name + '.json')}")
    return r


if __name__ == "__main__":
    main()
