"""Where a compressed model's accuracy goes: the same weights re-evaluated with one thing changed.

    python -m experiments.decompose runs/default/madtp-0.50.pt

Rows, each an evaluation on the test split with the checkpoint's weights, β and frozen bars:
- which encoders prune (every subset of vision, text and fusion);
- fixed counts, in the vision encoder or in every encoder: every sample keeps ceil(n ρ_ℓ) of its n
  tokens, the share its layer keeps on average, ranked by the same scores (the schedule without
  per-sample counts); for a fixed-count method, per-sample counts instead, at the same β;
- on synthetic scenes, in the vision encoder at fixed counts: the scene's object patches ranked
  first (a perfect ranking); counts proportional to the scene's object patches, the same share
  per layer on average (perfect per-sample counts), with the model's ranking or the perfect one.
Writes decompose-<name>.md and .json in --out.
"""

from dataclasses import replace
from pathlib import Path

import torch

import train
from experiments.common import evaluation_parser, restore
from madtp import ENCODERS, MADTP
from vlt import PruneHook


class Variant(MADTP):
    """The checkpoint's MADTP with the decomposition's switches. objects (I, P) bool: which patches of
    each test image show an object; images are evaluated once each, in order, so that the k-th image
    the vision encoder sees is test image k."""

    def __init__(self, madtp, vcfg, encoders=ENCODERS, fixed=(), truth=False, proportional=False, objects=None):
        super().__init__(replace(madtp.cfg, **{f"prune_{e}": e in encoders for e in ENCODERS},
                                 **{f"dynamic_{e}": getattr(madtp.cfg, f"dynamic_{e}") and e not in fixed
                                    for e in ENCODERS}), vcfg)
        self.load_state_dict(madtp.state_dict())
        self.truth, self.proportional, self.objects, self.seen = truth, proportional, objects, 0

    def hooks(self, trace):
        self.trace = trace
        return super().hooks(trace)

    def hook(self, encoder, trace):
        inner = super().hook(encoder, trace)

        def prune(layer, x_in, x, seq, A):   # which test images this vision batch holds
            if encoder == "vision" and layer == 0:
                self.rows = torch.arange(self.seen, self.seen + len(seq.valid))
                self.seen += len(seq.valid)
            return inner.prune(layer, x_in, x, seq, A)
        return PruneHook(prune, inner.reads)

    def top_k(self, encoder, layer, S, v, k):
        if encoder != "vision" or not (self.truth or self.proportional):
            return super().top_k(encoder, layer, S, v, k)
        valid = torch.cat([torch.ones_like(v[:, :1]), v], dim=1)
        patch = self.trace.slots("vision", valid)[:, 1:] - 1                       # (B, n) -1: package, padding
        objects = self.objects[self.rows.to(self.objects.device)]                  # (B, P)
        on_object = objects.gather(1, patch.clamp_min(0)) & (patch >= 0)           # (B, n)
        if self.proportional and layer == self.cfg.first_layer:   # later layers keep their share of these
            count = objects.sum(dim=1).float()
            k = (k * count / count.mean()).round().long().clamp(1, None)
        return super().top_k(encoder, layer, S + on_object.float() if self.truth else S, v, k)


def rows_of(r):
    """(label, Variant or None) for every row of the decomposition."""
    madtp, vcfg, test = r.madtp, r.model.cfg, r.splits["test"]
    subsets = [ENCODERS, ("vision",), ("text",), ("fusion",), ("text", "fusion"), ("vision", "text"),
               ("vision", "fusion"), ()]
    rows = [((" + ".join(s) or "none") + (" (as trained)" if s == ENCODERS else ""), Variant(madtp, vcfg, s))
            for s in subsets]
    if r.madtp.counts == "share":   # a fixed-count method: per-sample counts instead, bars fitted on validation
        dynamic = Variant(madtp, vcfg)
        dynamic.counts = "theta"
        train.fit_bars(r.cfg, r.run, r.model, dynamic.to(r.run.device), r.splits["val"], r.tokenizer)
        rows.append(("per-sample counts in every encoder (bars fitted on validation)", dynamic))
    else:
        rows += [("vision at fixed counts: every sample its layer's share", Variant(madtp, vcfg, fixed=("vision",))),
                 ("every encoder at fixed counts", Variant(madtp, vcfg, fixed=ENCODERS))]
    if test.object_masks is not None:
        o = dict(fixed=("vision",), objects=test.object_masks)
        rows += [("vision: object patches first, fixed counts", Variant(madtp, vcfg, truth=True, **o)),
                 ("vision: counts proportional to object patches", Variant(madtp, vcfg, proportional=True, **o)),
                 ("vision: object patches first, proportional counts",
                  Variant(madtp, vcfg, truth=True, proportional=True, **o))]
    return rows


def table(results):
    head = ["variant", "r_mean", "vs as trained", "reduction", "GFLOPs vision / text / fusion",
            "vision tokens per layer", "object recall, all / cluttered 25%", "r(objects, kept)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = results[0][1]["r_mean"]
    for label, m in results:
        truth = ([f"{m['object_recall']['per_layer'][-1]:.2f} / {m['object_recall']['cluttered'][-1]:.2f}",
                  f"{m['object_recall']['pearson_r'][-1]:+.2f}"] if "object_recall" in m else ["-", "-"])
        lines.append("| " + " | ".join([
            label, f"{m['r_mean']:.2f}", f"{m['r_mean'] - base:+.2f}", f"{m['gflops_reduction']:.1%}",
            " / ".join(f"{m[f'gflops_{e}']:.4f}" for e in ENCODERS),
            " ".join(f"{mu:.1f}" for mu, _ in m["kept_tokens"]["vision"]), *truth]) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = evaluation_parser(__doc__.split("\n\n")[0], "python -m experiments.decompose")
    args = p.parse_args(argv)
    r = restore(args.checkpoint, args)
    with r.run:
        if r.madtp is None:
            train.fail(f"{args.checkpoint} is a dense model: decompose a compressed one (<method>-<p>.pt)")
        if r.madtp.cfg.budget != "layer":
            train.fail("the decomposition needs the layer budget's shares; this checkpoint has --budget global")
        results = []
        for label, variant in rows_of(r):
            r.run.log(f"evaluating: {label}")
            results.append((label, train.evaluate(r.cfg, r.run, r.model, variant.to(r.run.device).eval(),
                                                  r.splits["test"], r.tokenizer)))
        md = table(results)
        r.run.log(md)
        name = f"decompose-{Path(args.checkpoint).stem}"
        train.write_json(r.run.out / f"{name}.json", dict(checkpoint=str(args.checkpoint), rows=[
            dict(variant=label, **m) for label, m in results]))
        train.write_atomic(r.run.out / f"{name}.md", lambda tmp: tmp.write_text(md + "\n"))
        r.run.log(f"wrote {r.run.out / name}.md and .json")
    return results


if __name__ == "__main__":
    main()
