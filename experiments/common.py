"""What the experiments share: a checkpoint restored with the data it was trained on, and a counter
of the calls that make the host wait for the device."""

from dataclasses import dataclass, fields, replace

import torch
from torch.overrides import TorchFunctionMode

import data
import train
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
    """A checkpoint's model (and MADTP), on the data it was trained on; args: the evaluation flags
    of experiments.evaluate's parser (device, out, batch sizes, coco_root), which replace the saved ones."""
    ckpt = train.load_checkpoint(path)
    saved = {k: v for k, v in ckpt["train_config"].items() if k in {f.name for f in fields(train.TrainConfig)}}
    cfg = replace(train.TrainConfig(**saved), **{k: v for k, v in vars(args).items()
                                                 if v is not None and k in saved})
    run = train.Run(cfg)
    vcfg = VLTConfig(**ckpt["vlt_config"])
    model = VLT(vcfg).to(run.device)
    model.load_state_dict(ckpt["model"])
    madtp = None
    if ckpt["kind"] == "compressed":
        madtp = MADTP(MADTPConfig(**ckpt["madtp_config"]), vcfg).to(run.device)
        madtp.load_state_dict(ckpt["madtp"])
    splits = train.load_splits(cfg, vcfg, run)
    return Restored(cfg, run, splits, data.Tokenizer.from_state_dict(ckpt["tokenizer"]), model.eval(), madtp)


def evaluation_parser(description, prog):
    """The flags every re-evaluation takes: the checkpoint, and where and how to evaluate it."""
    p = train.Parser(description=description, prog=prog)
    p.add_argument("checkpoint", help="a dense.pt or <method>-<p>.pt written by train.py")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", default="runs/eval", help="where the results go")
    for flag in ("eval-batch-size", "bench-batch-size", "bench-pairs", "num-workers"):
        p.add_argument(f"--{flag}", type=int, help="as train.py's flag of that name")
    p.add_argument("--coco-root", help="where the COCO images are now, if they moved")
    return p


class HostSyncs(TorchFunctionMode):
    """Counts the calls that make the host wait for the device: reading a value back (bool, int,
    float, item, tolist, ...) and ops whose output size depends on values (nonzero, boolean-mask
    indexing, unique). A CPU runs them for free, so a count is how to see them there; on a GPU,
    torch.cuda.set_sync_debug_mode("warn") reports the same calls."""

    READS = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero", "masked_select",
             "unique", "cpu", "numpy"}

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        index = args[1] if name in ("__getitem__", "__setitem__") else None
        if name in self.READS or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                     for i in (index if isinstance(index, tuple) else (index,))):
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self):
        return sum(self.calls.values())
