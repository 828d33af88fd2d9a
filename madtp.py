"""MADTP: Multi-modality Alignment Guidance (MAG) and Dynamic Token Pruning (DTP).

Cao et al., "MADTP: Multimodal Alignment-Guided Dynamic Token Pruning for Accelerating
Vision-Language Transformer", CVPR 2024, arXiv 2403.02991: section 3.2 (MAG) and section 3.3
(DTP). Official code: github.com/double125/MADTP (built on UPop/BLIP). This file follows
../shared/SPEC.md sections 2, 3 and 5; where SPEC departs from the official code the comment says so.

The method in one breath: a learnable matrix T of M "alignment tokens" is shared by the vision and
text encoders. In every pruned layer each modality's tokens attend to the concepts in T (logits a,
concept attention P), giving concept features F that an alignment loss L_align pulls together across
modalities. Each token gets an importance S = mean(S_cls, S_self, S_mag), every sample gets its own
threshold θ from the concepts, tokens whose score falls below the layer's bar are fused into one
package token x_fuse, and the rest go on. One scalar β sets the compute budget; how it is shared
across layers is the `budget` rule (SPEC section 3, "how the budget is shared"):

- "global" (as first built): keep S > β·θ with the same β in every layer of every encoder.
- "layer" (the default): every pruned layer ℓ has its own bar β_ℓ, fitted so that the layer keeps
  on average the share ρ = 1 / (1 + β) of its input tokens (pooled over the training batch, or
  over the validation split when calibrating): cls-static's geometric schedule. Which samples keep
  more is still decided per sample: keep j iff S_j > β_ℓ θ_b, with the sample's own S and θ.
- "back": as "layer", but back-loaded: the k-th of an encoder's K pruned layers keeps ρ^(2k/(K+1))
  of its input (the same product over the encoder as "layer"; lighter cuts early, heavier late).
- "encoder": one bar per encoder, fitted at its first pruned layer, then kept for its later layers.

A pooled bar compares samples with each other only if S / θ means the same in every sample. With
τ = 1, θ averages over many tokens, so it is high in a cluttered scene (every concept finds an
object) and low in an empty one, and the empty scene keeps more. With a small τ (the default 0.1)
each concept proposes the score of the one token it matches best, and the weakest proposal is a
background token in any scene: S / θ is then "how far above this scene's background", and a
cluttered scene keeps more tokens than an empty one (README, "Where the cuts fall").

On a GPU the pruned forward must not wait for the host: a layer's scores, threshold and keep
decision run without reading any value back, and the one number a pruned layer reads is the length
of its longest output sample, which sizes the shorter sequence (prune_tokens). Fitting the bars
(training, calibration) reads nothing more.

Shapes: B batch, N tokens of a sequence (0 is CLS), n = N - 1 prunable tokens, R real tokens of a
packed batch (vlt.py), D width, H heads, M alignment tokens. `valid` (B, N) or `v` (B, n) is False
for padding.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F_

from vlt import Seq, pack, real_slots, unpack

METHODS = ("madtp", "dtp-no-mag", "cls-static", "random")   # SPEC section 7 (dense = no MADTP at all)
ENCODERS = ("vision", "text", "fusion")
BUDGETS = ("layer", "back", "encoder", "global")   # how β's cut is shared across layers (module docstring)
RULES = ("ratio", "margin")               # the statistic a layer's bar β_ℓ is compared with (keep_statistic)
RANDOM_SEED = 1234   # fixes the random baseline's per-position scores (see random_scores)


@dataclass
class MADTPConfig:
    method: str = "madtp"        # one of METHODS
    num_align_tokens: int = 32   # M; official 100 at D = 768, fewer suit this small model
    tau: float = 0.1             # τ, temperature of θ's softmax; fixed (official moves it). Small: each concept
                                 # proposes the score of the token it matches best, so θ is a background level
    alpha: float = 0.1           # α, weight of L_align (official, all tasks)
    prune_vision: bool = True    # prune the vision encoder's patch tokens
    prune_text: bool = True      # prune the text encoder's word tokens
    prune_fusion: bool = True    # prune the text tokens of the fusion encoder
    budget: str = "layer"        # one of BUDGETS: fitted bars per layer (even or back-loaded) or per encoder, or one β
    rule: str = "ratio"          # one of RULES: keep S > β_ℓ θ (SPEC), or n (S - θ) > β_ℓ
    first_layer: int = 0         # layers before this one (in every encoder) never prune (EViT: 4 of 12)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown pruning method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.budget not in BUDGETS:
            raise ValueError(f"unknown budget rule {self.budget!r}; choose one of {', '.join(BUDGETS)}")
        if self.rule not in RULES:
            raise ValueError(f"unknown keep rule {self.rule!r}; choose one of {', '.join(RULES)}")
        if self.rule == "margin" and self.budget == "global":
            raise ValueError("the margin rule needs a fitted bar (--budget layer, back or encoder): "
                             "with one global β, β = 0 would no longer keep every token")
        if self.first_layer < 0:
            raise ValueError(f"first_layer counts layers from 0, got {self.first_layer}")


# ---------------------------------------------------------------------------------------------
# MAG: multi-modality alignment guidance (SPEC section 2)

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
    return a.float().masked_fill(~seq.valid[:, 1:, None], float("-inf"))


def concept_attention(a):
    """P = softmax over the tokens j of a: each concept's attention over the sequence. (B, n, M)"""
    return a.softmax(dim=1)


def concept_features(P, X):
    """f_l = Pᵀ q(X): what each concept sees in this layer. (B, M, D); F sums it over layers."""
    return P.to(X.dtype).transpose(1, 2) @ q(X)                                 # (B, M, n) @ (B, n, D)


def alignment_loss(F_v, F_t):
    """L_align = mean over (b, m) of 1 - cos(F_v[b, m], F_t[b, m]), on matching pairs only."""
    return (1 - F_.cosine_similarity(F_v.float(), F_t.float(), dim=-1)).mean()


# ---------------------------------------------------------------------------------------------
# DTP: token importance scores, threshold and pruning (SPEC section 3)

def normalise(s, v):
    """Zero the padding and make scores sum to 1 over each sample's valid prunable tokens (last dim)."""
    s = s * v
    return s / s.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)


def cls_score(A):
    """S_cls[j]: attention from CLS to token j, mean over heads. A (B, H, N, N) -> (B, n), unnormalised.
    (Official: heads weighted by the norm of their output; plain mean here.)"""
    return A[:, :, 0, 1:].mean(dim=1)


def self_score(A, v):
    """S_self[j] = Σ_i max_h A[h, i, j] over valid prunable queries i: how much the other tokens
    look at j. (B, n), unnormalised; the sum over queries is one batched product."""
    look = A[:, :, 1:, 1:].amax(dim=1)                                          # (B, n_query, n_key)
    return (v[:, None, :].to(look.dtype) @ look)[:, 0]                          # (B, 1, n) @ (B, n, n)


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
    proposals = S[:, None, :] @ (a / tau).softmax(dim=1)                         # (B, 1, n) @ (B, n, M)
    return proposals[:, 0].amin(dim=1)


def keep_mask(S, theta, beta, v):
    """Keep token j iff S[b, j] > β θ_b. β = 0 keeps every valid token; larger β keeps fewer."""
    return (S > beta * theta[:, None]) & v


def keep_statistic(S, theta, v, rule):
    """What a layer's bar β_ℓ is compared with, per token: keep j iff statistic > β_ℓ. (B, n)
    ratio:  S_j / θ_b, SPEC's rule (keep S > β_ℓ θ). Scale-free within a sample, so a scene whose
            scores are flat (nothing stands out) looks the same whether it is empty or full.
    margin: n_b (S_j - θ_b), how far above its own bar a token stands, in units of the uniform
            share 1 / n_b; a flat scene has every token near 0 and a salient token stands out."""
    if rule == "ratio":
        return S / theta[:, None].clamp_min(torch.finfo(S.dtype).tiny)
    return v.sum(dim=1, keepdim=True) * (S - theta[:, None])


def share_threshold(statistic, v, rho):
    """The bar β_ℓ above which a share ρ of the valid tokens lies, pooled over the batch: the batch
    keeps ceil(ρ C) of its C valid tokens, but each sample as many as it has above the bar. ρ = 1 keeps
    all. Computed where the tokens are, with nothing read on the host."""
    s = statistic.masked_fill(~v, float("-inf")).flatten().sort(descending=True).values   # (B * n,) valid first
    count = v.sum()
    # round: ρ = 0.4 in float32 times 80 is 32.0000005; double, as Python's float would be
    rho = torch.as_tensor(rho, dtype=torch.float64, device=count.device)
    k = torch.ceil(torch.round(rho * count, decimals=4)).long()
    return torch.where(k < count, s[k.clamp(max=len(s) - 1)], float("-inf"))


def top_k_mask(scores, v, k):
    """Keep each sample's k[b] highest-scoring valid tokens. (B, n) bool"""
    order = scores.masked_fill(~v, float("-inf")).argsort(dim=1, descending=True)   # (B, n)
    rank = order.argsort(dim=1)                                                       # (B, n)
    return (rank < k[:, None]) & v


def keep_share(beta):
    """ρ = 1 / (1 + β): the share of its tokens a layer keeps under cls-static and the fitted
    budgets, so that the same knob β (0 keeps all, larger prunes more) drives every method."""
    return 1 / (1 + beta)


def static_keep_count(n, beta):
    """cls-static keeps the fixed share ρ = keep_share(β) of each sample's tokens, ceil(n ρ), written
    as a division so that a whole n / (1 + β) is not pushed up by rounding. n (B,) -> (B,)"""
    return torch.minimum(torch.ceil(n / (1 + beta)), n).long()


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
    layer sees (SPEC section 3, batches). Reads W and R', the new sequence's size: one host sync.
    """
    valid = seq.valid
    B, N = valid.shape
    fused = valid[:, 1:] & ~keep                                                   # (B, n)
    count = keep.sum(dim=1)                                                        # (B,)
    length = 1 + count + fused.any(dim=1)                                          # (B,) CLS, kept, package
    W, R = torch.stack([length.max(), length.sum()]).tolist()                      # the layer's one host sync
    # kept tokens first, in their original order: sort by (pruned?, position)
    position = torch.arange(N - 1, device=x.device)
    idx = ((~keep) * N + position).argsort(dim=1)[:, : W - 1]                      # (B, W-1)
    row = unpack(torch.arange(len(x), device=x.device), seq)                       # (B, N) packed row of each slot
    src = torch.cat([row[:, :1], row[:, 1:].gather(1, idx)], dim=1)                 # (B, W) the row each slot copies
    slot = torch.arange(W, device=x.device)[None, :]                               # (1, W)
    valid_out = slot < length[:, None]                                             # (B, W)
    out = Seq(valid_out, real_slots(valid_out, R))
    x_fuse = package_weights(S, fused).to(x.dtype)[:, None, :] @ unpack(x, seq)[:, 1:]   # (B, 1, n) @ (B, n, D)
    is_package = pack(slot == 1 + count[:, None], out)                             # (R',)
    sample = pack(torch.arange(B, device=x.device)[:, None].expand(B, W), out)     # (R',) sample of each row
    x = torch.where(is_package[:, None], x_fuse[:, 0].index_select(0, sample),     # (R', D)
                    x.index_select(0, pack(src, out)))
    return x, out, idx


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

    def record(self, encoder, valid_in, valid_out, idx=None, packaged=None, concepts=0, features=False):
        """idx (B, W-1): the prunable slot each kept token came from, as prune_tokens returns it
        (None: nothing was pruned); packaged (B,): which samples built a package token; concepts: M
        if MAG's logits a were computed, else 0; features: whether f_l was. The last three only
        count MADTP's own MACs."""
        rec = dict(n_in=valid_in.sum(dim=1), n_out=valid_out.sum(dim=1), packaged=packaged,
                   concepts=concepts, features=features)
        if self.positions:
            rec["kept"] = self._pos[encoder] = self._positions(encoder, valid_in, rec, idx)
        self.layers[encoder].append(rec)

    def _positions(self, encoder, valid_in, rec, idx):
        """(B, N') original token index of every slot after this layer; -1 marks a package token
        or padding. The fusion encoder's text tokens continue the text encoder's numbering."""
        B, N = valid_in.shape
        if encoder not in self._pos:
            if encoder == "fusion" and "text" in self._pos:   # one forward: text, then fusion
                self.start.setdefault("fusion", self._pos["text"])
            self._pos[encoder] = self.start.get(encoder, torch.arange(N, device=valid_in.device)
                                                .expand(B, N).masked_fill(~valid_in, -1))
        pos = self._pos[encoder]
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
    """A hook that prunes nothing and only counts: for dense models and switched-off encoders."""
    def hook(layer, x_in, x, seq, A):
        trace.record(encoder, seq.valid, seq.valid)
        return x, seq
    return hook


class MADTP(nn.Module):
    """T (the alignment tokens), β (the budget) and the per-layer bars β_ℓ; `hooks` gives the VLT a
    pruning hook per encoder. Like BatchNorm, it fits in training mode (each batch sets the bars
    β_ℓ for the share ρ that β asks for) and uses the frozen bars in eval mode, so that a sample's
    result never depends on its batch-mates at evaluation."""

    def __init__(self, cfg: MADTPConfig, dim: int, depths: tuple, max_tokens: int):
        super().__init__()
        self.cfg, self.depths = cfg, dict(zip(ENCODERS, depths))   # (L_v, L_t, L_f)
        self.T = nn.Parameter(torch.randn(cfg.num_align_tokens, dim))   # N(0, 1), as official
        self.register_buffer("beta", torch.tensor(0.0))                  # β, set by the controller
        # β_ℓ per (encoder, layer) for the fitted budgets; -inf (keep all) until first fitted
        self.register_buffer("bars", torch.full((len(ENCODERS), max(depths)), float("-inf")))
        # the random baseline's fixed scores; rebuilt from RANDOM_SEED, so not saved in checkpoints
        self.register_buffer("random", random_table(depths, max_tokens), persistent=False)

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
            return count_only(trace, encoder)(layer, x_in, x, seq, A)
        return prune

    def aligns(self, encoder, trace):
        """MADTP's vision and text encoders feed L_align while training; fusion features never do (SPEC 3)."""
        return trace.features and self.cfg.method == "madtp" and encoder != "fusion"

    @staticmethod
    def add_features(encoder, P, X, trace):
        f = concept_features(P, X)
        trace.F[encoder] = trace.F[encoder] + f if encoder in trace.F else f

    def prune_layer(self, encoder, layer, x_in, x, seq, A, trace):
        """SPEC section 3 in one layer: scores S, threshold θ, keep S > βθ, package the rest.
        x_in, x (R, D) packed: MAG reads the layer's input x_in, the pruning packages x."""
        cfg, valid = self.cfg, seq.valid
        v = valid[:, 1:]                                                           # (B, n)
        concepts, features = 0, False
        if cfg.method == "cls-static":
            S = importance(cls_score(A)[:, None], v)
            keep = top_k_mask(S, v, static_keep_count(v.sum(dim=1), self.beta))
        else:
            a = mag_logits(x_in, seq, self.T)
            S_cls, S_self = cls_score(A), self_score(A, v)
            if cfg.method == "dtp-no-mag":
                S = importance(torch.stack([S_cls, S_self], dim=1), v)
            else:
                P = concept_attention(a)
                S = importance(torch.stack([S_cls, S_self, mag_score(P)], dim=1), v)
            theta = threshold(a, S, cfg.tau)
            keep = self.keep(encoder, layer, S, theta, v)
            concepts = cfg.num_align_tokens
            if cfg.method == "random":              # MADTP's counts, random choice of tokens
                S = normalise(random_scores(self.random[ENCODERS.index(encoder), layer], v), v)
                keep = top_k_mask(S, v, keep.sum(dim=1))
            if self.aligns(encoder, trace):
                self.add_features(encoder, P, unpack(x_in, seq)[:, 1:], trace)
                features = True
        x, seq_out, idx = prune_tokens(x, seq, keep, S)
        trace.record(encoder, valid, seq_out.valid, idx, (v & ~keep).any(dim=1), concepts, features)
        return x, seq_out

    def keep(self, encoder, layer, S, theta, v):
        """The keep decision of the threshold methods: each sample's own θ, and the budget rule's bar."""
        if self.cfg.budget == "global":
            return keep_mask(S, theta, self.beta, v)
        statistic = keep_statistic(S, theta, v, self.cfg.rule)
        e = ENCODERS.index(encoder)
        fits = self.training and (self.cfg.budget != "encoder" or layer == self.cfg.first_layer)
        if fits:   # the encoder budget fits at its first pruned layer and keeps that bar after it
            rho = keep_share(self.beta)
            if self.cfg.budget == "back":
                k, K = layer - self.cfg.first_layer + 1, self.depths[encoder] - self.cfg.first_layer
                rho = rho ** (2 * k / (K + 1))
            self.bars[e, layer:] = share_threshold(statistic.detach(), v, rho)
        return (statistic > self.bars[e, layer]) & v

    def hooks(self, trace: Trace):
        return {e: self.hook(e, trace) for e in ENCODERS}


# ---------------------------------------------------------------------------------------------
# GFLOPs per sample (SPEC section 5)
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
    the logits a and the proposals inside θ (M per token each), the features f_l, and x_fuse."""
    n = r["n_in"] - 1
    macs = r["concepts"] * n * (cfg.dim + 1)
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
