"""The research variants of MADTP: other scores, other count rules, schedules, switches.

They reach the method through its one seam (madtp.MADTP.decide, the scores and keep decision of a
layer, with `overhead`, its MACs, and `spec`, its name): a `Variant` is a MADTP whose decide
follows its `Options`. Nothing on the main path knows about them; train.stage_compress builds one
when handed `make=variant(...)`.

Scores: "S" (MADTP's), "S_cls+S_self" (without MAG: dtp-no-mag), "S_cls" (EViT-like), "random" (a
fixed random number per position: does importance matter at all). Counts: "theta" (the paper's,
S_j > β θ_b), "batch-max" (the official code's), "fixed" (ceil(n ρ_ℓ) of each sample's n tokens, the
static methods) and "bars" (S_j / θ_b above a per-layer bar β_ℓ refitted on every batch so that layer
ℓ keeps the share ρ_ℓ of the batch's tokens: this project's earlier default; a sample's count depends
on its batch-mates, as under batch-max). ρ_ℓ = (1 + β)^(-w_ℓ), with the schedule's cut weights w_ℓ
(uniform: 1; searched: search_schedule). Switches: which encoders prune, which keep θ counts (the
others fixed), the first layer that prunes, and count_range R (θ counts clamped to [1/R, R] times
the fixed count). docs/budget.md and docs/findings.md say what each was for.
"""

import json
import math
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

import train
from madtp import (ENCODERS, MADTP, Trace, batch_max, cls_score, concept_attention, concept_features, importance,
                   keep_mask, mag_logits, mag_score, normalise, realised_reduction, self_score, threshold)
from vlt import PruneHook, full_precision, task_loss

SCORES = ("S", "S_cls+S_self", "S_cls", "random")
COUNTS = ("theta", "batch-max", "fixed", "bars")
RANDOM_SEED = 1234    # the random score's fixed table (random_table)
SEARCH_STEP = 0.5     # a schedule-search step deepens one layer's cut: its share times 2^-0.5
SEARCH_PAIRS = 256    # validation pairs that score each candidate schedule


@dataclass
class Options:
    name: str                                  # the arm's name: checkpoints, tables
    score: str = "S"                           # one of SCORES
    counts: str = "theta"                      # one of COUNTS
    prune: tuple = ENCODERS                    # the encoders that prune
    dynamic: tuple = ENCODERS                  # of those, the ones with θ counts (the others fixed)
    first_layer: int = 0                       # layers before it, in every encoder, keep every token
    count_range: float = 0.0                   # R > 1: θ counts within [1/R, R] x the fixed count; 0: free
    cuts: list = field(default_factory=list)   # the schedule's cut weights (E, L); []: uniform, all 1


# the arms of the comparisons (README, docs/findings.md): the paper's four, the 2 x 2 of score x count
# rule, and the two count rules of the main job
ARMS = {
    "madtp-sample": Options("madtp-sample"),
    "madtp-batch-max": Options("madtp-batch-max", counts="batch-max"),
    "madtp-static": Options("madtp-static", counts="fixed"),
    "madtp-bars": Options("madtp-bars", counts="bars"),
    "dtp-no-mag": Options("dtp-no-mag", score="S_cls+S_self"),
    "cls-static": Options("cls-static", score="S_cls", counts="fixed"),
    "cls-dynamic": Options("cls-dynamic", score="S_cls"),
    "random": Options("random", score="random"),
}


def top_k_mask(S, v, k):
    """Each sample's k highest-scoring valid tokens (k a tensor, () or (B,)): the fixed-count
    arms' rule. (B, n) bool"""
    rank = torch.where(v, S, -1.0).argsort(dim=1, descending=True).argsort(dim=1)   # (B, n)
    return (rank < k[..., None]) & v


def variant(options: Options):
    """make(mcfg, vcfg) for train.stage_compress."""
    return lambda mcfg, vcfg: Variant(mcfg, vcfg, options)


def keep_share(beta, cut=1.0):
    """ρ_ℓ = (1 + β)^(-w_ℓ): the share of its input tokens layer ℓ keeps under cut weight w_ℓ."""
    return 1 / (1 + beta) ** cut


def share_count(n, beta, cut=1.0):
    """Fixed counts: ceil(n ρ_ℓ) of each sample's n tokens, written as a division so that a whole
    n (1 + β)^(-w) is not pushed up by rounding. n (B,) -> (B,)"""
    return torch.minimum(torch.ceil(n / (1 + beta) ** cut), n).long()


def share_threshold(statistic, v, rho):
    """The bar above which the share ρ of the batch's valid tokens lies, pooled over the batch.
    Nothing read on the host: the bar is gathered with a one-element index (indexing with a 0-d
    tensor would read it)."""
    s = torch.where(v, statistic, -math.inf).flatten().sort(descending=True).values   # (B * n,) valid first
    count = v.sum()
    # round: ρ = 0.4 in float32 times 80 is 32.0000005; double, as Python's float would be
    k = torch.ceil(torch.round(torch.as_tensor(rho, dtype=torch.float64) * count, decimals=4)).long()
    return torch.where(k < count, s.gather(0, k.clamp(max=len(s) - 1).view(1)).view(()), -math.inf)


def random_table(depths, max_tokens):
    """The random score: a fixed pseudo-random number per (encoder, layer, k) for the k-th valid token
    of a sample, blind to content; indexed by k, never by slot, so that a sample's result never
    depends on its batch. Drawn on the CPU (the same on every device). (E, L, max_tokens)"""
    table = torch.zeros(len(ENCODERS), max(depths), max_tokens)
    for e in range(len(ENCODERS)):
        for layer in range(max(depths)):
            g = torch.Generator().manual_seed(RANDOM_SEED + 1000 * e + layer)
            table[e, layer] = torch.rand(max_tokens, generator=g)
    return table


class Variant(MADTP):
    """MADTP with another score, count rule, schedule or switches (Options)."""

    def __init__(self, mcfg, vcfg, options: Options):
        super().__init__(mcfg, vcfg)
        self.options, o = options, options
        depths = (vcfg.vision_layers, vcfg.text_layers, vcfg.fusion_layers)
        self.depths = dict(zip(ENCODERS, depths))
        self.concepts = o.score in ("S", "random") or o.counts in ("theta", "batch-max", "bars")
        self.aligned = o.score == "S"   # only a score that uses the concepts trains them (L_align)
        self.register_buffer("cuts", torch.tensor(o.cuts) if o.cuts else torch.ones(len(ENCODERS), max(depths)))
        self.register_buffer("random", random_table(depths, self.max_tokens), persistent=False)

    @property
    def spec(self):
        return asdict(self.options)

    def prunes(self, encoder, layer):
        return encoder in self.options.prune and layer >= self.options.first_layer

    def hooks(self, trace):
        return {e: self.hook(e, h, trace) for e, h in super().hooks(trace).items()}

    def hook(self, encoder, inner, trace):
        def prune(layer, x_in, x, seq, A):
            if self.prunes(encoder, layer):
                return inner.prune(layer, x_in, x, seq, A)
            if trace.features and self.aligned and encoder != "fusion":   # keeps every token, feeds L_align
                X = x_in[:, 1:]
                trace.add_features(encoder, concept_features(concept_attention(mag_logits(
                    X, self.T.t() / math.sqrt(X.shape[-1]), self.padding_bias(seq))), X))
            trace.record(encoder, seq.valid, seq.valid)
            return x, seq
        return PruneHook(prune, lambda layer: self.prunes(encoder, layer))

    @staticmethod
    def padding_bias(seq):
        B, N = seq.valid.shape
        return None if seq.bias is None else seq.bias.view(B, N, 1)[:, 1:]

    def decide(self, encoder, layer, x_in, seq, A, trace, T, inv_tau):
        o, e, v = self.options, ENCODERS.index(encoder), seq.valid[:, 1:]
        with full_precision(x_in):
            X = x_in[:, 1:]
            a = mag_logits(X, T, self.padding_bias(seq)) if self.concepts else None
            P = concept_attention(a) if a is not None else None
            parts = [cls_score(A)]
            if o.score != "S_cls":
                parts.append(self_score(A, v.float()))
            if o.score in ("S", "random"):   # random: MADTP's own counts
                parts.append(mag_score(P))
            S = importance(torch.stack(parts, dim=1))
            keep = self.count(o, e, layer, encoder in o.dynamic, S, a, inv_tau, v)
            if o.score == "random":   # the same counts, random tokens
                k = (v.cumsum(dim=1) - 1).clamp_min(0)                                # (B, n) rank among valid
                S = normalise(self.random[e, layer][k] * v)
                keep = top_k_mask(S, v, keep.sum(dim=1))
            if trace.features and self.aligned and encoder != "fusion":
                trace.add_features(encoder, concept_features(P, X))
        return S, keep

    def count(self, o, e, layer, dynamic, S, a, inv_tau, v):
        """The keep decision (B, n) of the variant's count rule."""
        cut, n = self.cuts[e, layer], v.sum(dim=1)
        if o.counts == "fixed" or not dynamic:
            return top_k_mask(S, v, share_count(n, self.beta, cut))
        theta = threshold(a, S, inv_tau)
        if o.counts == "bars":   # S / θ above the layer's bar, fitted on this batch
            ratio = S / theta[:, None].clamp_min(torch.finfo(S.dtype).tiny)
            keep = (ratio > share_threshold(ratio, v, keep_share(self.beta, cut))) & v
        else:
            keep = keep_mask(S, theta, self.beta) & v
            keep = batch_max(S, keep, v) if o.counts == "batch-max" else keep
        if o.count_range:
            fixed = share_count(n, self.beta, cut)
            count = keep.sum(dim=1).float().clamp(torch.ceil(fixed / o.count_range), torch.ceil(fixed * o.count_range))
            keep = top_k_mask(S, v, torch.minimum(count, n).long())
        return keep

    def overhead(self, n, D):
        """What the variant computes on top of its blocks: a and θ where it uses the concepts, S_self's
        sum where its score has it, and x_fuse."""
        o, M = self.options, self.cfg.num_align_tokens
        theta = o.counts != "fixed" and bool(o.dynamic)
        return self.concepts * M * n * D + theta * M * n + (o.score != "S_cls") * n * n + n * D


def search_cuts(cost, layers, shape, target, step):
    """A schedule: cut weights w_ℓ (shape (E, L)) for the reduction target, by greedy search. From no
    pruning, each step deepens by `step` the cut of the one layer in `layers` [(e, l)] whose next
    step costs the least per unit of reduction, until the reduction reaches the target or no layer
    can cut more. cost(cuts) -> (loss, reduction). docs/budget.md"""
    cuts = torch.zeros(shape)
    loss, reduction = cost(cuts)
    while reduction < target:
        trials = []
        for e, l in layers:
            trial = cuts.clone()
            trial[e, l] += step
            trials.append((trial, *cost(trial)))
        trials = [t for t in trials if t[2] > reduction + 1e-6]   # the layers that can still cut
        if not trials:
            break
        cuts, loss, reduction = min(trials, key=lambda t: (t[1] - loss) / (t[2] - reduction))
    return cuts


def search_schedule(cfg, run, vcfg, mcfg, split, tokenizer, dense, cache, options=Options("cls-static-search")):
    """The cut weights w_ℓ for target p, searched on validation pairs with the dense model frozen, as
    DiffRate searches its rates on a frozen ViT; a candidate costs its validation L_task with fixed ITM
    negatives. Scored with S_cls at fixed counts (no alignment tokens needed), so that every arm prunes
    on the same schedule; cached in the json file `cache` with what it depends on. -> (E, L) list"""
    key = dict(train.dense_identity(cfg, vcfg, tokenizer), prune_ratio=cfg.prune_ratio,
               prune=list(options.prune), first_layer=options.first_layer)
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    if cached.get("key") == key:
        return cached["cuts"]
    probe = Variant(mcfg, vcfg, Options("search", score="S_cls", counts="fixed", prune=options.prune,
                                        first_layer=options.first_layer)).to(run.device).eval()
    probe.beta.fill_(1.0)                                                   # ρ_ℓ = 2^(-w_ℓ)
    captions = [cs[0] for cs in split.img2txt[:SEARCH_PAIRS]]               # one caption per image
    ids, valid = tokenizer.encode([split.captions[c] for c in captions])
    images = torch.stack([split.image(split.txt2img[c]) for c in captions])
    batch = [t.to(run.device) for t in (images, ids, valid, torch.arange(len(captions)))]
    with torch.no_grad():   # fixed ITM negatives: the dense model's hardest
        out = dense.eval()(*batch[:3])
    sim = (out["e_img"] @ out["e_txt"].t()).fill_diagonal_(-math.inf)      # (B, B) image x caption
    negatives, bar = (sim.argmax(dim=1), sim.argmax(dim=0)), tqdm(desc="schedule search", leave=False)

    @torch.no_grad()
    def cost(cuts):   # (validation L_task, GFLOPs reduction) under these cut weights
        probe.cuts.copy_(cuts)
        trace = Trace()
        loss, image_of_pair = task_loss(dense, *batch, probe.hooks(trace), negatives)
        bar.update()
        return loss.item(), realised_reduction(vcfg, trace, image_of_pair, batch[2].sum(1)).item()

    layers = [(e, l) for e, enc in enumerate(ENCODERS) for l in range(probe.depths[enc]) if probe.prunes(enc, l)]
    cuts = search_cuts(cost, layers, probe.cuts.shape, cfg.prune_ratio, SEARCH_STEP)
    bar.close()
    cuts = (cuts / cuts[cuts > 0].mean()).tolist()   # mean 1 where it cuts, as uniform's: β keeps its scale
    train.write_json(cache, dict(key=key, cuts=cuts))
    return cuts

