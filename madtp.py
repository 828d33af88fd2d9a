"""MADTP: Multi-modality Alignment Guidance (MAG) and Dynamic Token Pruning (DTP).

Cao et al., "MADTP: Multimodal Alignment-Guided Dynamic Token Pruning for Accelerating
Vision-Language Transformer", CVPR 2024, arXiv 2403.02991: section 3.2 (MAG) and section 3.3
(DTP). Official code: github.com/double125/MADTP (built on UPop/BLIP). Where this file departs from
the official code, the comment says so, and the README lists every difference.

The method in one breath: a learnable matrix T of M "alignment tokens" is shared by the vision and
text encoders. In every pruned layer each modality's tokens attend to the concepts in T (logits a,
concept attention P), giving concept features F that an alignment loss L_align pulls together across
modalities. Each token gets an importance S = mean(S_cls, S_self, S_mag), every sample gets its own
threshold θ from the concepts, tokens whose score falls below the layer's bar are fused into one
package token x_fuse, and the rest go on.

One scalar β sets the compute budget (not in the paper, whose code moves τ instead). A schedule of
cut weights w_ℓ shares it across layers: layer ℓ keeps on average the share ρ_ℓ = (1 + β)^(-w_ℓ)
of its input tokens, so a larger β prunes more in every layer and β stays one monotone knob. With
the default budget ("layer") each layer has a bar β_ℓ, fitted like a BatchNorm statistic so that
the layer keeps ρ_ℓ of the tokens pooled over a batch, and each sample keeps its tokens with
S_j > β_ℓ θ_b: its own θ, its own count. "global" is the rule as the official code has it: one
bar for every layer, keep S_j > β θ_b. docs/budget.md explains both and how the cut weights are
found.

On a GPU the pruned forward must not wait for the host: a layer's scores, threshold and keep
decision run without reading any value back, and the one number a pruned layer reads is the length
of its longest output sample, which sizes the shorter sequence (prune_tokens; docs/speed.md).

Shapes: B batch, N tokens of a sequence (0 is CLS), n = N - 1 prunable tokens, R real tokens of a
packed batch (vlt.py), D width, H heads, M alignment tokens, E encoders, L layers. `valid` (B, N) or
`v` (B, n) is False for padding.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F_

from vlt import (READS_ALL, READS_CLS, READS_NOTHING, PruneHook, Seq, VLTConfig, Weights, check_fields, pack,
                 real_slots, unpack)

# Every method is a score (which tokens rank first) and a count rule (how many each sample keeps):
# "theta": the tokens above the layer's bar relative to the sample's own θ (per-sample counts);
# "share": ceil(n ρ_ℓ) of every sample's n tokens (fixed counts); "batch-max": the official code's
# rule, every sample keeps as many as the batch's largest count above β θ_b (batch_max_mask). The
# first four are the paper's comparison (README, "Results"); madtp-static and cls-dynamic complete
# the 2 x 2 of score x count rule that separates MADTP from static CLS pruning (docs/findings.md);
# madtp-official is what the official code runs, and the one method whose result depends on the batch.
METHODS = {
    "madtp": ("S", "theta"),                # the method: MAG-guided score, per-sample counts
    "dtp-no-mag": ("S_cls+S_self", "theta"),  # the same without MAG's score or L_align
    "cls-static": ("S_cls", "share"),       # single-modality static pruning, EViT-like
    "random": ("random", "theta"),          # MADTP's own counts, random tokens
    "madtp-static": ("S", "share"),         # MADTP's score at fixed counts
    "cls-dynamic": ("S_cls", "theta"),      # CLS attention at per-sample counts
    "madtp-official": ("S", "batch-max"),   # MADTP as its code runs it: one β, the batch's largest count
}
ENCODERS = ("vision", "text", "fusion")
BUDGETS = ("layer", "global")
RANDOM_SEED = 1234   # fixes the random baseline's per-position scores (see random_scores)


@dataclass
class MADTPConfig:
    method: str = "madtp"        # madtp | dtp-no-mag | cls-static | random | madtp-static | cls-dynamic |
                                 # madtp-official
    num_align_tokens: int = 32   # M, the alignment tokens; official 100 at D = 768, fewer suit this small model
    tau: float = 0.1             # τ, temperature of θ's softmax, fixed (official: moved by a ladder); small, so
                                 # that θ sits at each sample's background level (docs/budget.md)
    alpha: float = 0.1           # α, weight of L_align in L = L_task + α L_align (official, all tasks)
    budget: str = "layer"        # layer: a bar per layer fitted to the schedule's share; global: one β (official)
    prune_vision: bool = True    # prune the vision encoder's patch tokens
    prune_text: bool = True      # prune the text encoder's word tokens
    prune_fusion: bool = True    # prune the text tokens of the fusion encoder
    dynamic_vision: bool = True  # per-sample counts in the vision encoder (off: ceil(n ρ_ℓ) each, as the
                                 # static methods); for the methods whose counts are per-sample
    dynamic_text: bool = True    # per-sample counts in the text encoder (off: ceil(n ρ_ℓ) each)
    dynamic_fusion: bool = True  # per-sample counts in the fusion encoder (off: ceil(n ρ_ℓ) each)
    first_layer: int = 0         # layers before this one, in every encoder, never prune (EViT: 4 of 12)
    count_range: float = 0.0     # R > 1: per-sample counts stay within [1/R, R] x the layer's fixed count
                                 # ceil(n ρ_ℓ); 0: unbounded (per-sample counts only)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown pruning method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.budget not in BUDGETS:
            raise ValueError(f"unknown budget rule {self.budget!r}; choose one of {', '.join(BUDGETS)}")
        if self.first_layer < 0:
            raise ValueError(f"first_layer counts layers from 0, got {self.first_layer}")
        check_fields(self, dict(num_align_tokens=(1, "")), positive=("tau",))
        if self.alpha < 0:
            raise ValueError(f"--alpha weighs L_align and cannot be negative, got {self.alpha}")
        if self.count_range and self.count_range < 1:
            raise ValueError(f"count_range is R >= 1 (counts within [1/R, R] x the fixed count) or 0, "
                             f"got {self.count_range}")


# ---------------------------------------------------------------------------------------------
# MAG: multi-modality alignment guidance (paper section 3.2)

def q(X):
    """The map of an encoder's tokens into the alignment space. Identity, as in the official BLIP
    code: all encoders share the width D, and a learnt map per encoder could satisfy L_align by
    collapsing instead of aligning the encoders' own tokens."""
    return X


def mag_logits(x, seq, T):
    """a = q(X) Tᵀ / √D: how strongly each prunable token X matches each concept. x (R, D) is the
    packed sequence (vlt.py): the product runs on its real tokens, then a is laid out per sample,
    -inf at padding. (B, n, M)"""
    a = unpack(q(x) @ T.t().to(x.dtype) / math.sqrt(x.shape[-1]), seq)[:, 1:]      # (B, n, M)
    return masked(a.float(), seq.valid[:, 1:, None])


def masked(x, keep):
    """x where keep, -inf elsewhere. (torch.where with a tensor for -inf makes a third of the aten
    calls of masked_fill, which runs in every pruned layer.)"""
    return torch.where(keep, x, x.new_full((), float("-inf")))


def concept_attention(a):
    """P = softmax over the tokens j of a: each concept's attention over the sequence. (B, n, M)"""
    return a.softmax(dim=1)


def concept_features(P, X):
    """f_l = Pᵀ q(X): what each concept sees in this layer. (B, M, D); F sums it over layers."""
    return torch.bmm(P.to(X.dtype).transpose(1, 2), q(X))                       # (B, M, n) @ (B, n, D)


def alignment_loss(F_v, F_t):
    """L_align = mean over (b, m) of 1 - cos(F_v[b, m], F_t[b, m]), on matching pairs only."""
    return (1 - F_.cosine_similarity(F_v.float(), F_t.float(), dim=-1)).mean()


# ---------------------------------------------------------------------------------------------
# DTP: token importance scores, threshold and pruning (paper section 3.3)

def normalise(s, v):
    """Zero the padding and make scores sum to 1 over each sample's valid prunable tokens (last dim)."""
    s = s * v
    return s / s.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)


def cls_score(A: Weights):
    """S_cls[j]: attention from CLS to token j, mean over heads. A.cls (B, H, N) -> (B, n), unnormalised.
    (Official: heads weighted by the norm of their output; plain mean here.)"""
    return A.cls[:, :, 1:].mean(dim=1)


def self_score(A: Weights, v):
    """S_self[j] = Σ_i max_h A[h, i, j] over valid prunable queries i: how much the other tokens
    look at j. A.head_max (B, N, N) is max_h A; (B, n), unnormalised; the sum over queries is one
    batched product."""
    look = A.head_max[:, 1:, 1:]                                                # (B, n_query, n_key)
    return torch.bmm(v[:, None, :].to(look.dtype), look)[:, 0]                  # (B, 1, n) @ (B, n, n)


def mag_score(P):
    """S_mag[j] = max_m P[j, m]: how strongly some concept attends to j. (B, n), unnormalised.
    (Official: max_m of the raw logits a, which can be negative; the softmax form is well defined.)"""
    return P.amax(dim=2)


def importance(scores, v):
    """S = the mean of the scores, each normalised to sum 1 over the sample's tokens, all in one
    normalisation: scores (B, k, n) stacked S_cls, S_self[, S_mag] -> S (B, n)."""
    return normalise(scores, v[:, None, :]).mean(dim=1)


def threshold(a, S, tau):
    """θ_b = min over m of Σ_j softmax_j(a[b, j, m] / τ) S[b, j]: each concept proposes the
    importance of what it attends to, and the weakest proposal is the bar. It is a convex
    combination of S, so min S <= θ <= max S. (B,)"""
    proposals = torch.bmm(S[:, None, :], (a / tau).softmax(dim=1))               # (B, 1, n) @ (B, n, M)
    return proposals[:, 0].amin(dim=1)


def keep_mask(S, theta, beta, v):
    """Keep token j iff S[b, j] > β θ_b. β = 0 keeps every valid token; larger β keeps fewer."""
    return (S > beta * theta[:, None]) & v


def batch_max_mask(S, keep, v):
    """The official code's count rule (its Reduce_token): every sample keeps its K highest-scoring
    tokens, K the largest count that `keep` gives any sample of the batch, and the layer prunes
    nothing where K < 1 or n - K <= 1 (n the batch's prunable width, padding included, as there).
    A sample's count, and so its result, depends on its batch-mates. (B, n) bool"""
    K = keep.sum(dim=1).amax()                                                     # () on the device
    prunes = (K >= 1) & (v.shape[1] - K > 1)
    return torch.where(prunes, top_k_mask(S, v, K.expand(len(v))), v)


def keep_share(beta, cut=1.0):
    """ρ_ℓ = (1 + β)^(-w_ℓ): the share of its input tokens layer ℓ keeps under cut weight w_ℓ.
    β = 0 keeps everything; a larger β keeps less in every layer with w_ℓ > 0, none with w_ℓ = 0."""
    return 1 / (1 + beta) ** cut


def share_count(n, beta, cut=1.0):
    """Fixed counts: each sample keeps ceil(n ρ_ℓ) of its n tokens, written as a division so that a
    whole n (1 + β)^(-w) is not pushed up by rounding. n (B,) -> (B,)"""
    return torch.minimum(torch.ceil(n / (1 + beta) ** cut), n).long()


def share_threshold(statistic, v, rho):
    """The bar β_ℓ above which a share ρ of the valid tokens lies, pooled over the batch: the batch
    keeps ceil(ρ C) of its C valid tokens, but each sample as many as it has above the bar. ρ = 1 keeps
    all. Computed where the tokens are, with nothing read on the host."""
    s = masked(statistic, v).flatten().sort(descending=True).values                 # (B * n,) valid first
    count = v.sum()
    # round: ρ = 0.4 in float32 times 80 is 32.0000005; double, as Python's float would be
    rho = torch.as_tensor(rho, dtype=torch.float64, device=count.device)
    k = torch.ceil(torch.round(rho * count, decimals=4)).long()
    return torch.where(k < count, s[k.clamp(max=len(s) - 1)], float("-inf"))


def top_k_mask(scores, v, k):
    """Keep each sample's k[b] highest-scoring valid tokens. (B, n) bool"""
    order = masked(scores, v).argsort(dim=1, descending=True)                       # (B, n)
    rank = order.argsort(dim=1)                                                       # (B, n)
    return (rank < k[:, None]) & v


def random_table(depths, max_tokens):
    """The random baseline's scores: a fixed pseudo-random number per (encoder, layer, k) for the
    k-th valid token of a sample, blind to content. Fixed rather than redrawn, and indexed by k
    rather than by slot, so that a sample's result never depends on its batch or on when it runs.
    Drawn once on the CPU (the same numbers on every device). (E, L, max_tokens)"""
    table = torch.zeros(len(ENCODERS), max(depths), max_tokens)
    for e in range(len(ENCODERS)):
        for layer in range(max(depths)):
            g = torch.Generator().manual_seed(RANDOM_SEED + 1000 * e + layer)
            table[e, layer] = torch.rand(max_tokens, generator=g)
    return table


def random_scores(table, v):
    """table (max_tokens,) one layer's row of random_table -> the scores of v's tokens. (B, n)"""
    k = (v.cumsum(dim=1) - 1).clamp_min(0)                                        # (B, n) rank among valid
    return table[k]


def package_weights(S, fused):
    """Fusion weights of the pruned tokens: S_j / Σ_{pruned} S. Each row sums to 1 where the
    sample pruned anything, else 0. (B, n)"""
    return normalise(S, fused)


def prune_tokens(x, seq, keep, S):
    """[CLS, kept tokens in original order, x_fuse] per sample, on the packed stream.

    x (R, D) packed with its Seq (vlt.py), keep and S (B, n). Returns the new packed x (R', D), its
    Seq, and idx (B, W-1): slot 1 + j of a sample holds its prunable token idx[b, j] while j < its
    keep count; then comes its package token if it pruned anything, then padding, which no later
    layer sees (each sample keeps its own count). Reads W and R', the new sequence's size: one host sync.
    """
    valid = seq.valid
    B, N = valid.shape
    fused = valid[:, 1:] & ~keep                                                   # (B, n)
    count = keep.sum(dim=1)                                                        # (B,)
    length = 1 + count + fused.any(dim=1)                                          # (B,) CLS, kept, package
    lengths = length.tolist()                                                      # the layer's one host sync
    W, R = max(lengths), sum(lengths)
    # kept tokens first, in their original order: a stable sort on "pruned?"
    idx = (~keep).argsort(dim=1, stable=True)[:, : W - 1]                          # (B, W-1)
    row = unpack(torch.arange(len(x), device=x.device), seq)                       # (B, N) packed row of each slot
    slot = torch.arange(W, device=x.device)                                        # (W,)
    # the row of [x; x_fuse] (R + B, D) each slot copies: CLS, the kept tokens, then row R + b, the package
    src = torch.cat([row[:, :1], row[:, 1:].gather(1, idx)], dim=1)                 # (B, W)
    package = len(x) + torch.arange(B, device=x.device)[:, None]                   # (B, 1)
    src = torch.where(slot == (1 + count)[:, None], package, src)                  # (B, W)
    valid_out = slot < length[:, None]                                             # (B, W)
    out = Seq(valid_out, real_slots(valid_out, R), padded=R < B * W)
    w = package_weights(S, fused).to(x.dtype)[:, None, :]                          # (B, 1, n)
    x_fuse = torch.bmm(w, unpack(x, seq)[:, 1:])[:, 0]                             # (B, 1, n) @ (B, n, D) -> (B, D)
    x = torch.cat([x, x_fuse]).index_select(0, pack(src, out))                     # (R', D)
    return x, out, idx


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


# ---------------------------------------------------------------------------------------------
# The module that holds T and β and plugs DTP into the VLT's hooks

class Trace:
    """What one forward pass did, per encoder: for each layer the per-sample token counts (CLS
    included) before and after pruning and what MADTP computed on top (for its GFLOPs); optionally
    which original tokens each layer kept; and MAG's concept features F summed over layers.

    start: {encoder: (B, N) original index of each input slot, -1 for none}, for an encoder whose
    input is not a raw sequence, e.g. a fusion pass over text tokens stored after the text encoder."""

    def __init__(self, features: bool = False, positions: bool = False, start=None):
        self.features, self.positions, self.start = features, positions, start or {}
        self.layers = {e: [] for e in ENCODERS}   # encoder -> [dict(n_in, n_out, ...[, kept])]
        self.F = {}                                # encoder -> (B, M, D), summed over layers
        self._pos = {}                             # encoder -> (B, N) original index per slot

    def record(self, encoder, valid_in, valid_out, idx=None, packaged=None, concepts=0, proposals=0,
               features=False, cls_row=False):
        """idx (B, W-1): the prunable slot each kept token came from, as prune_tokens returns it
        (None: nothing was pruned); packaged (B,): which samples built a package token; concepts: M
        if MAG's logits a were computed, else 0; proposals: M if θ was; features: whether f_l was;
        cls_row: whether attention computed the CLS row beside its fused output (vlt.cls_row).
        The last five only count MADTP's own MACs."""
        rec = dict(n_in=valid_in.sum(dim=1), n_out=valid_out.sum(dim=1), packaged=packaged,
                   concepts=concepts, proposals=proposals, features=features, cls_row=cls_row)
        if self.positions:
            rec["kept"] = self._pos[encoder] = self._positions(encoder, valid_in, rec, idx)
        self.layers[encoder].append(rec)

    def slots(self, encoder, valid_in):
        """(B, N) original token index of each slot entering the encoder's next layer, -1 for a
        package token or padding. The fusion encoder's text tokens continue the text encoder's numbering."""
        B, N = valid_in.shape
        if encoder not in self._pos:
            if encoder == "fusion" and "text" in self._pos:   # one forward: text, then fusion
                self.start.setdefault("fusion", self._pos["text"])
            self._pos[encoder] = self.start.get(encoder, torch.arange(N, device=valid_in.device)
                                                .expand(B, N).masked_fill(~valid_in, -1))
        return self._pos[encoder]

    def _positions(self, encoder, valid_in, rec, idx):
        """(B, N') original token index of every slot after this layer; -1 marks a package token
        or padding."""
        pos = self.slots(encoder, valid_in)
        if idx is None:
            return pos
        count = rec["n_out"] - 1 - rec["packaged"].long()                             # (B,) kept tokens
        slot = torch.arange(idx.shape[1], device=pos.device)[None, :]                 # (1, W-1)
        kept = pos[:, 1:].gather(1, idx).masked_fill(slot >= count[:, None], -1)      # (B, W-1)
        return torch.cat([pos[:, :1], kept], dim=1)


def dense_hooks(trace):
    """Count-only hooks for every encoder: how a dense model reports tokens and GFLOPs."""
    return {e: count_only(trace, e) for e in ENCODERS}


def count_only(trace, encoder):
    """A hook that prunes nothing, reads no attention weights and only counts: for dense models and
    switched-off encoders."""
    def prune(layer, x_in, x, seq, A):
        trace.record(encoder, seq.valid, seq.valid)
        return x, seq
    return PruneHook(prune)


class MADTP(nn.Module):
    """T (the alignment tokens), β (the budget), the schedule's cut weights w_ℓ and the per-layer
    bars β_ℓ; `hooks` gives the VLT a pruning hook per encoder. Like BatchNorm, it fits in training
    mode (each batch sets the bars β_ℓ for the shares ρ_ℓ that β asks for) and uses the frozen bars
    in eval mode, so that a sample's result never depends on its batch-mates at evaluation."""

    def __init__(self, cfg: MADTPConfig, vcfg: VLTConfig):
        super().__init__()
        depths = (vcfg.vision_layers, vcfg.text_layers, vcfg.fusion_layers)
        self.cfg, self.depths = cfg, dict(zip(ENCODERS, depths))
        # the score and the count rule; experiments/decompose.py switches the counts to compare
        # per-sample counts with fixed ones at the same schedule
        self.score, self.counts = METHODS[cfg.method]
        self.T = nn.Parameter(torch.randn(cfg.num_align_tokens, vcfg.dim))   # N(0, 1), as official
        self.register_buffer("beta", torch.tensor(0.0))                        # β, set by the controller
        # w_ℓ per (encoder, layer): 1 everywhere is the uniform schedule, ρ_ℓ = 1 / (1 + β)
        self.register_buffer("cuts", torch.ones(len(ENCODERS), max(depths)))
        # β_ℓ per (encoder, layer) for the layer budget; -inf (keep all) until first fitted
        self.register_buffer("bars", torch.full((len(ENCODERS), max(depths)), float("-inf")))
        # the random baseline's fixed scores; rebuilt from RANDOM_SEED, so not saved in checkpoints
        max_tokens = max(1 + vcfg.num_patches, vcfg.max_text_len)
        self.register_buffer("random", random_table(depths, max_tokens), persistent=False)

    @property
    def aligned(self):
        """Whether the score uses the concepts, so that L_align trains them (only then is T trained)."""
        return self.score == "S"

    def prunes(self, encoder, layer):
        on = {"vision": self.cfg.prune_vision, "text": self.cfg.prune_text, "fusion": self.cfg.prune_fusion}
        return on[encoder] and layer >= self.cfg.first_layer

    def hook(self, encoder, trace: Trace):
        def prune(layer, x_in, x, seq, A):
            if self.prunes(encoder, layer):
                return self.prune_layer(encoder, layer, x_in, x, seq, A, trace)
            if self.aligns(encoder, trace):  # keeps every token, but still feeds L_align
                P = concept_attention(mag_logits(x_in, seq, self.T))
                self.add_features(encoder, P, unpack(x_in, seq)[:, 1:], trace)
            return count_only(trace, encoder).prune(layer, x_in, x, seq, A)
        return PruneHook(prune, reads=lambda layer: self.reads(encoder, layer))

    def reads(self, encoder, layer):
        """What this layer's score reads of the attention weights: S_cls the CLS row, S_self all of them."""
        if not self.prunes(encoder, layer):
            return READS_NOTHING
        return READS_CLS if self.score == "S_cls" else READS_ALL

    def hooks(self, trace: Trace):
        return {e: self.hook(e, trace) for e in ENCODERS}

    def aligns(self, encoder, trace):
        """The vision and text encoders feed L_align while training; fusion features never do."""
        return trace.features and self.aligned and encoder != "fusion"

    @staticmethod
    def add_features(encoder, P, X, trace):
        f = concept_features(P, X)
        trace.F[encoder] = trace.F[encoder] + f if encoder in trace.F else f

    def prune_layer(self, encoder, layer, x_in, x, seq, A, trace):
        """Section 3.3 in one layer: scores S, the keep decision, the package token. x_in, x (R, D)
        packed: MAG reads the layer's input x_in, the pruning packages x."""
        e, v = ENCODERS.index(encoder), seq.valid[:, 1:]                            # v (B, n)
        theta_counts = self.counts != "share" and getattr(self.cfg, f"dynamic_{encoder}")
        a = mag_logits(x_in, seq, self.T) if theta_counts or self.score in ("S", "random") else None
        P = concept_attention(a) if self.score in ("S", "random") else None
        S = self.importance(encoder, layer, A, P, v)
        if theta_counts:
            keep = self.keep(e, layer, S, threshold(a, S, self.cfg.tau), v)
        else:
            keep = self.top_k(encoder, layer, S, v, share_count(v.sum(dim=1), self.beta, self.cuts[e, layer]))
        if self.score == "random":   # MADTP's counts, random choice of tokens
            S = normalise(random_scores(self.random[e, layer], v), v)
            keep = top_k_mask(S, v, keep.sum(dim=1))
        features = self.aligns(encoder, trace)
        if features:
            self.add_features(encoder, P, unpack(x_in, seq)[:, 1:], trace)
        x, seq_out, idx = prune_tokens(x, seq, keep, S)
        M = self.cfg.num_align_tokens
        trace.record(encoder, seq.valid, seq_out.valid, idx, (v & ~keep).any(dim=1), M if a is not None else 0,
                     M if theta_counts else 0, features, cls_row=A.head_max is None)
        return x, seq_out

    def importance(self, encoder, layer, A, P, v):
        """The method's S: (S_cls + S_self + S_mag) / 3 for MADTP (and for the random baseline's
        counts), (S_cls + S_self) / 2 without MAG, S_cls alone for the CLS methods. (B, n)"""
        parts = [cls_score(A)]
        if self.score != "S_cls":
            parts.append(self_score(A, v))
        if P is not None:
            parts.append(mag_score(P))
        return importance(torch.stack(parts, dim=1), v)

    def keep(self, e, layer, S, theta, v):
        """Per-sample counts: each sample's own θ, and the budget rule's bar; with count_range R, each
        count clamped to [1/R, R] times the layer's fixed count, keeping the highest S / θ. The
        official rule: one β, S_j > β θ_b, and the batch's largest count for every sample."""
        if self.counts == "batch-max":
            return batch_max_mask(S, keep_mask(S, theta, self.beta, v), v)
        if self.cfg.budget == "global":
            return keep_mask(S, theta, self.beta, v)
        ratio = S / theta[:, None].clamp_min(torch.finfo(S.dtype).tiny)           # keep j iff S_j > β_ℓ θ_b
        if self.training:
            self.bars[e, layer] = share_threshold(ratio.detach(), v, keep_share(self.beta, self.cuts[e, layer]))
        keep = (ratio > self.bars[e, layer]) & v
        if not self.cfg.count_range:
            return keep
        R, n = self.cfg.count_range, v.sum(dim=1)
        fixed = share_count(n, self.beta, self.cuts[e, layer])                         # (B,)
        count = torch.minimum(keep.sum(dim=1).float().clamp(torch.ceil(fixed / R), torch.ceil(fixed * R)), n)
        return top_k_mask(ratio, v, count.long())

    def top_k(self, encoder, layer, S, v, k):
        """Fixed counts: each sample keeps its k[b] highest-scoring tokens."""
        return top_k_mask(S, v, k)


# ---------------------------------------------------------------------------------------------
# GFLOPs per sample
#
# Counted as multiply-accumulates and called "GFLOPs", fvcore's convention (DeiT, ToMe, UPop,
# MADTP); torch.utils.flop_counter counts 2 per MAC, so it reads twice these numbers. Matrix
# products only: LayerNorm, softmax, GELU, masking, sorting and gathers are not counted.

def block_macs(cfg, n_in, n_out, m=None):
    """One block: self-attention over n_in tokens, then the MLP (and cross-attention to m image
    tokens) over the n_out tokens pruning left. Per sample, (B,) tensors in and out."""
    D, R = cfg.dim, cfg.mlp_ratio
    macs = 4 * n_in * D * D + 2 * n_in * n_in * D + 2 * R * n_out * D * D          # q, k, v, out; QKᵀ, AV; MLP
    if m is not None:
        macs = macs + 2 * n_out * D * D + 2 * m * D * D + 2 * n_out * m * D        # q, out; k, v; QKᵀ, AV
    return macs


def madtp_macs(cfg, r):
    """What MADTP itself spends in one layer record r, per sample, on its n prunable input tokens:
    the logits a, the proposals inside θ (M per token each), the features f_l, x_fuse, and the CLS
    row of QKᵀ that a fused attention computes again for S_cls (over all n + 1 keys)."""
    n = r["n_in"] - 1
    macs = r["concepts"] * n * cfg.dim + r["proposals"] * n + r["cls_row"] * r["n_in"] * cfg.dim
    if r["features"]:
        macs = macs + r["concepts"] * n * cfg.dim
    if r["packaged"] is not None:
        macs = macs + r["packaged"] * n * cfg.dim
    return macs


def head_macs(cfg):
    """What each encoder spends outside its blocks: patch embedding and the ITC / ITM heads."""
    D = cfg.dim
    return {"vision": cfg.num_patches * 3 * cfg.patch_size ** 2 * D + D * cfg.embed_dim,
            "text": D * cfg.embed_dim,
            "fusion": D * 2}


def gflops(cfg, trace: Trace, image_tokens=None):
    """Per-sample GFLOPs of each encoder that ran in a traced forward: {encoder: (B,) float64}.
    image_tokens (B,): for each fused pair, how many tokens its image kept (cross-attention keys)."""
    heads, out = head_macs(cfg), {}
    for encoder, layers in trace.layers.items():
        if layers:
            m = image_tokens if encoder == "fusion" else None
            macs = sum(block_macs(cfg, r["n_in"].double(), r["n_out"].double(), m) + madtp_macs(cfg, r)
                       for r in layers)
            out[encoder] = (macs + heads[encoder]) / 1e9
    return out


def dense_gflops(cfg, text_tokens):
    """Per-sample GFLOPs of the unpruned model for captions of text_tokens (B,) tokens (CLS included)."""
    n_t = text_tokens.double()
    n_v = torch.full_like(n_t, 1 + cfg.num_patches)
    heads = head_macs(cfg)
    return {"vision": (cfg.vision_layers * block_macs(cfg, n_v, n_v) + heads["vision"]) / 1e9,
            "text": (cfg.text_layers * block_macs(cfg, n_t, n_t) + heads["text"]) / 1e9,
            "fusion": (cfg.fusion_layers * block_macs(cfg, n_t, n_t, n_v) + heads["fusion"]) / 1e9}


def pair_gflops(cfg, vision, text, fusion, txt2img, text_tokens):
    """What a retrieval pair costs: its image through the vision encoder, its caption through the
    text encoder and one fusion pass, averaged over the pairs; and the reduction from dense. vision
    (I,) per image, text and fusion (T,) per caption, txt2img (T,) its image, text_tokens (T,)."""
    parts = dict(vision=vision[txt2img], text=text, fusion=fusion)
    total = sum(parts.values()).mean().item()
    dense = sum(dense_gflops(cfg, text_tokens).values()).mean().item()
    return dict(gflops=total, gflops_dense=dense, gflops_reduction=1 - total / dense,
                **{f"gflops_{e}": parts[e].mean().item() for e in ENCODERS})


def realised_reduction(cfg, trace, image_of_pair, text_tokens):
    """1 - GFLOPs / dense GFLOPs of a training batch's true pairs (the first B of its fusion passes,
    image_of_pair their images), as the β controller reads it after every step."""
    B = len(text_tokens)
    g = gflops(cfg, trace, image_tokens=trace.layers["vision"][-1]["n_out"][image_of_pair])
    pruned = g["vision"].sum() + g["text"].sum() + g["fusion"][:B].sum()
    return 1 - pruned / sum(v.sum() for v in dense_gflops(cfg, text_tokens).values())
