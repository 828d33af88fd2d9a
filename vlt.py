"""A small vision-language transformer (VLT) for image-text retrieval, built from scratch.

The model MADTP prunes (Cao et al., "MADTP: Multimodal Alignment-Guided Dynamic Token Pruning for
Accelerating Vision-Language Transformer", CVPR 2024, arXiv 2403.02991, section 3.1; official code
github.com/double125/MADTP, built on BLIP). It is ALBEF/BLIP-shaped: a vision encoder and a text
encoder (dual encoder, for ITC retrieval) followed by a fusion encoder whose text tokens
cross-attend to the image tokens (for ITM re-ranking).

Every block calls an optional prune hook (PruneHook) after its self-attention residual add, before
cross-attention and the MLP: that is where the official code prunes, and where madtp.py plugs in.
Attention runs PyTorch's fused kernel (scaled_dot_product_attention) wherever nobody reads its
weights: the dense model, cross-attention, and every layer that does not prune. A pruned layer says
what of the weights A its score reads (PruneHook.reads): the CLS row (S_cls), computed beside the
fused output by one more row of QKᵀ, or also the strongest head's weight per (query, key) pair
(S_self), for which A is written out, a few samples at a time so that the (B, H, N, N) matrix is
never whole (docs/speed.md).

The residual stream is packed: it holds only the R real tokens of a batch, (R, D), never padding
(FlashAttention's "unpad" layout). Per-sample pruning leaves every sample with its own count, so a
padded batch would spend on padding much of what pruning saved; packed, the projections, MLP,
LayerNorm and residual adds (most of the compute) run on real tokens only, and attention is the one
place that needs the padded (B, N) grid. A `Seq` says where the real tokens sit. Building one reads
one number on the host (R): once per input sequence and once per pruned layer, never in a dense
layer, so a GPU can run every dense layer ahead of the host (docs/speed.md).

Shapes: B batch, N tokens (index 0 is CLS), R real tokens of a batch, D width, H heads. `valid`
(B, N) is False for padding.
"""

import math
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F_  # F is the paper's concept features (madtp.py); keep the name free
from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

# what a pruned layer's score reads of its attention weights A (PruneHook.reads)
READS_NOTHING, READS_CLS, READS_ALL = "nothing", "cls", "all"
# on the CPU, pruned layers write out A for this many bytes of weights at a time: a chunk stays in
# cache and below glibc's mmap threshold, where the whole (B, H, N, N) matrix at 257 tokens is
# 100 MB, paged in afresh at every call and 2.5 times slower (docs/speed.md); a GPU takes it whole
ATTENTION_CHUNK_BYTES = 8 * 2 ** 20


# torch.utils.flop_counter knows the GPU's fused attention kernels but not the CPU's, where it would
# count 0: torch's own formulas, registered for the CPU kernel, so that FlopCounterMode counts every run
_cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
if _cpu_flash is not None and _cpu_flash not in flop_registry:
    register_flop_formula(_cpu_flash)(lambda q, k, v, *args, **kwargs: sdpa_flop_count(q, k, v))
    register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)(
        lambda grad, q, k, v, *args, **kwargs: sdpa_backward_flop_count(grad, q, k, v))


@dataclass
class Weights:
    """What a pruner reads of a layer's attention weights A (B, H, N, Nc), never held whole."""
    cls: torch.Tensor                        # (B, H, Nc) A[:, :, 0]: how CLS attends, per head
    head_max: Optional[torch.Tensor] = None  # (B, N, Nc) A.amax(dim=1): the strongest head's weight


@dataclass
class PruneHook:
    """The seam between the model and a pruner. After a block's self-attention residual add,
    prune(layer, x_in, x, seq, A) -> (x, seq): x_in is the block's input, x the tokens after the
    add, both packed (R, D), seq their Seq, A the layer's Weights, or None when reads(layer) is
    READS_NOTHING (the fused kernel ran). Returns the (shorter) packed sequence and its Seq."""
    prune: Callable
    reads: Callable[[int], str] = lambda layer: READS_NOTHING


@dataclass
class VLTConfig:
    image_size: int = 64      # synthetic scenes are 64x64; the coco preset raises it
    patch_size: int = 8       # 8x8 patches: an 8x8 grid, 64 vision tokens plus CLS
    vocab_size: int = 512     # overwritten by the tokenizer's vocabulary size
    max_text_len: int = 40    # [CLS] + up to 39 words: the longest synthetic caption has 37
    dim: int = 64             # D, shared by all encoders so MAG's map q can be the identity
    heads: int = 4            # H; head width D / H = 16
    mlp_ratio: int = 4        # MLP hidden width = mlp_ratio * D, as in ViT and BERT
    vision_layers: int = 12   # L_v: ViT-B's depth, so that a cut can be spread over many layers
    text_layers: int = 2      # L_t
    fusion_layers: int = 2    # L_f
    embed_dim: int = 64       # width of the shared ITC embedding
    init_temp: float = 0.07   # initial ITC temperature (CLIP/ALBEF)

    def __post_init__(self):   # every field is a flag of train.py: the messages name them so
        check_fields(self, dict(max_text_len=(2, ": [CLS] and one word"), **dict.fromkeys(
            ["image_size", "patch_size", "dim", "heads", "mlp_ratio", "vision_layers", "text_layers",
             "fusion_layers", "embed_dim"], (1, ""))), positive=("init_temp",))
        if self.image_size % self.patch_size:
            raise ValueError("--image-size must be a multiple of --patch-size")
        if self.dim % self.heads:
            raise ValueError("--dim must be a multiple of --heads")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def flag(name):
    return name.replace("_", "-")


def check_fields(cfg, at_least=(), positive=()):
    """The bounds a config's __post_init__ states: every float finite, counts at least their least
    value ({field: (least, why)}), the `positive` fields above 0."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"--{flag(f.name)} must be a finite number, got {v}")
    for name, (least, why) in dict(at_least).items():
        if getattr(cfg, name) < least:
            raise ValueError(f"--{flag(name)} must be at least {least}{why}, got {getattr(cfg, name)}")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"--{flag(name)} must be > 0, got {getattr(cfg, name)}")


@dataclass
class Seq:
    """Where the real tokens of a padded batch sit. valid (B, N): False for padding. flat (R,): the
    index of each real token in the flattened (B * N) grid, in order. flat None: the packed tensor
    keeps every slot (packing is a reshape), because there is no padding, or because computing on it
    is cheaper than a host sync (the image tokens that fusion attends to); valid still masks it.
    padded: whether valid may hold padding, known on the host (attention skips the mask if not)."""
    valid: torch.Tensor
    flat: Optional[torch.Tensor] = None
    padded: bool = True


def seq_of(valid):
    """The Seq of a padded batch. Reads R on the host: the one sync of an encoder's input."""
    R = int(valid.sum())
    return Seq(valid, real_slots(valid, R), padded=R < valid.numel())


def real_slots(valid, R):
    """(R,) flat index of the real slots of valid (B, N), in order, given their count R (None when
    there is no padding, e.g. at batch 1): a stable sort puts the real slots first."""
    if R == valid.numel():
        return None
    return (~valid).flatten().to(torch.uint8).argsort(stable=True)[:R]


def pack(x, seq):
    """(B, N, ...) -> (R, ...): the real tokens only."""
    x = x.flatten(0, 1)                                                             # (B * N, ...)
    return x if seq.flat is None else x.index_select(0, seq.flat)


def unpack(x, seq):
    """(R, ...) -> (B, N, ...), zeros at padding."""
    B, N = seq.valid.shape
    if seq.flat is not None:
        x = x.new_zeros(B * N, *x.shape[1:]).index_copy(0, seq.flat, x)             # (B * N, ...)
    return x.view(B, N, *x.shape[1:])


def padding_bias(valid, dtype):
    """0 for real keys, -inf for padding: added to the attention logits. valid (B, Nc) -> (B, 1, 1, Nc)"""
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, float("-inf"))[:, None, None]


def chunk_of(q, Nc):
    """How many samples' weights (H, N, Nc) one chunk of a written-out attention holds."""
    B, H, N, _ = q.shape
    return B if q.device.type != "cpu" else max(1, ATTENTION_CHUNK_BYTES // (H * N * Nc * q.element_size()))


def written_out(q, k, v, bias):
    """softmax(q kᵀ / √d + bias) v, and the Weights a pruner reads, a chunk of samples at a time.
    q (B, H, N, d), k and v (B, H, Nc, d), bias (B, 1, 1, Nc) or None."""
    c = chunk_of(q, k.shape[2])
    if c >= len(q):   # one chunk (a GPU, or a small batch): no slicing and joining, a dozen fewer calls
        return attend(q, k, v, bias)
    parts = [attend(q[i:i + c], k[i:i + c], v[i:i + c], None if bias is None else bias[i:i + c])
             for i in range(0, len(q), c)]
    return torch.cat([o for o, _ in parts]), Weights(torch.cat([A.cls for _, A in parts]),
                                                     torch.cat([A.head_max for _, A in parts]))


def attend(q, k, v, bias):
    """One chunk of written_out: the output (c, H, N, d) and the Weights, A itself never kept."""
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5                             # (c, H, N, Nc)
    A = (logits if bias is None else logits + bias).softmax(dim=-1)
    # (c, H, N, d) out; Weights: (c, H, Nc) the CLS row, (c, N, Nc) the max over heads
    return A.to(v.dtype) @ v, Weights(A[:, :, 0], A.amax(dim=1))


def cls_row(q, k, bias):
    """The CLS row of the attention weights alone, beside a fused output: (B, H, Nc)."""
    logits = q[:, :, :1] @ k.transpose(-1, -2) * q.shape[-1] ** -0.5                   # (B, H, 1, Nc)
    return (logits if bias is None else logits + bias).softmax(dim=-1)[:, :, 0]


class Attention(nn.Module):
    """Multi-head attention; with reads, also what a pruner reads of its weights. Self-attention when ctx is x."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, seq, ctx, ctx_seq, reads=READS_NOTHING):
        """x (R, D) and ctx (Rc, D) packed, with their Seqs -> (R, D) and Weights (None if reads nothing)."""
        (B, N), Nc, H, D = seq.valid.shape, ctx_seq.valid.shape[1], self.heads, x.shape[-1]
        q = unpack(self.q(x), seq).view(B, N, H, D // H).transpose(1, 2)                  # (B, H, N, D/H)
        k, v = unpack(self.kv(ctx), ctx_seq).view(B, Nc, 2, H, D // H).permute(2, 0, 3, 1, 4)  # 2 x (B, H, Nc, D/H)
        bias = padding_bias(ctx_seq.valid, q.dtype) if ctx_seq.padded else None         # (B, 1, 1, Nc)
        A = None
        if reads == READS_ALL:
            out, A = written_out(q, k, v, bias)
        else:
            out = F_.scaled_dot_product_attention(q, k, v, attn_mask=bias)                 # (B, H, N, D/H)
            if reads == READS_CLS:
                A = Weights(cls_row(q, k, bias))
        return self.proj(pack(out.transpose(1, 2).reshape(B, N, D), seq)), A


class Block(nn.Module):
    """Pre-norm transformer block; with cross=True a fusion block (self, cross, MLP)."""

    def __init__(self, cfg: VLTConfig, cross: bool = False):
        super().__init__()
        D = cfg.dim
        self.ln1, self.attn = nn.LayerNorm(D), Attention(D, cfg.heads)
        self.ln_cross = nn.LayerNorm(D) if cross else None
        self.cross = Attention(D, cfg.heads) if cross else None
        self.ln2 = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, cfg.mlp_ratio * D), nn.GELU(), nn.Linear(cfg.mlp_ratio * D, D))

    def forward(self, x, seq, layer: int, prune: Optional[PruneHook] = None, image=None, image_seq=None):
        """x (R, D) packed, seq its Seq; image (B * Ni, D) for a fusion block."""
        x_in = x
        h = self.ln1(x)
        h, A = self.attn(h, seq, h, seq, prune.reads(layer) if prune is not None else READS_NOTHING)
        x = x + h
        if prune is not None:  # where the official code prunes: after self-attention, before cross-attn and MLP
            x, seq = prune.prune(layer, x_in, x, seq, A)
        if self.cross is not None:
            x = x + self.cross(self.ln_cross(x), seq, image, image_seq)[0]
        x = x + self.mlp(self.ln2(x))
        return x, seq


class VLT(nn.Module):
    def __init__(self, cfg: VLTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
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
        self.itc_vision = nn.Linear(D, cfg.embed_dim)
        self.itc_text = nn.Linear(D, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temp)))
        self.itm_head = nn.Linear(D, 2)
        self.apply(_init_weights)
        for p in (self.vision_cls, self.vision_pos, self.text_pos):
            nn.init.trunc_normal_(p, std=0.02)

    # -- input checks: a wrong input must fail here, with the fix, not deep inside a matmul --
    def _check_images(self, images):
        S = self.cfg.image_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2:] != (S, S):
            raise ValueError(f"images must have shape (B, 3, {S}, {S}) for this config, got {tuple(images.shape)}; "
                             f"resize them to image_size={S} (RGB) or build the model with a matching VLTConfig")

    def _check_text(self, ids, valid):
        """Shapes only: they cost nothing. The values are check_inputs' job."""
        L = self.cfg.max_text_len
        if ids.dim() != 2 or valid.shape != ids.shape or valid.dtype != torch.bool:
            raise ValueError(f"token ids must be (B, N) with a bool mask of the same shape, "
                             f"got ids {tuple(ids.shape)} and valid {tuple(valid.shape)} {valid.dtype}")
        if ids.shape[1] > L:
            raise ValueError(f"captions have {ids.shape[1]} tokens but max_text_len is {L}; "
                             f"truncate them with the tokenizer or raise max_text_len")

    def check_inputs(self, images, ids, valid):
        """Shapes and values of a batch, where it enters (train.py calls it on the CPU tensors, once
        per batch). The forward checks shapes only: checking values there would read them on the
        host, a sync that would stall a GPU in the middle of every forward."""
        self._check_images(images)
        self._check_text(ids, valid)
        V = self.cfg.vocab_size
        if ids.numel() and (ids.min() < 0 or ids.max() >= V):
            raise ValueError(f"token ids must lie in [0, {V}), got [{int(ids.min())}, {int(ids.max())}]; "
                             f"encode captions with the tokenizer the model was built for (vocab_size={V})")
        if not valid[:, 0].all():
            raise ValueError("token 0 of every caption must be a valid [CLS] token")

    # -- encoders --
    def encode_image(self, images, prune: Optional[PruneHook] = None):
        """images (B, 3, S, S) -> tokens (B, N, D), valid (B, N), after the final norm."""
        self._check_images(images)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)                # (B, P, D)
        x = torch.cat([self.vision_cls.expand(len(x), -1, -1), x], dim=1) + self.vision_pos
        seq = Seq(torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), padded=False)  # nothing to read
        x = pack(x, seq)                                                        # (B * N, D)
        for layer, block in enumerate(self.vision):
            x, seq = block(x, seq, layer, prune)
        return unpack(self.vision_norm(x), seq), seq.valid

    def encode_text(self, ids, valid, prune: Optional[PruneHook] = None):
        """ids, valid (B, N) -> tokens (B, N', D), valid (B, N'), after the final norm."""
        self._check_text(ids, valid)
        seq = seq_of(valid)
        x = pack(self.word_embed(ids) + self.text_pos[:, : ids.shape[1]], seq)     # (R, D)
        for layer, block in enumerate(self.text):
            x, seq = block(x, seq, layer, prune)
        return unpack(self.text_norm(x), seq), seq.valid

    def fuse(self, text, text_valid, image, image_valid, prune: Optional[PruneHook] = None):
        """Fusion encoder on text tokens attending to image tokens -> ITM logits (B, 2). The image
        tokens stay padded (flat None): cross-attention projects them twice per layer, a small cost
        next to the host sync that packing them would add."""
        if len(text) != len(image):
            raise ValueError(f"fusion needs one image per caption, got {len(image)} images and {len(text)} captions")
        seq, image_seq = seq_of(text_valid), Seq(image_valid)
        x, image = pack(text, seq), pack(image, image_seq)                       # (R, D), (B * Ni, D)
        for layer, block in enumerate(self.fusion):
            x, seq = block(x, seq, layer, prune, image, image_seq)
        return self.itm_head(self.fusion_norm(unpack(x, seq)[:, 0]))               # CLS rows only

    def forward(self, images, ids, valid, hooks=None):
        """Matching pairs (image b, caption b) -> tokens, ITC embeddings and the pairs' ITM logits.
        hooks: optional {"vision" | "text" | "fusion": PruneHook}."""
        if len(images) != len(ids):
            raise ValueError(f"got {len(images)} images but {len(ids)} captions; pairs need one of each")
        hooks = hooks or {}
        image, image_valid = self.encode_image(images, hooks.get("vision"))
        text, text_valid = self.encode_text(ids, valid, hooks.get("text"))
        e_img, e_txt = self.embed_image(image), self.embed_text(text)
        itm = self.fuse(text, text_valid, image, image_valid, hooks.get("fusion"))
        return dict(image=image, image_valid=image_valid, text=text, text_valid=text_valid,
                    e_img=e_img, e_txt=e_txt, itm=itm)

    def embed_image(self, image_tokens):
        """CLS token -> L2-normalised ITC embedding (B, E)."""
        return F_.normalize(self.itc_vision(image_tokens[:, 0]).float(), dim=-1)

    def embed_text(self, text_tokens):
        return F_.normalize(self.itc_text(text_tokens[:, 0]).float(), dim=-1)


def _init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.trunc_normal_(m.weight, std=0.02)


def positives(image_ids_a, image_ids_b):
    """(Ba,), (Bb,) -> (Ba, Bb) bool: pairs that show the same image (ITC positives, never ITM negatives)."""
    return image_ids_a[:, None] == image_ids_b[None, :]


def itc_loss(model: VLT, e_img, e_txt, image_ids):
    """Symmetric InfoNCE over the batch; captions of the same image count as positives (ALBEF)."""
    sim = model.logit_scale.exp().clamp(max=100) * e_img @ e_txt.t()           # (B, B) image x text
    pos = positives(image_ids, image_ids).float()
    target = pos / pos.sum(1, keepdim=True)
    loss_i2t = -(target * sim.log_softmax(1)).sum(1).mean()
    loss_t2i = -(target * sim.t().log_softmax(1)).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2, sim


def hard_negatives(sim, image_ids):
    """For each image a negative caption, and for each caption a negative image, sampled in
    proportion to their ITC similarity (ALBEF/BLIP), never a true pair. Non-finite similarities (a
    diverged model) weigh 0: they reach the loss, where training stops on them, not the sampler."""
    pos = positives(image_ids, image_ids)
    with torch.no_grad():
        def weights(s):   # + 1e-9 keeps a row with one negative samplable
            return torch.nan_to_num(s.float().softmax(1), nan=0.0, posinf=0.0).masked_fill(pos, 0) + 1e-9 * ~pos
        w_i2t, w_t2i = weights(sim), weights(sim.t())
        neg_text = torch.multinomial(w_i2t, 1).squeeze(1)                     # (B,) caption per image
        neg_image = torch.multinomial(w_t2i, 1).squeeze(1)                    # (B,) image per caption
    return neg_text, neg_image


def itm_loss(itm_logits, B):
    """itm_logits (3B, 2) for [B true pairs, B image+negative caption, B caption+negative image]."""
    labels = torch.zeros(len(itm_logits), dtype=torch.long, device=itm_logits.device)
    labels[:B] = 1
    return F_.cross_entropy(itm_logits.float(), labels)


def task_loss(model: VLT, images, ids, valid, image_ids, hooks=None, negatives=None):
    """L_task = L_itc + L_itm on a batch of matching pairs. The fusion encoder runs once on 3B pairs:
    the true ones, each image with a hard negative caption, each caption with a hard negative image,
    drawn from the ITC similarities unless negatives = (neg_text, neg_image) fixes them."""
    if len(images) != len(ids) or len(ids) != len(image_ids):
        raise ValueError(f"batch sizes differ: {len(images)} images, {len(ids)} captions, {len(image_ids)} image ids")
    if len(image_ids.unique()) < 2:
        raise ValueError("a training batch needs at least two different images to draw ITM negatives from")
    hooks = hooks or {}
    B = len(images)
    image, image_valid = model.encode_image(images, hooks.get("vision"))
    text, text_valid = model.encode_text(ids, valid, hooks.get("text"))
    e_img, e_txt = model.embed_image(image), model.embed_text(text)
    l_itc, sim = itc_loss(model, e_img, e_txt, image_ids)
    neg_text, neg_image = hard_negatives(sim, image_ids) if negatives is None else negatives
    arange = torch.arange(B, device=images.device)
    t_idx = torch.cat([arange, neg_text, arange])                               # (3B,) caption of each pair
    i_idx = torch.cat([arange, arange, neg_image])                              # (3B,) image of each pair
    itm = model.fuse(text[t_idx], text_valid[t_idx], image[i_idx], image_valid[i_idx], hooks.get("fusion"))
    return l_itc + itm_loss(itm, B), dict(itc=l_itc.detach(), image_of_pair=i_idx)


def recalls(sim, top_t, top_i, itm_i2t, itm_t2i, img2txt, txt2img, ks=(1, 5, 10)):
    """BLIP's itm_eval: each query's top-k ITC candidates re-scored by ITM logit + ITC similarity,
    then Recall@K image->text (any of the image's captions) and text->image, and r_mean, their mean.
    sim (I, T); top_t (I, k) captions per image; top_i (T, k) images per caption; itm_* their logits."""
    def ranks(sim, top, itm, targets):   # where the first of each query's targets ranks
        scores = torch.full_like(sim, -1e4)                                              # (Q, C)
        rows = torch.arange(len(top))[:, None].expand(-1, top.shape[1])                 # (Q, k)
        scores[rows, top] = itm.view(top.shape) + sim[rows, top]
        return torch.tensor([torch.isin(row.argsort(descending=True), torch.tensor(t)).nonzero()[0, 0].item()
                             for row, t in zip(scores, targets)])
    r_i = ranks(sim, top_t, itm_i2t, img2txt)
    r_t = ranks(sim.t(), top_i, itm_t2i, [[i] for i in txt2img])
    r = {f"{d}_r{k}": 100 * (rank < k).float().mean().item() for d, rank in (("i2t", r_i), ("t2i", r_t)) for k in ks}
    return dict(r, r_mean=sum(r.values()) / len(r))
