"""What the experiments share: a checkpoint restored with the data it was trained on, models timed
in turns, the original position of every token a pruned forward kept, and a count of the host
syncs a forward makes."""

import math
import time
from dataclasses import dataclass, fields

import torch
from torch.overrides import TorchFunctionMode

import data
import train
from experiments.methods import Options, Variant
from madtp import MADTP, MADTPConfig, Trace
from vlt import VLT, VLTConfig


@dataclass
class Restored:
    cfg: train.TrainConfig
    run: train.Run
    splits: dict
    tokenizer: data.Tokenizer
    model: VLT
    madtp: MADTP   # None for a dense checkpoint


def unfinished(ckpt):
    """Whether a checkpoint was saved mid-stage (a dense model before its last step, a compressed one
    before β's calibration): a main job stopped early leaves one."""
    return not ckpt.get("calibrated") if "madtp" in ckpt else ckpt["step"] < ckpt["config"]["train"]["dense_steps"]


def saved_config(ckpt, args=None):
    """The TrainConfig a checkpoint was trained with; args: flags of evaluation_parser (device, out,
    eval batch size, coco_root), which replace the saved ones."""
    saved = {k: v for k, v in ckpt["config"]["train"].items() if k in {f.name for f in fields(train.TrainConfig)}}
    saved.update({k: v for k, v in (vars(args) if args else {}).items() if v is not None and k in saved})
    return train.TrainConfig(**saved)


def load(path, run=None, args=None, ckpt=None):
    """(TrainConfig, model, pruner or None, tokenizer) of a checkpoint, on run's device; ckpt: the
    checkpoint already read from path, so that a large one is read once."""
    ckpt = train.load_checkpoint(path) if ckpt is None else ckpt
    if unfinished(ckpt):
        train.fail(f"{path} was saved mid-training (step {ckpt['step']}); finish it first: train.py with "
                   "the same flags resumes it (--resume)")
    cfg, vcfg, device = saved_config(ckpt, args), VLTConfig(**ckpt["config"]["model"]), run.device if run else "cpu"
    model = VLT(vcfg).to(device)
    model.load_state_dict(ckpt["model"])
    madtp = None
    if "madtp" in ckpt:
        mcfg, spec = MADTPConfig(**ckpt["config"]["madtp"]), ckpt.get("pruner", {})
        madtp = (Variant(mcfg, vcfg, Options(**spec)) if len(spec) > 1 else MADTP(mcfg, vcfg)).to(device)
        madtp.load_state_dict(ckpt["madtp"])
    return cfg, model.eval(), madtp, data.Tokenizer.from_state_dict(ckpt["tokenizer"])


def restore(path, args) -> Restored:
    """A checkpoint's model (and pruner) in a Run of its own, on the data it was trained on."""
    ckpt = train.load_checkpoint(path)
    run = train.Run(saved_config(ckpt, args))
    cfg, model, madtp, tokenizer = load(path, run, args, ckpt)
    return Restored(cfg, run, train.load_splits(cfg, model.cfg, run), tokenizer, model, madtp)


def evaluation_parser(description, prog, optional=False):
    """The flags every re-evaluation takes: the checkpoint (optional: random weights without one),
    and where and how to evaluate it."""
    p = train.Parser(description=description, prog=prog)
    p.add_argument("checkpoint", nargs="?" if optional else None,
                   help="a dense.pt or madtp-<counts>-<p>.pt written by train.py")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", default="runs/eval", help="where the results go")
    p.add_argument("--eval-batch-size", type=int, help="as train.py's flag")
    p.add_argument("--coco-root", help="where the COCO images are now, if they moved")
    return p


WARMUP_RUNS, TIMING_ROUNDS = 3, 3   # timed passes discarded; rounds of which each model keeps its best
BENCH_PAIRS = 128                   # pairs timed at batch 1; at the large batch, 4 batches


def bench_batches(cfg, run, split, tokenizer, batch_size, n, cut=True):
    """n test pairs (at least 4 batches), on the device, each batch cut to its longest caption
    (cut=False: every batch as wide as the tokenizer's longest, one shape for all)."""
    c_of = [c % len(split.captions) for c in range(max(n, 4 * batch_size))]
    images = torch.stack([split.image(split.txt2img[c]) for c in c_of])
    ids, valid = tokenizer.encode([split.captions[c] for c in c_of])
    return [tuple(t.to(run.device) for t in (images[i:i + batch_size], ids[i:i + batch_size, :N],
                                              valid[i:i + batch_size, :N]))
            for i in range(0, len(c_of), batch_size)
            for N in [int(valid[i:i + batch_size].sum(1).max()) if cut else valid.shape[1]]]


@torch.no_grad()
def best_times(run, models, batches, rounds=TIMING_ROUNDS, warmup=WARMUP_RUNS):
    """{name: seconds} of a pass over batches (on the device) for each of models {name: (model,
    madtp or None), or a function of a batch}: the models take turns round after round and each
    keeps its best round (on a shared machine, the least disturbed), warm-up discarded, the device
    synchronised."""
    def forward(entry, batch):
        if callable(entry):
            return entry(*batch)
        model, madtp = entry
        with run.autocast():   # the dense model without hooks, as a user would run it
            return model(*batch, madtp.hooks(Trace()) if madtp is not None else None)
    def sync():
        if run.device.type == "cuda":
            torch.cuda.synchronize()
    best = {}
    for entry in models.values():
        if not callable(entry):
            entry[0].eval()
        for b in batches[:warmup]:
            forward(entry, b)
    for _ in range(rounds):
        for name, entry in models.items():
            sync()
            start = time.perf_counter()
            for b in batches:
                forward(entry, b)
            sync()
            best[name] = min(best.get(name, math.inf), time.perf_counter() - start)
    return best


def add_speed(cfg, run, rows, models, split, tokenizer, pairs=BENCH_PAIRS):
    """Pairs/s of whole pairs (image, caption, fusion) at batch 1 and eval_batch_size, the models
    timed in turns; speedups over rows["dense"], and the ideal one (dense GFLOPs / GFLOPs)."""
    for key, bs, n in (("batch1", 1, pairs), ("batch", cfg.eval_batch_size, 0)):
        batches = bench_batches(cfg, run, split, tokenizer, bs, n)
        for name, seconds in best_times(run, models, batches).items():
            rows[name][f"pairs_per_s_{key}"] = sum(len(b[0]) for b in batches) / seconds
    for m in rows.values():
        for key in ("batch1", "batch"):
            m[f"speedup_{key}"] = m[f"pairs_per_s_{key}"] / rows["dense"][f"pairs_per_s_{key}"]
        m["ideal_speedup"] = rows["dense"]["gflops"] / m["gflops"]


def positions(trace, encoder, start=None):
    """[(B, W_l) per layer l]: the original index of every token a sample holds after each layer of
    the encoder, -1 for a package token or padding. start (B, N): the original index of each input
    slot (for the fusion encoder, the text encoder's last positions); default 0..N-1."""
    records, out = trace.layers[encoder], []
    valid = records[0]["valid_in"]
    pos = start if start is not None else torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    pos = pos.masked_fill(~valid, -1)
    for r in records:
        if r["idx"] is not None:
            count = r["keep"].sum(dim=1, keepdim=True)                                  # (B, 1)
            slot = torch.arange(r["idx"].shape[1], device=pos.device)                   # (W-1,)
            kept = pos[:, 1:].gather(1, r["idx"]).masked_fill(slot >= count, -1)        # (B, W-1)
            pos = torch.cat([pos[:, :1], kept], dim=1)
        out.append(pos)
    return out


class HostSyncs(TorchFunctionMode):
    """Counts what makes the host wait for the device in a block of code. torch.profiler sees every
    read of a scalar (aten::_local_scalar_dense: item, int, bool, and ATen's own, e.g. indexing with a
    0-d tensor) and every output sized by values (aten::nonzero: boolean masks); a TorchFunctionMode
    sees the reads that copy whole tensors (tolist, cpu, numpy), which on a CPU reach no operator. A
    CPU runs them all for free, so a count is how to see them there; on a GPU,
    torch.cuda.set_sync_debug_mode("warn") reports the same calls."""

    EVENTS, READS = ("aten::_local_scalar_dense", "aten::nonzero"), ("tolist", "cpu", "numpy")

    def __enter__(self):
        self.calls, self.prof = {}, torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self.prof.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.prof.__exit__(*exc)
        for e in self.prof.events():
            if e.name in self.EVENTS:
                self.calls[e.name] = self.calls.get(e.name, 0) + 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self):
        return sum(self.calls.values())
