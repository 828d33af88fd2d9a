"""What the experiments share: a checkpoint restored with the data it was trained on, the original
position of every token a pruned forward kept, and a count of the host syncs a forward makes."""

from dataclasses import dataclass, fields

import torch
from torch.overrides import TorchFunctionMode

import data
import train
from experiments.methods import Options, Variant
from madtp import MADTP, MADTPConfig
from vlt import VLT, VLTConfig


@dataclass
class Restored:
    cfg: train.TrainConfig
    run: train.Run
    splits: dict
    tokenizer: data.Tokenizer
    model: VLT
    madtp: MADTP   # None for a dense checkpoint


def restore(path, args) -> Restored:
    """A checkpoint's model (and pruner), on the data it was trained on; args: the flags of
    evaluation_parser (device, out, eval batch size, coco_root), which replace the saved ones."""
    ckpt = train.load_checkpoint(path)
    saved = {k: v for k, v in ckpt["config"]["train"].items() if k in {f.name for f in fields(train.TrainConfig)}}
    saved.update({k: v for k, v in vars(args).items() if v is not None and k in saved})
    cfg, vcfg = train.TrainConfig(**saved), VLTConfig(**ckpt["config"]["model"])
    run = train.Run(cfg)
    model = VLT(vcfg).to(run.device)
    model.load_state_dict(ckpt["model"])
    madtp = None
    if "madtp" in ckpt:
        mcfg = MADTPConfig(**ckpt["config"]["madtp"])
        spec = ckpt["pruner"]
        madtp = (Variant(mcfg, vcfg, Options(**spec)) if len(spec) > 1 else MADTP(mcfg, vcfg)).to(run.device)
        madtp.load_state_dict(ckpt["madtp"])
    splits = train.load_splits(cfg, vcfg, run)
    return Restored(cfg, run, splits, data.Tokenizer.from_state_dict(ckpt["tokenizer"]), model.eval(), madtp)


def evaluation_parser(description, prog):
    """The flags every re-evaluation takes: the checkpoint, and where and how to evaluate it."""
    p = train.Parser(description=description, prog=prog)
    p.add_argument("checkpoint", help="a dense.pt or madtp-<counts>-<p>.pt written by train.py")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", default="runs/eval", help="where the results go")
    p.add_argument("--eval-batch-size", type=int, help="as train.py's flag")
    p.add_argument("--coco-root", help="where the COCO images are now, if they moved")
    return p


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
