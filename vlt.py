"""A small vision-language transformer (VLT) for image-text retrieval, built from scratch.

The model MADTP prunes (Cao et al., "MADTP: Multimodal Alignment-Guided Dynamic Token Pruning for
Accelerating Vision-Language Transformer", CVPR 2024, arXiv 2403.02991, section 3.1; official code
github.com/double125/MADTP, built on BLIP): ALBEF/BLIP-shaped, a vision and a text encoder (a dual
encoder, for ITC retrieval), then a fusion encoder whose text tokens cross-attend to the image
tokens (for ITM re-ranking).

Every block calls an optional prune hook after its self-attention residual add, before
cross-attention and the MLP, where the official code prunes and madtp.py plugs in (PruneHook).
Attention runs PyTorch's fused kernel wherever nobody reads its weights; a pruned layer reads them
(S_cls the CLS row, S_self the strongest head), so there they are written out, and A V reuses A.

The stream is a padded batch (B, N, D) with a mask: per-sample pruning leaves each sample its own
count, and the batch shrinks to its longest sample. Attention masks the padding with one additive
bias; the MLP, most of a layer's work, runs on the real tokens only. Measured at the default
preset's sizes on the CPU (python -m experiments.layouts), the trained per-sample MADTP 50% against
the dense model at batch 64: 0.87x fully padded, 1.05x fully packed (every projection on the real
tokens, FlashAttention's "unpad" layout, this project's earlier one), 1.08x so; under the batch
maximum, where nothing is padded, 1.61x, 1.70x and 1.50x (random weights); at batch 1 all alike
(docs/speed.md, "Padded or packed"). A pruned layer reads one number on the host: its longest
output sample, which sets the padded width.

Shapes: B batch, N tokens (0 is CLS), D width, H heads, d = D / H, R real tokens of a batch.
"""

import math
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F_  # F is the paper's concept features (madtp.py): keep the name free
from torch.utils.flop_counter import (flop_registry, register_flop_formula, sdpa_backward_flop_count,
                                      sdpa_flop_count)

# torch.utils.flop_counter knows the GPU's fused attention kernels but not the CPU's, where it would
# count 0: torch's own formulas, registered for the CPU kernel, so that FlopCounterMode counts it
_cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
if _cpu_flash is not None and _cpu_flash not in flop_registry:
    register_flop_formula(_cpu_flash)(lambda q, k, v, *args, **kwargs: sdpa_flop_count(q, k, v))
    register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)(
        lambda grad, q, k, v, *args, **kwargs: sdpa_backward_flop_count(grad, q, k, v))


@dataclass
class VLTConfig:
    image_size: int = 64      # synthetic scenes are 64x64; the coco preset raises it
    patch_size: int = 8       # 8x8 patches: an 8x8 grid, 64 vision tokens plus CLS
    vocab_size: int = 512     # set from the tokenizer's vocabulary (not a flag)
    max_text_len: int = 40    # [CLS] + up to 39 words: the longest synthetic caption has 37
    dim: int = 64             # D, shared by all encoders so MAG's map q can be the identity
    heads: int = 4            # H; head width D / H = 16
    vision_layers: int = 12   # L_v: ViT-B's depth, so that a cut can be spread over many layers
    text_layers: int = 2      # L_t
    fusion_layers: int = 2    # L_f
    embed_dim: int = 64       # width of the shared ITC embedding
    mlp_ratio: int = 4        # MLP hidden width = mlp_ratio * D, as in ViT and BERT (not a flag)
    init_temp: float = 0.07   # initial ITC temperature, as CLIP and ALBEF (not a flag)

    def __post_init__(self):   # every field is a flag of train.py: the messages name them so
        counts = "image_size patch_size dim heads mlp_ratio vision_layers text_layers fusion_layers"
        check_fields(self, dict(max_text_len=(2, ": [CLS] and one word"),
                                **dict.fromkeys(counts.split() + ["embed_dim"], (1, ""))),
                     positive=("init_temp",))
        if self.image_size % self.patch_size:
            raise ValueError("--image-size must be a multiple of --patch-size")
        if self.dim % self.heads:
            raise ValueError("--dim must be a multiple of --heads")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def flag(name):
    return "--" + name.replace("_", "-")


def check_fields(cfg, at_least=(), positive=()):
    """The bounds a config's __post_init__ states: every float finite, counts at least their least
    value ({field: (least, why)}), the `positive` fields above 0."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{flag(f.name)} must be a finite number, got {v}")
    for name, (least, why) in dict(at_least).items():
        if getattr(cfg, name) < least:
            raise ValueError(f"{flag(name)} must be at least {least}{why}, got {getattr(cfg, name)}")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{flag(name)} must be > 0, got {getattr(cfg, name)}")


def full_precision(t):
    """A region where autocast is off. ITC's logits (about 100 times the similarity) and the keep
    decisions, comparisons of scores that differ in the third digit, need fp32: in bf16 they would
    round and the keep decisions would drift from the fp32 model's."""
    return torch.autocast(t.device.type, enabled=False)


@dataclass
class Seq:
    """A padded batch's mask: valid (B, N), False for padding; bias (B, 1, 1, N), 0 for real keys
    and -inf for padding, added to the attention logits; rows (R,), where the real tokens lie in
    the flattened (B N) batch, for the MLP. Both None where nothing is padded, rows also where R is
    not known on the host."""
    valid: torch.Tensor
    bias: Optional[torch.Tensor] = None
    rows: Optional[torch.Tensor] = None


def seq_of(valid, real=None):
    """The Seq of a batch (B, N): the bias is log(valid), 0 or -inf. real: the number of real
    tokens, where the host knows it: all B N (no padding), or their rows (a stable sort)."""
    B, N = valid.shape
    if real == B * N:
        return Seq(valid)
    rows = None if real is None else \
        valid.flatten().to(torch.uint8).argsort(descending=True, stable=True)[:real]
    return Seq(valid, valid.float().log().view(B, 1, 1, N), rows)


@dataclass
class Weights:
    """What a pruner reads of a layer's attention weights A (B, H, N, N), never kept whole."""
    cls: torch.Tensor        # (B, H, N) A[:, :, 0]: how CLS attends, per head
    head_max: torch.Tensor   # (B, N, N) A.amax(dim=1): the strongest head's weight per query, key


@dataclass
class PruneHook:
    """The seam between the model and a pruner. prunes(layer): whether that block prunes, so that
    its attention writes out the weights; prune(layer, x_in, x, seq, A) -> (x, seq) after the
    self-attention residual add: x_in the block's input, x after the add, both (B, N, D), A the
    layer's Weights (None where prunes(layer) is False); returns the shorter batch."""
    prune: Callable
    prunes: Callable[[int], bool] = lambda layer: True


class Attention(nn.Module):
    """Multi-head attention; with weights=True, also the Weights a pruner reads."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        # 1 / √d as a tensor: a Python float in arithmetic costs four more aten calls a layer
        self.register_buffer("scale", torch.tensor((dim // heads) ** -0.5), persistent=False)

    def forward(self, x, ctx, ctx_seq, weights=False):
        """x (B, N, D), ctx (B, Nc, D) with its Seq -> (B, N, D), and Weights or None."""
        (B, N, D), Nc, H = x.shape, ctx.shape[1], self.heads
        q = self.q(x).view(B, N, H, D // H).transpose(1, 2)                       # (B, H, N, d)
        k, v = self.kv(ctx).view(B, Nc, 2, H, D // H).permute(2, 0, 3, 1, 4)     # 2 x (B, H, Nc, d)
        if not weights:
            out = F_.scaled_dot_product_attention(q, k, v, attn_mask=ctx_seq.bias)   # (B, H, N, d)
            return self.proj(out.transpose(1, 2).reshape(B, N, D)), None
        # written out, one batched product a step: the pruner reads A, in fp32; A V reuses it
        q, k, v = (q * self.scale).flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)   # (B H, N, d)
        logits = torch.bmm(q, k.transpose(1, 2)) if ctx_seq.bias is None else torch.baddbmm(
            ctx_seq.bias.expand(B, H, 1, Nc).flatten(0, 1), q, k.transpose(1, 2))     # (B H, N, Nc)
        A = logits.softmax(dim=-1, dtype=torch.float32)
        out, A = torch.bmm(A, v).view(B, H, N, D // H), A.view(B, H, N, Nc)
        return self.proj(out.transpose(1, 2).reshape(B, N, D)), Weights(A[:, :, 0], A.amax(dim=1))


class Block(nn.Module):
    """Pre-norm transformer block; with cross=True a fusion block (self, cross, MLP)."""

    def __init__(self, cfg: VLTConfig, cross: bool = False):
        super().__init__()
        D, hidden = cfg.dim, cfg.mlp_ratio * cfg.dim
        self.ln1, self.attn = nn.LayerNorm(D), Attention(D, cfg.heads)
        self.ln_cross = nn.LayerNorm(D) if cross else None
        self.cross = Attention(D, cfg.heads) if cross else None
        self.ln2 = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, hidden), nn.GELU(), nn.Linear(hidden, D))

    def forward(self, x, seq, layer, hook=None, image=None, image_seq=None):
        """x (B, N, D) with its Seq; image (B, Ni, D) with its Seq for a fusion block."""
        h, A = self.attend(x, seq, hook is not None and hook.prunes(layer))
        if hook is not None:   # where the official code prunes: after self-attention, before the rest
            h, seq = hook.prune(layer, x, h, seq, A)
        return self.finish(h, seq, image, image_seq), seq

    def attend(self, x, seq, weights=False):
        """x + self-attention, and the weights where a pruner reads them."""
        h = self.ln1(x)
        h, A = self.attn(h, h, seq, weights)
        return x + h, A

    def finish(self, x, seq, image=None, image_seq=None):
        """Cross-attention to the image (a fusion block), then the MLP, on the real tokens only
        where the batch is padded."""
        if self.cross is not None:
            x = x + self.cross(self.ln_cross(x), image, image_seq)[0]
        if seq.rows is None:
            return x + self.mlp(self.ln2(x))
        flat = x.flatten(0, 1)                                                      # (B N, D)
        h = self.mlp(self.ln2(flat.index_select(0, seq.rows)))                      # (R, D)
        return flat.index_add(0, seq.rows, h.to(flat.dtype)).view_as(x)   # autocast: h is bf16


def compile_blocks(backend="inductor"):
    """--compile: torch.compile the two halves of a block, once for all layers of all encoders
    (compiling the model or each block instead recompiles on every layer's hook: docs/speed.md)."""
    Block.attend = torch.compile(Block.attend, dynamic=True, backend=backend)
    Block.finish = torch.compile(Block.finish, dynamic=True, backend=backend)


class VLT(nn.Module):
    def __init__(self, cfg: VLTConfig):
        super().__init__()
        self.cfg, D = cfg, cfg.dim
        # vision encoder
        self.patch_embed = nn.Conv2d(3, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.vision_cls = nn.Parameter(torch.zeros(1, 1, D))
        self.vision_pos = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, D))
        self.vision = nn.ModuleList(Block(cfg) for _ in range(cfg.vision_layers))
        self.vision_norm = nn.LayerNorm(D)
        # text encoder: token 0 of every caption is the [CLS] word id
        self.word_embed = nn.Embedding(cfg.vocab_size, D)
        self.text_pos = nn.Parameter(torch.zeros(1, cfg.max_text_len, D))
        self.text = nn.ModuleList(Block(cfg) for _ in range(cfg.text_layers))
        self.text_norm = nn.LayerNorm(D)
        # fusion encoder over the text encoder's tokens, cross-attending to the image tokens
        self.fusion = nn.ModuleList(Block(cfg, cross=True) for _ in range(cfg.fusion_layers))
        self.fusion_norm = nn.LayerNorm(D)
        # heads
        self.itc_vision, self.itc_text = nn.Linear(D, cfg.embed_dim), nn.Linear(D, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temp)))
        self.itm_head = nn.Linear(D, 2)
        self.apply(_init_weights)
        for p in (self.vision_cls, self.vision_pos, self.text_pos):
            nn.init.trunc_normal_(p, std=0.02)

    # -- input checks: a wrong input must fail here, with the fix, not deep inside a matmul --
    def check_shapes(self, images=None, ids=None, valid=None):
        """Shapes only, in the forward, where they cost nothing; values are check_inputs' job."""
        S, L = self.cfg.image_size, self.cfg.max_text_len
        if images is not None and (images.dim() != 4 or images.shape[1:] != (3, S, S)):
            raise ValueError(f"images must have shape (B, 3, {S}, {S}) for this config, got "
                             f"{tuple(images.shape)}; resize them to image_size={S} (RGB) or build "
                             "the model with a matching VLTConfig")
        if ids is not None and (ids.dim() != 2 or valid.shape != ids.shape or valid.dtype != torch.bool):
            raise ValueError(f"token ids must be (B, N) with a bool mask of the same shape, got ids "
                             f"{tuple(ids.shape)} and valid {tuple(valid.shape)} {valid.dtype}")
        if ids is not None and ids.shape[1] > L:
            raise ValueError(f"captions have {ids.shape[1]} tokens but max_text_len is {L}; "
                             "truncate them with the tokenizer or raise max_text_len")

    def check_inputs(self, images, ids, valid):
        """Shapes and values of a batch where it enters (train.py, on the CPU tensors): checked in
        the forward, values would be read on the host and stall a GPU."""
        self.check_shapes(images, ids, valid)
        V = self.cfg.vocab_size
        if ids.numel() and (ids.min() < 0 or ids.max() >= V):
            raise ValueError(f"token ids must lie in [0, {V}), got [{int(ids.min())}, "
                             f"{int(ids.max())}]; encode captions with the tokenizer the model was "
                             f"built for (vocab_size={V})")
        if not valid[:, 0].all():
            raise ValueError("token 0 of every caption must be a valid [CLS] token")

    # -- encoders --
    def encode_image(self, images, hook: Optional[PruneHook] = None):
        """images (B, 3, S, S) -> tokens (B, N, D) after the final norm, and their Seq."""
        self.check_shapes(images)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)                   # (B, P, D)
        x = torch.cat([self.vision_cls.expand(len(x), -1, -1), x], dim=1) + self.vision_pos
        seq = Seq(torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))     # no padding
        for layer, block in enumerate(self.vision):
            x, seq = block(x, seq, layer, hook)
        return self.vision_norm(x), seq

    def encode_text(self, ids, valid, hook: Optional[PruneHook] = None):
        """ids, valid (B, N) -> tokens (B, N', D) after the final norm, and their Seq."""
        self.check_shapes(ids=ids, valid=valid)
        x, seq = self.word_embed(ids) + self.text_pos[:, : ids.shape[1]], seq_of(valid)
        for layer, block in enumerate(self.text):
            x, seq = block(x, seq, layer, hook)
        return self.text_norm(x), seq

    def fuse(self, text, text_valid, image, image_valid, hook: Optional[PruneHook] = None):
        """Fusion encoder: text tokens (B, N, D) attending to image tokens (B, Ni, D) -> ITM (B, 2)."""
        if len(text) != len(image):
            raise ValueError(f"fusion needs one image per caption, got {len(image)} images and "
                             f"{len(text)} captions")
        x, seq, image_seq = text, seq_of(text_valid), seq_of(image_valid)
        for layer, block in enumerate(self.fusion):
            x, seq = block(x, seq, layer, hook, image, image_seq)
        return self.itm_head(self.fusion_norm(x[:, 0]))                           # CLS rows only

    def embed(self, tokens, head):
        """CLS token -> L2-normalised ITC embedding (B, E), in fp32 (full_precision)."""
        with full_precision(tokens):
            return F_.normalize(head(tokens[:, 0].float()), dim=-1)

    def similarity(self, e_img, e_txt):
        """ITC logits (I, T): the learnt inverse temperature times the cosine similarity, in fp32."""
        with full_precision(e_img):
            return self.logit_scale.exp().clamp(max=100) * e_img @ e_txt.t()

    def forward(self, images, ids, valid, hooks=None):
        """Matching pairs (image b, caption b) -> ITC embeddings and the pairs' ITM logits.
        hooks: optional {"vision" | "text" | "fusion": PruneHook}."""
        if len(images) != len(ids):
            raise ValueError(f"got {len(images)} images but {len(ids)} captions; pairs need one of each")
        hooks = hooks or {}
        image, image_seq = self.encode_image(images, hooks.get("vision"))
        text, text_seq = self.encode_text(ids, valid, hooks.get("text"))
        itm = self.fuse(text, text_seq.valid, image, image_seq.valid, hooks.get("fusion"))
        return dict(e_img=self.embed(image, self.itc_vision), e_txt=self.embed(text, self.itc_text),
                    itm=itm)


def _init_weights(m):
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.trunc_normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear):
        nn.init.zeros_(m.bias)


def positives(image_ids_a, image_ids_b):
    """(Ba,), (Bb,) -> (Ba, Bb) bool: pairs of the same image (ITC positives, never ITM negatives)."""
    return image_ids_a[:, None] == image_ids_b[None, :]


def itc_loss(sim, image_ids):
    """Symmetric InfoNCE over the ITC logits (B, B); captions of one image are all positives (ALBEF)."""
    pos = positives(image_ids, image_ids).float()
    target = pos / pos.sum(1, keepdim=True)
    return -((target * sim.log_softmax(1)).sum(1).mean() + (target * sim.t().log_softmax(1)).sum(1).mean()) / 2


def hard_negatives(sim, image_ids):
    """For each image a negative caption, and for each caption a negative image, sampled in
    proportion to their ITC similarity (ALBEF/BLIP), never a true pair. Non-finite similarities (a
    diverged model) weigh 0: they reach the loss, where training stops on them, not the sampler."""
    pos = positives(image_ids, image_ids)
    with torch.no_grad():
        def weights(s):   # + 1e-9 keeps a row with one negative samplable
            s = torch.nan_to_num(s.float().softmax(1), nan=0.0, posinf=0.0)
            return s.masked_fill(pos, 0) + 1e-9 * ~pos
        neg_text = torch.multinomial(weights(sim), 1).squeeze(1)          # (B,) caption per image
        neg_image = torch.multinomial(weights(sim.t()), 1).squeeze(1)     # (B,) image per caption
    return neg_text, neg_image


def task_loss(model: VLT, images, ids, valid, image_ids, hooks=None, negatives=None):
    """L_task = L_itc + L_itm on a batch of matching pairs. The fusion encoder runs once on 3B pairs:
    the true ones, each image with a hard negative caption, each caption with a hard negative image,
    drawn from the ITC similarities unless negatives = (neg_text, neg_image) fixes them. Also
    returns the image of each fused pair (3B,), for their GFLOPs."""
    if len(images) != len(ids) or len(ids) != len(image_ids):
        raise ValueError(f"batch sizes differ: {len(images)} images, {len(ids)} captions, "
                         f"{len(image_ids)} image ids")
    hooks, B = hooks or {}, len(images)
    image, image_seq = model.encode_image(images, hooks.get("vision"))
    text, text_seq = model.encode_text(ids, valid, hooks.get("text"))
    sim = model.similarity(model.embed(image, model.itc_vision), model.embed(text, model.itc_text))
    neg_text, neg_image = hard_negatives(sim, image_ids) if negatives is None else negatives
    arange = torch.arange(B, device=images.device)
    t_idx = torch.cat([arange, neg_text, arange])                          # (3B,) caption of each pair
    i_idx = torch.cat([arange, arange, neg_image])                         # (3B,) image of each pair
    itm = model.fuse(text[t_idx], text_seq.valid[t_idx], image[i_idx], image_seq.valid[i_idx],
                     hooks.get("fusion"))
    labels = (torch.arange(3 * B, device=images.device) < B).long()        # 1 for the true pairs
    return itc_loss(sim, image_ids) + F_.cross_entropy(itm.float(), labels), i_idx


def recalls(sim, top_t, top_i, itm_i2t, itm_t2i, txt2img, ks=(1, 5, 10)):
    """BLIP's itm_eval: each query's top-k ITC candidates re-scored by ITM logit + ITC similarity,
    then Recall@K image->text (any of the image's captions) and text->image, and r_mean, their mean.
    sim (I, T); top_t (I, k) captions per image, top_i (T, k) images per caption, itm_* their ITM
    logits; txt2img (T,) each caption's image. Computed where sim lies, read once at the end."""
    def first_rank(sim, top, itm, truth):   # (Q,) the rank of each query's first true candidate
        scores = torch.full_like(sim, -1e4).scatter(1, top, itm.view(top.shape) + sim.gather(1, top))
        rank = scores.argsort(dim=1, descending=True).argsort(dim=1)                 # (Q, C)
        return rank.masked_fill(~truth, sim.shape[1]).amin(dim=1)
    truth = positives(torch.arange(len(sim), device=sim.device), txt2img)           # (I, T)
    ranks = dict(i2t=first_rank(sim, top_t, itm_i2t, truth),
                 t2i=first_rank(sim.t(), top_i, itm_t2i, truth.t()))
    r = torch.stack([100 * (rank < k).float().mean() for rank in ranks.values() for k in ks]).tolist()
    r = dict(zip([f"{d}_r{k}" for d in ranks for k in ks], r))
    return dict(r, r_mean=sum(r.values()) / len(r))
