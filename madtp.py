"""MADTP: Multi-modality Alignment Guidance (MAG) and Dynamic Token Pruning (DTP).

Cao et al., "MADTP: Multimodal Alignment-Guided Dynamic Token Pruning for Accelerating
Vision-Language Transformer", CVPR 2024, arXiv 2403.02991: section 3.2 (MAG) and section 3.3 (DTP).
Official code: github.com/double125/MADTP (built on UPop/BLIP). Where this file departs from the
official code, the comment says so, and the README lists every difference.

The method in one breath: a learnable matrix T of M "alignment tokens" is shared by the vision and
text encoders. In every layer each modality's tokens attend to the concepts in T (logits a, concept
attention P), giving concept features F that an alignment loss L_align pulls together across
modalities. Each token gets an importance S = mean(S_cls, S_self, S_mag), every sample its own
threshold θ from the concepts; the tokens with S_j <= β θ_b are fused into one package token x_fuse,
the rest go on. β, one scalar for every layer, sets the compute budget (not in the paper, whose code
moves τ instead; train.py moves β toward a GFLOPs target).

How many tokens a sample keeps is the method's one switch (MADTPConfig.counts): "sample", its own
count above its own bar (the paper's description: a sample's result never depends on its batch),
or "batch-max", every sample the batch's largest count (the official code's Reduce_token).

The seam for research: experiments/ subclasses MADTP and overrides `decide` (the scores and keep
decision of a layer), `overhead` (its MACs) and `spec` (its name), and experiments/static.py
`prune_layer` (fixed widths); nothing else here knows of them.

Shapes: B batch, N tokens of a sequence (0 is CLS), n = N - 1 prunable tokens, D width, H heads, M
alignment tokens, W the longest sample after a layer. `v` (B, n) is False for padding.
"""

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F_

from vlt import PruneHook, VLTConfig, check_fields, full_precision, seq_of

ENCODERS = ("vision", "text", "fusion")
COUNTS = ("sample", "batch-max")


@dataclass
class MADTPConfig:
    counts: str = "batch-max"    # batch-max: every sample the batch's largest count (the official
                                 # code; measured best, docs/findings.md C1, C4); sample: its own (paper)
    num_align_tokens: int = 32   # M, the alignment tokens; official 100 at D = 768
    tau: float = 0.1             # τ of θ's softmax, fixed (official: moved by a ladder); measured
                                 # best of 0.03 to 1 over both count rules, docs/findings.md C1
    alpha: float = 0.1           # α, weight of L_align in L = L_task + α L_align (official, all tasks)

    def __post_init__(self):
        if self.counts not in COUNTS:
            raise ValueError(f"unknown count rule {self.counts!r}; choose one of {', '.join(COUNTS)}")
        check_fields(self, dict(num_align_tokens=(1, "")), positive=("tau",))
        if self.alpha < 0:
            raise ValueError(f"--alpha weighs L_align and cannot be negative, got {self.alpha}")


# ---------------------------------------------------------------------------------------------
# MAG: multi-modality alignment guidance (paper section 3.2)

def q(X):
    """The map of an encoder's tokens into the alignment space. Identity, as in the official BLIP
    code: all encoders share the width D, and a learnt map per encoder could satisfy L_align by
    collapsing instead of aligning the encoders' own tokens."""
    return X


def mag_logits(X, T, bias=None):
    """a = q(X) Tᵀ / √D: how strongly each prunable token X (B, n, D) matches each concept. T (D, M)
    comes transposed and scaled by 1 / √D (MADTP.hooks, once a forward); bias (B, n, 1) is -inf at
    padding, None where there is none. (B, n, M)"""
    T = T.expand(len(X), *T.shape)                                                  # (B, D, M)
    return torch.bmm(q(X), T) if bias is None else torch.baddbmm(bias, q(X), T)


def concept_attention(a):
    """P = softmax over the tokens j of a: each concept's attention over the sequence. (B, n, M)"""
    return a.softmax(dim=1)


def concept_features(P, X):
    """f_l = Pᵀ q(X): what each concept sees in this layer. (B, M, D); F sums it over layers."""
    return torch.bmm(P.transpose(1, 2), q(X))                           # (B, M, n) @ (B, n, D)


def alignment_loss(F_v, F_t):
    """L_align = mean over (b, m) of 1 - cos(F_v[b, m], F_t[b, m]), on matching pairs only."""
    return (1 - F_.cosine_similarity(F_v.float(), F_t.float(), dim=-1)).mean()


# ---------------------------------------------------------------------------------------------
# DTP: token importance, threshold, keep decision and package token (paper section 3.3)

def normalise(s):
    """Scores made to sum 1 over each sample's tokens (last dim). Every score here is exactly 0 at
    padding (A and P are softmaxes with -inf there), so padding needs no mask."""
    return s / s.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)


def cls_score(A):
    """S_cls[j]: attention from CLS to token j over the heads. A.cls (B, H, N) -> (B, n). Summed,
    not averaged: the same once normalised, in fewer calls. (Official: heads weighted by the norm
    of their output.)"""
    return A.cls[:, :, 1:].sum(dim=1)


def self_score(A, w):
    """S_self[j] = Σ_i max_h A[h, i, j] over valid prunable queries i (w (B, n), 1.0 at those): how
    much the other tokens look at j. A.head_max (B, N, N) is max_h A. (B, n)"""
    B, n = w.shape
    return torch.bmm(w.view(B, 1, n), A.head_max[:, 1:, 1:]).view(B, n)   # (B, 1, n) @ (B, n, n)


def mag_score(P):
    """S_mag[j] = max_m P[j, m]: how strongly some concept attends to j. (B, n) (Official: max_m of
    the raw logits a, which can be negative; the softmax form is well defined.)"""
    return P.amax(dim=2)


def importance(scores):
    """S = (S_cls + S_self + S_mag) / 3, each normalised to sum 1 over the sample's tokens, in one
    normalisation. scores (B, 3, n) the three stacked -> S (B, n), exactly 0 at padding."""
    return normalise(scores).mean(dim=1)


def threshold(a, S, inv_tau):
    """θ_b = min over m of Σ_j softmax_j(a[b, j, m] / τ) S[b, j]: each concept proposes the
    importance of what it attends to, and the weakest proposal is the bar. A convex combination of
    S, so min S <= θ <= max S. inv_tau: 1 / τ, a tensor. (B,)"""
    (B, n), M = S.shape, a.shape[2]
    proposals = torch.bmm(S.view(B, 1, n), (a * inv_tau).softmax(dim=1))        # (B, 1, n) @ (B, n, M)
    return proposals.view(B, M).amin(dim=1)


def keep_mask(S, theta, beta):
    """Keep token j iff S[b, j] > β θ_b: β = 0 keeps every token with a score, a larger β fewer.
    Padding, whose S is exactly 0, is never kept. (B, n) bool"""
    return S > beta * theta.view(-1, 1)


def batch_max(S, keep, v):
    """The official count rule (its Reduce_token): every sample keeps its K highest-scoring tokens,
    K the largest count `keep` gives any sample of the batch; the layer prunes nothing where K < 1
    or n - K <= 1 (n the batch's prunable width, padding included, as there). A sample's count, and
    so its result, depends on its batch-mates. Decided on the device, nothing read; a score tied
    with a sample's K-th is kept too. (B, n) bool"""
    K = keep.sum(dim=1).amax().view(1, 1)                                           # (1, 1)
    ranked = torch.where(v, S, -1.0).sort(dim=1, descending=True).values            # (B, n)
    kth = ranked.gather(1, (K - 1).clamp_min(0).expand(len(S), 1))                  # (B, 1)
    return torch.where((K >= 1) & (v.shape[1] - K > 1), (S >= kth) & v, v)


def dtp_layer(X, bias, v, A, T, inv_tau, beta, batch_maximum=False):
    """Section 3.3's decision in one layer, on its prunable tokens X (B, n, D), the fp32 residual
    stream: a and P (MAG), S = (S_cls + S_self + S_mag) / 3, θ, and keep S_j > β θ_b; with
    batch_maximum, the official count rule. bias (B, n, 1) -inf at padding, v (B, n) valid, A the
    attention's Weights, T and inv_tau as MADTP.hooks forms them. -> S, keep (B, n), P (B, n, M)"""
    a = mag_logits(X, T, bias)                                                      # (B, n, M)
    P = concept_attention(a)                                                        # (B, n, M)
    S = importance(torch.stack([cls_score(A), self_score(A, v.float()), mag_score(P)], dim=1))
    keep = keep_mask(S, threshold(a, S, inv_tau), beta)
    return S, batch_max(S, keep, v) if batch_maximum else keep, P


def prune_tokens(x, keep, S, ramp, W=None):
    """[CLS, kept tokens in original order, x_fuse] per sample, padded to the longest sample W.

    x (B, N, D); keep, S (B, n), S exactly 0 at padding; ramp: at least n increasing numbers in
    [0, 1), which order the tokens. The package token x_fuse = Σ_{j pruned} (S_j / Σ_{pruned} S) x_j
    follows the kept tokens where the sample pruned something. Returns x (B, W, D), its Seq and idx
    (B, W-1): slot 1 + i holds prunable token idx[b, i] while i < the sample's keep count. Reads W
    on the host: the layer's one host sync. (A W given, which must hold every sample, skips the
    read: experiments/static.py's fixed widths.)
    """
    (B, N, D), kept = x.shape, keep.float()                                       # (B, n) 1.0 if kept
    count, pruned = kept.sum(dim=1, keepdim=True), S - S * kept                   # (B, 1), (B, n)
    total = pruned.sum(dim=1, keepdim=True)                                       # (B, 1)
    length = count + total.sign()                                                 # (B, 1) kept, x_fuse
    lengths = None if W else [n for n, in length.tolist()]                        # the one host read
    W = W or 1 + int(max(lengths))
    # the kept tokens first, each group in its original order: the top of 1.0 (kept) less the ramp
    idx = (kept - ramp[: N - 1]).topk(W - 1, dim=1).indices                      # (B, W-1)
    x1 = x[:, 1:]                                                                 # (B, n, D)
    weights = (pruned / total.clamp_min(torch.finfo(S.dtype).tiny)).view(B, 1, N - 1)
    x_fuse = torch.bmm(weights, x1)                                               # (B, 1, D)
    x = torch.cat([x[:, :1], x1.gather(1, idx.view(B, W - 1, 1).expand(B, W - 1, D))], dim=1)
    rank = torch.arange(-1, W - 1, dtype=count.dtype, device=x.device)          # (W,) slot - 1
    x = torch.where((rank == count).view(B, W, 1), x_fuse, x)                     # x_fuse after the kept
    valid = rank < length                                                         # (B, W)
    return x, seq_of(valid, real=lengths and B + int(sum(lengths))), idx


def compile_pruner(backend="inductor"):
    """--compile: torch.compile the pruned layer's decision, once for all layers. (prune_tokens
    stays eager: around its host read, compiled code would recompile for every count it reads.)"""
    global dtp_layer
    dtp_layer = torch.compile(dtp_layer, dynamic=True, backend=backend)


# ---------------------------------------------------------------------------------------------
# The module that holds T and β and plugs DTP into the VLT

class Trace:
    """What one forward did, per encoder: for each layer its masks before and after (valid_in,
    valid_out (B, N)) and, where it pruned, the keep decision (B, n) and prune_tokens' idx; MAG's
    concept features F summed over layers (with features=True, for L_align); `overhead`, the
    pruner's own MACs per sample. Counts come from the masks only when asked for."""

    def __init__(self, features: bool = False):
        self.features, self.overhead = features, None
        self.layers = {e: [] for e in ENCODERS}   # encoder -> [dict(valid_in, valid_out, keep, idx)]
        self.F = {}                                # encoder -> (B, M, D)

    def record(self, encoder, valid_in, valid_out, keep=None, idx=None):
        self.layers[encoder].append(dict(valid_in=valid_in, valid_out=valid_out, keep=keep, idx=idx))

    def add_features(self, encoder, f):
        self.F[encoder] = self.F[encoder] + f if encoder in self.F else f

    def counts(self, encoder):
        """(B, L) tokens of each sample after each layer (CLS and package token included)."""
        return torch.stack([r["valid_out"].sum(dim=1) for r in self.layers[encoder]], dim=1)


class MADTP(nn.Module):
    """T (the alignment tokens) and β (the budget); `hooks` gives the VLT a hook per encoder."""

    def __init__(self, cfg: MADTPConfig, vcfg: VLTConfig):
        super().__init__()
        self.cfg, self.max_tokens = cfg, max(1 + vcfg.num_patches, vcfg.max_text_len)
        self.T = nn.Parameter(torch.randn(cfg.num_align_tokens, vcfg.dim))   # N(0, 1), as official
        self.register_buffer("beta", torch.tensor(0.0))                        # β, set by train.py

    @property
    def spec(self):
        """What names it in checkpoints and tables; a variant of experiments/ adds its options."""
        return dict(name=f"madtp-{self.cfg.counts}")

    def hooks(self, trace: Trace):
        """{encoder: PruneHook} for one forward, recording into trace."""
        trace.overhead = self.overhead
        # what every layer uses, formed once a forward: Tᵀ / √D (D, M), 1 / τ, prune_tokens' ramp
        consts = (self.T.t() / math.sqrt(self.T.shape[1]), self.T.new_tensor(1 / self.cfg.tau),
                  torch.linspace(0, 0.5, self.max_tokens, device=self.T.device))
        return {e: PruneHook(partial(self.prune_layer, e, trace, consts)) for e in ENCODERS}

    def prune_layer(self, encoder, trace, consts, layer, x_in, x, seq, A):
        """Section 3.3 in one layer: decide, then keep each sample's tokens and fuse the rest."""
        T, inv_tau, ramp = consts
        S, keep = self.decide(encoder, layer, x_in, seq, A, trace, T, inv_tau)
        x, out, idx = prune_tokens(x, keep, S, ramp)
        trace.record(encoder, seq.valid, out.valid, keep, idx)
        return x, out

    def decide(self, encoder, layer, x_in, seq, A, trace, T, inv_tau):
        """The scores S (B, n) and the keep decision (B, n) of one layer, in fp32, MAG reading the
        layer's input x_in (B, N, D). (layer is for experiments/' variants, which override this.)"""
        (B, N), v = seq.valid.shape, seq.valid[:, 1:]                                  # v (B, n)
        bias = None if seq.bias is None else seq.bias.view(B, N, 1)[:, 1:]              # (B, n, 1)
        with full_precision(x_in):
            S, keep, P = dtp_layer(x_in[:, 1:], bias, v, A, T, inv_tau, self.beta,
                                   self.cfg.counts == "batch-max")
            if trace.features and encoder != "fusion":   # fusion's concepts never enter L_align
                trace.add_features(encoder, concept_features(P, x_in[:, 1:]))
        return S, keep

    def overhead(self, n, D):
        """MADTP's own MACs per sample in a layer of n (B,) prunable tokens: the logits a, θ's
        proposals, S_self's sum over queries and x_fuse."""
        M = self.cfg.num_align_tokens
        return M * n * D + M * n + n * n + n * D


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
    macs = 4 * n_in * D * D + 2 * n_in * n_in * D + 2 * R * n_out * D * D    # q k v out; QKᵀ AV; MLP
    if m is not None:   # cross-attention: q, out; k, v; QKᵀ, AV
        macs = macs + 2 * n_out * D * D + 2 * m * D * D + 2 * n_out * m * D
    return macs


def head_macs(cfg):
    """What each encoder spends outside its blocks: patch embedding and the ITC / ITM heads."""
    D = cfg.dim
    return {"vision": cfg.num_patches * 3 * cfg.patch_size ** 2 * D + D * cfg.embed_dim,
            "text": D * cfg.embed_dim, "fusion": D * 2}


def gflops(cfg, trace: Trace, image_tokens=None):
    """Per-sample GFLOPs of each encoder that ran in a traced forward: {encoder: (B,) float64}.
    image_tokens (B,): for each fused pair, the tokens its image kept (cross-attention keys)."""
    out = {}
    for encoder, layers in trace.layers.items():
        macs, m = head_macs(cfg)[encoder], image_tokens if encoder == "fusion" else None
        for r in layers:
            n_in, n_out = r["valid_in"].sum(dim=1).double(), r["valid_out"].sum(dim=1).double()
            macs = macs + block_macs(cfg, n_in, n_out, m)
            if r["keep"] is not None:
                macs = macs + trace.overhead(n_in - 1, cfg.dim)
        if layers:
            out[encoder] = macs / 1e9
    return out


def dense_gflops(cfg, text_tokens):
    """Per-sample GFLOPs of the unpruned model for captions of text_tokens (B,) tokens (with CLS)."""
    n_t = text_tokens.double()
    n_v, heads = torch.full_like(n_t, 1 + cfg.num_patches), head_macs(cfg)
    return {"vision": (cfg.vision_layers * block_macs(cfg, n_v, n_v) + heads["vision"]) / 1e9,
            "text": (cfg.text_layers * block_macs(cfg, n_t, n_t) + heads["text"]) / 1e9,
            "fusion": (cfg.fusion_layers * block_macs(cfg, n_t, n_t, n_v) + heads["fusion"]) / 1e9}


def pair_gflops(cfg, vision, text, fusion, text_tokens):
    """What a retrieval pair costs: its image through the vision encoder, its caption through the
    text encoder and one fusion pass. vision, text, fusion (P,) each pair's parts, text_tokens (P,)
    its caption's length -> (mean GFLOPs per pair, the reduction from dense), tensors."""
    total = (vision + text + fusion).mean()
    return total, 1 - total / sum(dense_gflops(cfg, text_tokens).values()).mean()


def realised_reduction(cfg, trace, image_of_pair, text_tokens):
    """The GFLOPs reduction of a training batch's B true pairs (image b, caption b), the first B of
    its fusion passes, image_of_pair (3B,) the image of each: what the β controller reads."""
    B = len(text_tokens)
    g = gflops(cfg, trace, image_tokens=trace.counts("vision")[:, -1][image_of_pair])
    return pair_gflops(cfg, g["vision"], g["text"], g["fusion"][:B], text_tokens)[1]
