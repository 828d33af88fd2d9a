"""Tests for the MADTP reference: tiny configs on the CPU; each checks a property that the method
(arXiv 2403.02991, sections 3.2-3.3), the model, the data or the pipeline promises. Run with
`pytest` (the research code's own tests are in experiments/test_experiments.py). Tests that need
../shared/coco-mini skip when it is absent. MADTP_TEST_DEVICE=cuda runs the tests marked `device`
on a GPU (experiments.gpucheck does)."""

import ast
import contextlib
import functools
import http.server
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import zipfile
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision.io import encode_jpeg, write_file

import data
import madtp as madtp_module
import train
import vlt
from experiments.common import HostSyncs
from madtp import (COUNTS, ENCODERS, MADTP, MADTPConfig, Trace, alignment_loss, batch_max, dense_gflops, gflops,
                   keep_mask, normalise, prune_tokens, threshold)
from vlt import VLT, VLTConfig, seq_of, task_loss

# torchvision 0.29 deprecates its image codecs in favour of torchcodec, which this project does not depend on
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
HERE = Path(__file__).parent
COCO_MINI = HERE.parent / "shared" / "coco-mini"
DEVICE = torch.device(os.environ.get("MADTP_TEST_DEVICE", "cpu"))   # the `device` tests run there


# --- the method: MAG's scores, DTP's threshold, the count rules, x_fuse, GFLOPs (madtp.py) ------

TINY = VLTConfig(image_size=32, patch_size=8, vocab_size=40, max_text_len=16, dim=32, heads=2,
                 vision_layers=2, text_layers=2, fusion_layers=2, embed_dim=16)


def tiny_model(counts="sample", beta=1.0, seed=0, device=DEVICE):
    """A tiny VLT and a MADTP at β, in eval mode."""
    torch.manual_seed(seed)
    model, madtp = VLT(TINY).eval(), MADTP(MADTPConfig(counts=counts, num_align_tokens=8), TINY)
    madtp.beta.fill_(beta)
    return model.to(device), madtp.to(device)


def captions(lengths, pad_to=None, seed=0, device=DEVICE):
    """Random word ids for captions of the given lengths (words, CLS excluded), padded with 0."""
    g = torch.Generator().manual_seed(seed)
    N = 1 + (pad_to or max(lengths))
    ids = torch.zeros(len(lengths), N, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, 0] = 1
        ids[b, 1:1 + n] = torch.randint(3, TINY.vocab_size, (n,), generator=g)
    valid = torch.arange(N)[None] <= torch.tensor(lengths)[:, None]
    return ids.to(device), valid.to(device)


def images(B, seed=0, device=DEVICE):
    return torch.randn(B, 3, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(seed)).to(device)


def run(model, madtp, imgs, ids, valid):
    """One traced forward over matching pairs -> (outputs, trace, per-sample GFLOPs per encoder)."""
    trace = Trace()
    with torch.no_grad():
        out = model(imgs, ids, valid, madtp.hooks(trace) if madtp is not None else None)
    g = gflops(model.cfg, trace, image_tokens=trace.counts("vision")[:, -1]) if madtp is not None else None
    return out, trace, g


def pruned_any(trace):
    return any((r["valid_out"].sum(1) < r["valid_in"].sum(1)).any() for e in ENCODERS for r in trace.layers[e])


@pytest.mark.device
@pytest.mark.parametrize("counts", COUNTS)
def test_beta_zero_prunes_nothing_and_matches_dense(counts):
    model, madtp = tiny_model(counts, beta=0.0)
    imgs, (ids, valid) = images(3), captions([5, 9, 2])
    dense, _, _ = run(model, None, imgs, ids, valid)
    pruned, trace, _ = run(model, madtp, imgs, ids, valid)
    assert not pruned_any(trace)
    for key in ("e_img", "e_txt", "itm"):
        torch.testing.assert_close(pruned[key], dense[key], rtol=1e-5, atol=1e-5)


@pytest.mark.device
def test_batch_invariance():
    """Per-sample counts (the paper's): a sample's embeddings, ITM logits and GFLOPs do not depend on
    its batch-mates."""
    model, madtp = tiny_model("sample", beta=1.0)
    lengths = [3, 11, 7, 1]
    imgs, (ids, valid) = images(4), captions(lengths)
    together, trace, g = run(model, madtp, imgs, ids, valid)
    assert pruned_any(trace)
    for b, n in enumerate(lengths):
        alone, _, g1 = run(model, madtp, imgs[b:b + 1], ids[b:b + 1, : 1 + n], valid[b:b + 1, : 1 + n])
        for key in ("e_img", "e_txt", "itm"):
            torch.testing.assert_close(alone[key][0], together[key][b], rtol=1e-4, atol=1e-5)
        for e in ENCODERS:
            torch.testing.assert_close(g1[e][0], g[e][b])


def test_batch_max_keeps_the_batch_maximum_and_alone_is_the_per_sample_rule():
    """The official rule: in a batch every image keeps the largest count above β θ_b of any image
    (its top-S tokens); alone, a sample keeps exactly its own tokens above β θ_b."""
    official, paper = tiny_model("batch-max"), tiny_model("sample")
    lengths = [3, 11, 7, 1]
    imgs, (ids, valid) = images(4), captions(lengths)
    _, together, _ = run(*official, imgs, ids, valid)
    _, per_sample, _ = run(*paper, imgs, ids, valid)
    counts = per_sample.counts("vision")[:, 0]                               # each image's own (+ CLS, package)
    assert (together.counts("vision")[:, 0] == counts.max()).all() and (counts < counts.max()).any()
    for b, n in enumerate(lengths):
        pair = imgs[b:b + 1], ids[b:b + 1, : 1 + n], valid[b:b + 1, : 1 + n]
        alone, own = run(*official, *pair)[0], run(*paper, *pair)[0]
        for key in ("e_img", "e_txt", "itm"):
            torch.testing.assert_close(alone[key], own[key], rtol=1e-4, atol=1e-5)


def test_batch_max_prunes_nothing_where_its_guards_say_so():
    """Its two guards: nothing pruned where the batch's count K < 1, or where n - K <= 1."""
    v, S = torch.ones(2, 6, dtype=torch.bool), torch.rand(2, 6)
    assert batch_max(S, torch.zeros(2, 6, dtype=torch.bool), v).all()               # K = 0
    assert batch_max(S, v & (torch.arange(6) < 5), v).all()                          # n - K = 1
    three = batch_max(S, torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]).bool(), v)
    assert three.sum(dim=1).tolist() == [3, 3] and torch.equal(three, S.argsort(1, descending=True).argsort(1) < 3)
    tied = torch.tensor([[0.5, 0.4, 0.4, 0.1, 0.0, 0.0], [0.3, 0.1, 0.2, 0.2, 0.2, 0.0]])   # ties at the 2nd
    two = batch_max(tied, torch.tensor([[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]).bool(), v & (tied > 0))
    assert two.tolist() == [[1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 1, 0]]                          # padding never


def test_prune_tokens_keeps_cls_and_the_kept_in_order_then_x_fuse():
    """[CLS, kept tokens in original order, x_fuse] per sample: x_fuse the S-weighted mean of the
    pruned tokens, present only where something was pruned; padding never kept or fused."""
    v = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    S = normalise(torch.rand(3, 6) * v)                                              # 0 at padding, as scores are
    keep = torch.tensor([[1, 0, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    x = torch.randn(3, 7, 4)
    out, seq, idx = prune_tokens(x, keep, S, torch.linspace(0, 0.5, 6))
    assert seq.valid.int().tolist() == [[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0]]
    assert (seq.bias[:, 0, 0] == torch.where(seq.valid, 0.0, -math.inf)).all()
    w = normalise(S * (v & ~keep))                                                  # the package weights
    torch.testing.assert_close(out[:, 0], x[:, 0])                                   # CLS first, always
    torch.testing.assert_close(out[0, 1:3], x[0, [1, 4]])
    torch.testing.assert_close(out[0, 3], (w[0, :, None] * x[0, 1:]).sum(0))
    torch.testing.assert_close(out[1], x[1])
    torch.testing.assert_close(out[2, 1], (w[2, :, None] * x[2, 1:]).sum(0))
    assert idx[0, :2].tolist() == [0, 3] and idx[1].tolist() == list(range(6))


def test_threshold_lies_between_min_and_max_score():
    g = torch.Generator().manual_seed(0)
    for tau in (0.1, 1.0, 10.0):
        v = torch.rand(8, 20, generator=g) > 0.3
        v[:, 0] = True
        a = (torch.randn(8, 20, 5, generator=g) * 3).masked_fill(~v[:, :, None], -math.inf)
        S = normalise(torch.rand(8, 20, generator=g) * v)
        theta = threshold(a, S, torch.tensor(1 / tau))
        lo, hi = S.masked_fill(~v, math.inf).amin(1), S.amax(1)
        assert (lo <= theta + 1e-7).all() and (theta <= hi + 1e-7).all()
        assert (keep_mask(S, theta, torch.tensor(0.0)) == v).all()


@pytest.mark.parametrize("counts", COUNTS)
def test_larger_beta_keeps_fewer_tokens(counts):
    """β is one monotone knob: what calibration bisects on."""
    model, madtp = tiny_model(counts)
    imgs, (ids, valid) = images(4), captions([3, 11, 7, 5])
    kept = []
    for beta in (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0):
        madtp.beta.fill_(beta)
        trace = run(model, madtp, imgs, ids, valid)[1]
        kept.append(sum(int(t.sum()) for e in ENCODERS for t in [trace.counts(e)]))
    if counts == "batch-max":   # the official guard: past the β where no token passes, nothing is pruned
        cliff = next((i for i in range(1, len(kept)) if kept[i] > kept[i - 1]), len(kept))
        assert all(k == kept[0] for k in kept[cliff:]), kept
        kept = kept[:cliff]
    assert all(b <= a for a, b in zip(kept, kept[1:])), kept
    assert kept[-1] < kept[0]


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("beta", [None, 0.0, 1.0, 1.6])
def test_analytic_gflops_match_flop_counter(beta, counts):
    model, madtp = tiny_model(counts, beta=beta or 0.0, device="cpu")
    imgs, (ids, valid) = images(1, device="cpu"), captions([9], device="cpu")
    with FlopCounterMode(display=False) as counter:
        _, trace, g = run(model, madtp if beta is not None else None, imgs, ids, valid)
    analytic = sum(v.item() for v in (g or dense_gflops(TINY, valid.sum(1))).values())
    assert analytic == pytest.approx(counter.get_total_flops() / 2 / 1e9, rel=1e-6)


@pytest.mark.device
def test_the_keep_decision_is_made_in_fp32_under_autocast():
    """bf16 autocast: S, θ and the keep decision are computed in fp32 from the layer's (fp32)
    residual stream and attention weights, so they match fp32's exactly on the same inputs."""
    model, madtp = tiny_model()
    x = torch.randn(3, 9, TINY.dim, device=DEVICE)
    seq = seq_of(torch.arange(9, device=DEVICE)[None] < torch.tensor([[9], [6], [4]], device=DEVICE))
    _, A = model.vision[0].attn(x, x, seq, weights=True)
    T, inv_tau = madtp.T.t() / math.sqrt(TINY.dim), torch.tensor(10.0, device=DEVICE)
    decide = lambda: madtp.decide("vision", 0, x, seq, A, Trace(), T, inv_tau)   # noqa: E731
    S, keep = decide()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        S16, keep16 = decide()
        sim = model.similarity(torch.randn(4, 16, device=DEVICE), torch.randn(5, 16, device=DEVICE))
    assert S16.dtype == torch.float32 and sim.dtype == torch.float32 and A.cls.dtype == torch.float32
    assert torch.equal(S, S16) and torch.equal(keep, keep16)


@pytest.mark.device
@pytest.mark.parametrize("counts", COUNTS)
def test_a_forward_reads_the_device_once_per_pruned_layer(counts):
    """A GPU runs a forward ahead of the host: the dense forward reads nothing back, a pruned layer
    one number (the size of its shorter batch), counting the reads ATen makes inside operators."""
    model, madtp = tiny_model(counts)
    imgs, (ids, valid) = images(4), captions([3, 11, 7, 5])
    with torch.no_grad(), HostSyncs() as dense:
        model(imgs, ids, valid)
    assert dense.total == 0, dense.calls
    with torch.no_grad(), HostSyncs() as pruned:
        model(imgs, ids, valid, madtp.hooks(Trace()))
    layers = TINY.vision_layers + TINY.text_layers + TINY.fusion_layers
    assert pruned.calls == {"tolist": layers}, pruned.calls



def test_the_readme_example_runs_and_prunes(capsys):
    """The README's Python example, the first code a reader copies, runs as printed: each image
    keeps fewer tokens layer after layer, and the GFLOPs come out per pair and encoder."""
    readme = (Path(__file__).parent / "README.md").read_text()
    code = readme.split("```python\n")[1].split("```")[0]
    exec(compile(code, "README.md", "exec"), {})
    counts, costs = capsys.readouterr().out.splitlines()[-2:]
    for image in json.loads(counts):
        assert image == sorted(image, reverse=True) and image[-1] < image[0]
    assert set(ast.literal_eval(costs)) == set(ENCODERS)


# --- the model and its seam with the method: padding, attention, gradients (vlt.py) -----------

@pytest.mark.device
def test_longer_padding_changes_nothing():
    model, madtp = tiny_model()
    imgs = images(2)
    short, _, g_short = run(model, madtp, imgs, *captions([4, 6]))
    long, _, g_long = run(model, madtp, imgs, *captions([4, 6], pad_to=14))
    for key in ("e_img", "e_txt", "itm"):
        torch.testing.assert_close(long[key], short[key], rtol=1e-4, atol=1e-5)
    for e in ENCODERS:
        torch.testing.assert_close(g_long[e], g_short[e])


def test_padding_content_is_never_seen_or_kept():
    """Whatever sits in the padding (here: real word ids) is never kept, fused or attended."""
    model, madtp = tiny_model()
    imgs, (ids, valid) = images(2), captions([3, 10])
    noisy = ids.clone()
    noisy[~valid] = torch.randint(3, TINY.vocab_size, (int((~valid).sum()),), device=ids.device)
    a, trace, _ = run(model, madtp, imgs, ids, valid)
    b, _, _ = run(model, madtp, imgs, noisy, valid)
    for key in ("e_img", "e_txt", "itm"):
        torch.testing.assert_close(a[key], b[key])
    for e in ("text", "fusion"):
        for r in trace.layers[e]:
            assert not (r["keep"] & ~r["valid_in"][:, 1:]).any(), "a padding slot was kept"


def test_every_parameter_gets_a_finite_nonzero_gradient():
    model, madtp = tiny_model(beta=1.0)
    model.train()
    imgs, (ids, valid) = images(6), captions([3, 8, 5, 2, 7, 4])
    trace = Trace(features=True)
    loss, _ = task_loss(model, imgs, ids, valid, torch.arange(6, device=DEVICE), madtp.hooks(trace))
    (loss + madtp.cfg.alpha * alignment_loss(trace.F["vision"], trace.F["text"])).backward()
    assert pruned_any(trace)
    for name, p in [*model.named_parameters(), *(("madtp." + n, p) for n, p in madtp.named_parameters())]:
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_fused_attention_and_the_weights_match_written_out_attention():
    """The fused kernel and the written-out weights both equal plain softmax attention with the
    padding masked; the weights are the CLS row and the maximum over heads."""
    torch.manual_seed(0)
    attn, (_, valid) = vlt.Attention(16, 4), captions([3, 7, 5], device="cpu")
    seq, x = seq_of(valid), torch.randn(3, valid.shape[1], 16)
    q = attn.q(x).view(3, -1, 4, 4).transpose(1, 2)                                  # (B, H, N, d)
    k, v = attn.kv(x).view(3, -1, 2, 4, 4).permute(2, 0, 3, 1, 4)
    A = (q @ k.transpose(-1, -2) / 2).masked_fill(~valid[:, None, None, :], -math.inf).softmax(-1)
    expected = attn.proj((A @ v).transpose(1, 2).reshape(3, -1, 16))
    for weights in (False, True):
        out, W = attn(x, x, seq, weights=weights)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
        if weights:
            torch.testing.assert_close(W.cls, A[:, :, 0])
            torch.testing.assert_close(W.head_max, A.amax(dim=1))


@pytest.mark.device
def test_bf16_autocast_runs_and_prunes():
    model, madtp = tiny_model(beta=1.0)
    imgs, (ids, valid) = images(3), captions([4, 8, 2])
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out, trace, _ = run(model, madtp, imgs, ids, valid)
    assert all(torch.isfinite(out[k].float()).all() for k in ("e_img", "e_txt", "itm")) and pruned_any(trace)


def test_compiling_traces_each_piece_once_whatever_the_depth(monkeypatch):
    """--compile compiles the two halves of a block and the pruned layer's decision once for all
    layers: past the first layers, which meet each kind of input (padded or not), a deeper model
    makes no more graphs; and the output is the eager one's."""
    import torch._dynamo
    monkeypatch.setattr(vlt.Block, "attend", vlt.Block.attend)   # restored after the test
    monkeypatch.setattr(vlt.Block, "finish", vlt.Block.finish)
    monkeypatch.setattr(madtp_module, "dtp_layer", madtp_module.dtp_layer)
    imgs, (ids, valid) = images(3, device="cpu"), captions([4, 8, 2], device="cpu")

    def model_of(depth):
        torch.manual_seed(0)
        cfg = replace(TINY, vision_layers=depth, text_layers=depth)
        madtp = MADTP(MADTPConfig(counts="sample", num_align_tokens=8), cfg)
        madtp.beta.fill_(1.0)
        return VLT(cfg).eval(), madtp
    eager = {depth: run(*model_of(depth), imgs, ids, valid)[0] for depth in (2, 4)}
    vlt.compile_blocks(backend="eager")
    madtp_module.compile_pruner(backend="eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    graphs = []
    for depth in (2, 4):   # the deeper model after the shallow one: no new graph
        out = run(*model_of(depth), imgs, ids, valid)[0]
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        torch.testing.assert_close(out["itm"], eager[depth]["itm"])
    assert graphs[0] == graphs[1] > 0, graphs


def test_recalls_rank_as_a_loop_over_queries_does():
    """The vectorised Recall@K (no read per query) against BLIP's itm_eval written as a loop."""
    g = torch.Generator().manual_seed(0)
    I, k = 12, 5
    txt2img = torch.arange(2 * I) // 2
    sim = torch.randn(I, 2 * I, generator=g)
    top_t, top_i = sim.topk(k, dim=1).indices, sim.topk(k, dim=0).indices.t()
    itm_i2t, itm_t2i = torch.randn(I * k, generator=g), torch.randn(2 * I * k, generator=g)
    got = vlt.recalls(sim, top_t, top_i, itm_i2t, itm_t2i, txt2img)

    def ranks(sim, top, itm, targets):
        scores = torch.full_like(sim, -1e4)
        rows = torch.arange(len(top))[:, None].expand(-1, top.shape[1])
        scores[rows, top] = itm.view(top.shape) + sim[rows, top]
        return torch.tensor([min(row.argsort(descending=True).tolist().index(t) for t in ts)
                             for row, ts in zip(scores, targets)])
    r_i = ranks(sim, top_t, itm_i2t, [[2 * i, 2 * i + 1] for i in range(I)])
    r_t = ranks(sim.t(), top_i, itm_t2i, [[i] for i in txt2img.tolist()])
    for d, r in (("i2t", r_i), ("t2i", r_t)):
        for K in (1, 5, 10):
            assert got[f"{d}_r{K}"] == pytest.approx(100 * (r < K).float().mean().item())


# --- the data: synthetic scenes, the tokenizer, COCO and its downloader (data.py) -------------

POSITION_WORDS = {w for _, place in data.POSITIONS for w in place.split()}


@functools.lru_cache
def _splits(seed=0, num_train=40, max_objects=data.MAX_OBJECTS):
    return data.synthetic_splits(num_train, 12, 12, captions_per_image=2, seed=seed, max_objects=max_objects)


def _category(word):
    for name, words in (("size", data.SIZES), ("colour", data.COLOURS), ("shape", data.SHAPES),
                        ("position", POSITION_WORDS)):
        if word in words:
            return name
    return None


def _scene_of(split, c):
    """The set of objects a caption describes, read back from its content words."""
    words = data.pre_caption(split.captions[c], 1000)
    objects, current = [], {}
    for i, (word, content) in enumerate(zip(words, split.content_words(c))):
        if not content:
            continue
        category = _category(word)
        continues_position = category == "position" and i > 0 and _category(words[i - 1]) == "position"
        if category in current and not continues_position:
            objects.append(current)
            current = {}
        current[category] = f"{current[category]} {word}" if continues_position else word
    objects.append(current)
    assert all(len(o) == 4 for o in objects), (split.captions[c], objects)
    return frozenset(tuple(sorted(o.items())) for o in objects)


def test_synthetic_is_deterministic_by_seed():
    a, b, other = _splits(), data.synthetic_splits(40, 12, 12, captions_per_image=2, seed=0), _splits(seed=1)
    for name in ("train", "val", "test"):
        assert a[name].captions == b[name].captions
        assert torch.equal(a[name].pixels, b[name].pixels)
        assert torch.equal(a[name].object_masks, b[name].object_masks)
        assert a[name].captions != other[name].captions
        assert not torch.equal(a[name].pixels, other[name].pixels)
    # the test split does not depend on how much training data is asked for
    assert _splits(num_train=25)["test"].captions == a["test"].captions


def test_synthetic_shapes_and_datasets():
    split = _splits()["train"]
    assert split.pixels.shape == (40, 3, 64, 64) and split.pixels.dtype == torch.uint8
    assert split.object_patches(0).shape == (64,) and split.object_patches(0).dtype == torch.bool
    assert split.img2txt[3] == [6, 7] and split.txt2img[7] == 3
    image, caption, image_id = data.PairDataset(split)[7]
    assert caption == split.captions[7] and image_id == split.image_ids[3]
    assert torch.equal(image, split.image(3))   # synthetic images are never augmented
    tokenizer = data.Tokenizer.build(split.captions, 40)
    batch = next(data.train_batches(split, tokenizer, batch_size=8, seed=0))
    assert batch["images"].shape == (8, 3, 64, 64) and batch["ids"].shape == batch["valid"].shape
    assert len(set(batch["image_ids"].tolist())) > 1 and batch["ids"][:, 0].eq(data.CLS).all()


def test_synthetic_splits_are_disjoint_and_test_captions_unique():
    splits = _splits()
    scenes = {}
    for name, split in splits.items():
        per_image = [{_scene_of(split, c) for c in caps} for caps in split.img2txt]
        assert all(len(s) == 1 for s in per_image), "captions of one image describe different scenes"
        scenes[name] = [s.pop() for s in per_image]
        assert len(set(scenes[name])) == len(scenes[name])
    assert not set(scenes["train"]) & set(scenes["val"])
    assert not set(scenes["train"]) & set(scenes["test"])
    assert not set(scenes["val"]) & set(scenes["test"])
    test = splits["test"].captions
    assert len(set(test)) == len(test)


@pytest.mark.parametrize("max_objects", [data.MAX_OBJECTS, data.GRID ** 2])
def test_synthetic_content_words_align_with_pre_caption(max_objects):
    objects = []
    for split in _splits(max_objects=max_objects).values():
        for c, caption in enumerate(split.captions):
            words = data.pre_caption(caption, 1000)
            assert " ".join(words) == caption and len(words) <= data.synthetic_max_words(max_objects)
            flags = split.content_words(c)
            assert len(flags) == len(words)
            assert all((_category(w) is not None) == f for w, f in zip(words, flags)), caption
            counts = [sum(_category(w) == k for w in words) for k in ("size", "colour", "shape")]
            assert counts[0] == counts[1] == counts[2] and 1 <= counts[0] <= max_objects
            objects.append(counts[0])
    assert max(objects) > data.MAX_OBJECTS or max_objects == data.MAX_OBJECTS, "no scene used the larger range"


def test_object_patches_line_up_with_the_drawing():
    split = _splits()["train"]
    p = 8
    patches = split.pixels.float().unfold(2, p, p).unfold(3, p, p)  # (I, 3, 8, 8, p, p)
    patches = patches.permute(0, 2, 3, 1, 4, 5).flatten(1, 2).flatten(2)  # (I, P, 3 * p * p)
    object_diff, background_diff = [], []
    for i in range(split.num_images):
        flags = split.object_patches(i)
        assert flags.any() and not flags.all()
        background = patches[i, ~flags].view(-1, 3, p * p).median(0).values.median(-1).values  # (3,)
        diff = (patches[i].view(-1, 3, p * p) - background[None, :, None]).abs().mean((1, 2))  # (P,)
        object_diff.append(diff[flags].mean())
        background_diff.append(diff[~flags].mean())
        assert flags.sum() >= len(_scene_of(split, split.img2txt[i][0]))  # at least one patch per object
    assert torch.stack(object_diff).mean() > 3 * torch.stack(background_diff).mean()


def test_pre_caption_follows_blip():
    assert data.pre_caption('A Dog (big)!  runs: "fast"; home.', 50) == ["a", "dog", "big", "runs", "fast", "home"]
    assert data.pre_caption("one two three", 2) == ["one", "two"]
    with pytest.raises(ValueError, match=r"'\.\.\. !'"):
        data.pre_caption("... !", 10)


def test_tokenizer():
    tok = data.Tokenizer.build(["a red circle", "a blue square", "a red square"], max_len=5, min_count=1)
    assert tok.vocab[:3] == ["[PAD]", "[CLS]", "[UNK]"] and len(tok) == 3 + 5
    assert data.Tokenizer.build(["b a", "a"], max_len=5, min_count=2).vocab == data.SPECIAL_TOKENS + ["a"]
    ids, valid = tok.encode(["A red triangle.", "red"])
    assert ids.shape == valid.shape == (2, 4)
    assert ids[:, 0].tolist() == [data.CLS] * 2
    assert ids[0, 3] == data.UNK and ids[1, 2:].tolist() == [data.PAD] * 2
    assert valid.tolist() == [[True] * 4, [True, True, False, False]]
    ids, _ = tok.encode(["a b c d e f g"])  # truncated to max_len - 1 words
    assert ids.shape == (1, 5)
    assert tok.encode(["red"], pad_to=5)[0].shape == (1, 5)
    with pytest.raises(ValueError, match="pad_to"):
        tok.encode(["a red circle"], pad_to=3)
    with pytest.raises(ValueError, match="empty after cleaning"):
        tok.encode(["red", "?!."[1:]])
    with pytest.raises(ValueError, match="list of captions"):
        tok.encode("a red circle")


def test_tokenizer_state_dict_round_trip(tmp_path):
    tok = data.Tokenizer.build(["a red circle", "a blue square"], max_len=6)
    torch.save({"tokenizer": tok.state_dict()}, tmp_path / "t.pt")
    state = torch.load(tmp_path / "t.pt", weights_only=True)["tokenizer"]
    again = data.Tokenizer.from_state_dict(state)
    assert again.vocab == tok.vocab and again.max_len == tok.max_len
    assert torch.equal(again.encode(["a red square"])[0], tok.encode(["a red square"])[0])
    with pytest.raises(ValueError, match="must start with"):
        data.Tokenizer(["a", "b", "c"], 5)


def _jpeg(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = torch.randint(0, 256, (3, 24, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    write_file(str(path), encode_jpeg(image))


def _official(root, n, split="val2017", captions_per_image=2, images=True):
    """root/annotations/captions_<split>.json and root/<split>/*.jpg, ids 100.."""
    entries = [{"id": 100 + i, "file_name": f"{100 + i:012d}.jpg", "height": 24, "width": 32,
                "coco_url": f"http://images.cocodataset.org/{split}/{100 + i:012d}.jpg"} for i in range(n)]
    captions = [{"id": 1000 * i + j, "image_id": 100 + i, "caption": f"A photo {i}, take {j}."}
                for i in range(n) for j in range(captions_per_image)]
    ann = root / "annotations" / f"captions_{split}.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps({"images": entries, "annotations": captions}))
    for i, e in enumerate(entries if images else []):
        _jpeg(root / split / e["file_name"], i)
    return ann


def _karpathy(root, n):
    """BLIP-style files over the images of _official: train one entry per caption, test one per image."""
    image = "val2017/{:012d}.jpg".format
    train = [{"image": image(100 + i), "caption": f"Train photo {i}, take {j}.", "image_id": f"coco_{100 + i}"}
             for i in range(n // 2) for j in range(2)]
    test = [{"image": image(100 + i), "caption": [f"Test photo {i}.", f"Another {i}."]} for i in range(n // 2, n)]
    (root / "karpathy").mkdir(exist_ok=True)
    (root / "karpathy" / "k_train.json").write_text(json.dumps(train))
    (root / "karpathy" / "k_test.json").write_text(json.dumps(test))


def test_load_coco_both_formats(tmp_path):
    _official(tmp_path, 6)
    _karpathy(tmp_path, 6)
    official = data.load_coco(tmp_path, "annotations/captions_val2017.json")
    assert [r.image_id for r in official] == list(range(100, 106))
    assert official[0].captions == ["A photo 0, take 0.", "A photo 0, take 1."]
    assert official[0].image == tmp_path / "val2017" / "000000000100.jpg"
    train = data.load_coco(tmp_path, tmp_path / "karpathy" / "k_train.json")
    test = data.load_coco(tmp_path, "karpathy/k_test.json")
    assert [r.image_id for r in train + test] == [r.image_id for r in official]  # "coco_100" and file names -> 100
    assert [len(r.captions) for r in train + test] == [2] * 6
    assert [r.image for r in train + test] == [r.image for r in official]


def test_coco_splits(tmp_path):
    _official(tmp_path, 20)
    splits = data.coco_splits(tmp_path, [], image_size=16, val_fraction=0.2, test_fraction=0.2, seed=1)
    assert [s.num_images for s in splits.values()] == [12, 4, 4]
    ids = [set(s.image_ids) for s in splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2]) and len(set.union(*ids)) == 20
    train = splits["train"]
    assert train.pixels.shape == (12, 3, 18, 18) and train.object_patches(0) is None and train.content_words(0) is None
    assert train.image(0).shape == train.image(0, train=True).shape == (3, 16, 16)
    assert len(train.captions) == 24 and train.img2txt[0] == [0, 1]
    again = data.coco_splits(tmp_path, [], image_size=16, val_fraction=0.2, test_fraction=0.2, seed=1)
    assert again["test"].image_ids == splits["test"].image_ids
    subset = data.coco_splits(tmp_path, [], 16, num_images=10, val_fraction=0.2, test_fraction=0.2)
    assert set().union(*(s.image_ids for s in subset.values())) == set(range(100, 110))  # the first N
    sampled = data.coco_splits(tmp_path, [], 16, num_images=10, sample_seed=3, val_fraction=0.2, test_fraction=0.2)
    assert len(set().union(*(s.image_ids for s in sampled.values()))) == 10
    with pytest.raises(ValueError, match="num_images=30"):
        data.coco_splits(tmp_path, [], 16, num_images=30)
    _karpathy(tmp_path, 20)
    with pytest.raises(ValueError, match="appears twice"):
        data.coco_splits(tmp_path, ["annotations/captions_val2017.json", "karpathy/k_test.json"], 16)


@pytest.mark.skipif(not COCO_MINI.is_dir(), reason="../shared/coco-mini is not there")
def test_coco_mini_both_formats():
    official = {s: data.load_coco(COCO_MINI, f"annotations/captions_{s}.json") for s in ("train2017", "val2017")}
    karpathy = {s: data.load_coco(COCO_MINI, f"karpathy/coco_mini_karpathy_{s}.json") for s in ("train", "test")}
    expected = ((official["train2017"], 80), (official["val2017"], 159),
                (karpathy["train"], 80), (karpathy["test"], 159))
    for records, n in expected:
        assert len(records) == n and all(len(r.captions) == 5 and r.image.is_file() for r in records)
    assert {r.image_id for r in karpathy["train"]} == {r.image_id for r in official["train2017"]}
    assert {r.image_id for r in karpathy["test"]} == {r.image_id for r in official["val2017"]}
    splits = data.coco_splits(COCO_MINI, [], 32, num_images=40, sample_seed=0)
    assert sum(s.num_images for s in splits.values()) == 40
    assert splits["train"].image(0, train=True).shape == (3, 32, 32)


class _Server:
    """A loopback HTTP server over a folder, remembering which paths were asked for."""

    def __init__(self, folder):
        requests = self.requests = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self):
                requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def coco_server(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "*")
    served = tmp_path / "server"
    ann = _official(served, 4)
    with zipfile.ZipFile(served / data.ANNOTATIONS_ZIP, "w") as z:
        z.write(ann, "annotations/captions_val2017.json")
    ann.unlink()
    server = _Server(served)
    yield server, served
    server.close()


def test_download_coco_resumes(tmp_path, coco_server):
    server, served = coco_server
    root = tmp_path / "coco"
    assert data.download_coco(root, "val2017", 3, base_url=server.url) == {"downloaded": 3, "present": 0}
    assert sorted(p.name for p in (root / "val2017").iterdir()) == [f"{100 + i:012d}.jpg" for i in range(3)]
    assert len(data.load_coco(root, "annotations/captions_val2017.json")) == 4  # the json lists the whole split
    server.requests.clear()
    data.main(["download-coco", "--root", str(root), "--split", "val2017", "--num-images", "3",
               "--base-url", server.url])
    assert server.requests == []  # everything was there: nothing fetched
    (root / "val2017" / "000000000100.jpg").unlink()
    (root / "val2017" / "000000000101.jpg").write_bytes(b"truncated")
    assert data.download_coco(root, "val2017", None, base_url=server.url) == {"downloaded": 3, "present": 1}
    assert not list(root.rglob("*.part"))
    (served / "val2017" / "000000000100.jpg").unlink()
    (root / "val2017" / "000000000100.jpg").unlink()
    with pytest.raises(RuntimeError, match="1 of 4 images failed.*run the same command again"):
        data.download_coco(root, "val2017", None, base_url=server.url)


def test_download_coco_never_writes_outside_root(tmp_path, coco_server):
    server, served = coco_server
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    with zipfile.ZipFile(served / data.ANNOTATIONS_ZIP) as z:
        content = json.loads(z.read("annotations/captions_val2017.json"))
    content["images"][1]["file_name"] = "../../escaped.jpg"
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match="escapes the image root"):
        data.download_coco(root, "val2017", None, base_url=server.url)
    assert not (tmp_path / "escaped.jpg").exists() and server.requests == []
    with pytest.raises(ValueError, match="plain name"):
        data.download_coco(root, "../val2017", None, base_url=server.url)


def test_coco_decodes_every_image_kind_to_8bit_rgb_and_logs_what_it_skips(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    ann = _official(tmp_path, 80)
    folder = tmp_path / "val2017"
    kinds = {"I;16": (100, 65535), "P": (101, 3), "L": (102, 200), "RGBA": (103, (10, 20, 30, 40)),
             "CMYK": (104, (0, 255, 0, 0)), "LA": (105, (90, 255))}
    for mode, (i, colour) in kinds.items():
        path = folder / f"{i:012d}.jpg"
        Image.new(mode, (24, 16), colour).save(path, format="JPEG" if mode in ("L", "CMYK") else "PNG")
    (folder / "000000000110.jpg").unlink()
    flags = ["--data", "coco", "--coco-root", str(tmp_path), "--coco-ann", str(ann), "--out", str(tmp_path / "o")]
    cfg, vcfg, _ = train.configs(train.parser().parse_args(FAST + flags))
    run = train.Run(cfg)
    try:
        splits = train.load_splits(cfg, vcfg, run)
    finally:
        run.close()
    pixels = torch.cat([s.pixels for s in splits.values()])
    assert pixels.dtype == torch.uint8 and pixels.shape[1] == 3 and len(pixels) == 79
    assert "warning: skipped 1 of 80 images" in (tmp_path / "o" / "train.log").read_text()




# --- the pipeline: the main job, resume, devices, processes (train.py) -------------------------

FAST = ["--preset", "tiny", "--device", "cpu"]
SMALL = ["--num-train", "100", "--num-val", "20", "--num-test", "20"]   # where accuracy is not what is tested
# the shared tiny run, and every run reusing its dense.pt: fewer steps than the tiny preset's
TINY_RUN = FAST + ["--num-val", "50", "--num-test", "50", "--dense-steps", "200", "--prune-steps", "50"]


def load_json(path):
    return json.loads(Path(path).read_text())


def tiny_main_job(tmp_path_factory, done={}):
    """One whole tiny main job (dense, MADTP at 50% with each count rule, evaluation), once a
    session, shared by these tests and experiments/test_experiments.py."""
    if "out" not in done:
        done["out"] = tmp_path_factory.mktemp("tiny")
        train.main(TINY_RUN + ["--out", str(done["out"])])
    return done["out"]


@pytest.fixture
def tiny_run(tmp_path_factory):
    return tiny_main_job(tmp_path_factory)


def test_tiny_main_job_end_to_end(tiny_run):
    m = load_json(tiny_run / "metrics.json")
    assert list(m) == ["dense", "madtp 50% sample", "madtp 50% batch-max"]
    dense, pruned = m["dense"], m["madtp 50% sample"]
    assert dense["r_mean"] > 20, dense["r_mean"]   # chance on 50 test images with 2 captions each is about 10
    assert abs(pruned["gflops_reduction"] - 0.5) <= 0.03, pruned["gflops_reduction"]
    for row in m.values():
        for key in ("r_mean", "i2t_r1", "t2i_r10", "gflops", "gflops_reduction", "ideal_speedup"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), key
        assert set(row["kept_tokens"]) == set(ENCODERS)
    assert pruned["kept_tokens"]["vision"][-1][0] < dense["kept_tokens"]["vision"][-1][0]
    assert pruned["kept_tokens"]["vision"][0][1] > 0, "per-sample counts should differ between samples"
    log = (tiny_run / "train.log").read_text()
    assert "stage 1" in log and "r_mean" in log and "config: " in log
    for name in ("dense.pt", "madtp-sample-0.50.pt", "madtp-batch-max-0.50.pt"):
        ckpt = torch.load(tiny_run / name, weights_only=True)
        assert {"config", "tokenizer", "model", "identity"} <= set(ckpt) and ckpt["step"] > 0
    ckpt = torch.load(tiny_run / "madtp-sample-0.50.pt", weights_only=True)
    assert ckpt["calibrated"] and ckpt["config"]["madtp"]["counts"] == "sample"
    assert {"T", "beta"} == set(ckpt["madtp"]) and ckpt["madtp"]["beta"] > 0


def test_flags_are_the_configs_fields_and_few(capsys):
    """One definition per knob: every config field is a flag (but the fixed ones), its comment the
    help, and --help prints them all."""
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    printed = set(re.findall(r"^  (--[\w-]+)", capsys.readouterr().out, re.M)) - {"--help"}
    p = train.parser()
    flags = {a.dest for a in p._actions} - {"help"}
    assert e.value.code == 0 and printed == {a.option_strings[0] for a in p._actions} - {"-h"}
    for cls in (train.TrainConfig, VLTConfig, MADTPConfig):
        for f in fields(cls):
            assert (f.name in flags) == (f.name not in train.NOT_FLAGS), f.name
    assert len(flags) <= 35, sorted(flags)
    assert train.field_help(MADTPConfig)["counts"].endswith("its own (paper)")   # a continued comment
    cfg, vcfg, mcfg = train.configs(p.parse_args(["--preset", "tiny", "--tau", "0.5", "--counts", "sample"]))
    assert (mcfg.tau, mcfg.counts, vcfg.dim, cfg.num_train, cfg.out) == (0.5, "sample", 64, 400, "runs/tiny")


@contextlib.contextmanager
def stage_inputs(out, *flags):
    """What the main job hands its stages for the tiny run's flags: (cfg, vcfg, mcfg, run, splits,
    tokenizer), in a Run on out, so that a test can call one stage directly."""
    cfg, vcfg, mcfg = train.configs(train.parser().parse_args(TINY_RUN + ["--out", str(out), *flags]))
    with train.Run(cfg) as run:
        splits = train.load_splits(cfg, vcfg, run)
        tokenizer = data.Tokenizer.build(splits["train"].captions, vcfg.max_text_len)
        yield cfg, replace(vcfg, vocab_size=len(tokenizer)), mcfg, run, splits, tokenizer


def test_a_finished_dense_model_is_reused(tiny_run, tmp_path, capsys):
    shutil.copy(tiny_run / "dense.pt", tmp_path / "dense.pt")
    with stage_inputs(tmp_path) as (cfg, vcfg, _, run, splits, tokenizer):
        dense = train.stage_dense(cfg, run, vcfg, splits, tokenizer)
    assert "skipping dense training" in capsys.readouterr().out
    saved = torch.load(tiny_run / "dense.pt", weights_only=True)["model"]
    assert all(torch.equal(w, saved[k]) for k, w in dense.state_dict().items())


def test_evaluation_does_not_depend_on_the_batch(tiny_run, tmp_path):
    """Per-sample counts: recalls, GFLOPs and counts are the same at any evaluation batch size."""
    ckpt = torch.load(tiny_run / "madtp-sample-0.50.pt", weights_only=True)
    results = []
    for bs in ("3", "64"):   # 3: every batch padded differently from 64's
        with stage_inputs(tmp_path / bs, "--eval-batch-size", bs) as (cfg, vcfg, _, run, splits, tokenizer):
            model, madtp = VLT(vcfg), MADTP(MADTPConfig(**ckpt["config"]["madtp"]), vcfg)
            model.load_state_dict(ckpt["model"])
            madtp.load_state_dict(ckpt["madtp"])
            results.append(train.evaluate(cfg, run, model, madtp, splits["test"], tokenizer))
    one, many = results
    for key in ("r_mean", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert one[key] == many[key], key
    assert one["gflops"] == pytest.approx(many["gflops"], rel=1e-9)
    for e in ENCODERS:
        assert sum(one["kept_tokens"][e], []) == pytest.approx(sum(many["kept_tokens"][e], [])), e


@pytest.fixture
def one_thread():
    """Multithreaded CPU reductions are not bitwise reproducible, so comparisons of whole training
    runs use one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_signals_save_and_resume_gives_the_same_weights_bit_for_bit(tmp_path, monkeypatch, one_thread, capsys):
    """SIGINT in stage 1 and SIGTERM in stage 2 each stop the run after the step in progress, save,
    say so and exit 130 / 143; --resume then ends with the very weights of a run never stopped."""
    args = FAST + SMALL + ["--dense-steps", "14", "--prune-steps", "10", "--counts", "sample"]
    monkeypatch.setitem(train.PRESETS["tiny"], "save_every", 5)
    train.main(args + ["--out", str(tmp_path / "straight")])
    real_lr = train.lr_at
    for signum, steps, at in ((signal.SIGINT, 14, 8), (signal.SIGTERM, 10, 6)):
        def kill_at(step, n, *a):
            if n == steps and step == at:
                os.kill(os.getpid(), signum)   # arrives in the middle of the step
            return real_lr(step, n, *a)
        monkeypatch.setattr(train, "lr_at", kill_at)
        with pytest.raises(SystemExit) as e:
            train.main(args + ["--out", str(tmp_path / "stopped")] + ["--resume"] * (signum == signal.SIGTERM))
        assert e.value.code == 128 + signum
        assert f"{signum.name} at step {at + 1}" in capsys.readouterr().err
    monkeypatch.setattr(train, "lr_at", real_lr)
    with pytest.raises(SystemExit):   # an unfinished run is not silently restarted or continued
        train.main(args + ["--out", str(tmp_path / "stopped")])
    train.main(args + ["--out", str(tmp_path / "stopped"), "--resume"])
    for name in ("dense.pt", "madtp-sample-0.50.pt"):
        a, b = (torch.load(tmp_path / run / name, weights_only=True) for run in ("straight", "stopped"))
        for part in ("model", "madtp") if "madtp" in a else ("model",):
            for k in a[part]:
                assert torch.equal(a[part][k], b[part][k]), (name, k)


def test_resuming_across_devices_restores_what_it_can(monkeypatch):
    """A checkpoint written on the CPU resumes on CUDA with a fresh CUDA random state, said in the
    log, instead of a KeyError; one written on CUDA resumes on the CPU without its CUDA state."""
    calls, logged = [], []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(device))
    ckpt = dict(rng=torch.get_rng_state())
    for device, extra in (("cuda", {}), ("cuda", dict(cuda_rng=torch.zeros(8, dtype=torch.uint8))),
                          ("cpu", dict(cuda_rng=torch.zeros(8, dtype=torch.uint8)))):
        run = type("Run", (), dict(device=torch.device(device), log=lambda self, msg: logged.append(msg)))()
        train.restore_rng(run, dict(ckpt, **extra))
    assert len(calls) == 1 and len(logged) == 1 and "without CUDA" in logged[0]


def test_a_local_rank_beyond_the_gpus_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit) as e:
        train.pick_device("cuda", local_rank=1)
    assert e.value.code == 2 and "--nproc_per_node=1" in capsys.readouterr().err


def _finite_in(rank, world, port, results):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    run = type("Run", (), dict(distributed=True))()
    loss = torch.tensor(float("nan") if rank == 1 else 1.0)
    results[rank] = train.finite_everywhere(run, loss, torch.tensor(1.0))[0]
    dist.destroy_process_group()


def test_a_non_finite_step_on_one_process_stops_every_process():
    """DDP: the loss of one rank becomes NaN; every rank learns it in the same step (and stops), so
    that none waits in the next collective until the watchdog."""
    ctx = multiprocessing.get_context("spawn")   # a fork of this process, which has run OpenMP, can hang
    with ctx.Manager() as manager:
        results, port = manager.dict(), 29400 + os.getpid() % 1000
        procs = [ctx.Process(target=_finite_in, args=(r, 2, port, results)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert dict(results) == {0: False, 1: False}


def test_two_process_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *FAST, "--out", str(tmp_path), "--dense-steps", "8", "--prune-steps", "4", "--counts", "sample", *SMALL]
    p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "madtp 50% sample" in load_json(tmp_path / "metrics.json")
    assert (tmp_path / "train.log").read_text().count("stage 1: training") == 1, "only rank 0 writes"


@pytest.mark.skipif(not COCO_MINI.exists(), reason="../shared/coco-mini is not here")
def test_coco_mini_end_to_end(tmp_path):
    """Karpathy-format files through the whole main job (both formats load alike: test_coco_mini_both_formats)."""
    ann = "karpathy/coco_mini_karpathy_train.json,karpathy/coco_mini_karpathy_test.json"
    train.main(["--data", "coco", "--coco-root", str(COCO_MINI), "--coco-ann", ann, *FAST, "--out", str(tmp_path),
                "--dense-steps", "6", "--prune-steps", "6", "--batch-size", "16"])
    m = load_json(tmp_path / "metrics.json")
    assert set(m) == {"dense", "madtp 50% sample", "madtp 50% batch-max"}
    assert all(math.isfinite(r["r_mean"]) for r in m.values())


# --- bad input: one clear line that names the problem and the fix, before any work is lost ----

@pytest.mark.parametrize("bad, message", [
    (lambda i, t, v: (i[:, :, :16], t, v), "images must have shape"),
    (lambda i, t, v: (i[:, :1], t, v), "images must have shape"),
    (lambda i, t, v: (i[:1], t, v), "2 captions"),
])
def test_bad_input_is_a_clear_error(bad, message):
    model, madtp = tiny_model()
    imgs, (ids, valid) = images(2), captions([4, 6])
    with pytest.raises(ValueError, match=message):
        model(*bad(imgs, ids, valid), madtp.hooks(Trace()))


@pytest.mark.parametrize("bad, message", [
    (lambda i, t, v: (i[:, :1], t, v), "images must have shape"),
    (lambda i, t, v: (i, t + TINY.vocab_size, v), "token ids must lie in"),
    (lambda i, t, v: (i, t - 5, v), "token ids must lie in"),
    (lambda i, t, v: (i, t, v.index_fill(1, torch.tensor([0]), False)), "valid \\[CLS\\]"),
])
def test_bad_values_are_a_clear_error_where_data_enters(bad, message):
    """Values are checked once per batch on the CPU tensors (check_inputs), not inside the forward."""
    model, _ = tiny_model(device="cpu")
    imgs, (ids, valid) = images(2, device="cpu"), captions([4, 6], device="cpu")
    model.check_inputs(imgs, ids, valid)
    with pytest.raises(ValueError, match=message):
        model.check_inputs(*bad(imgs, ids, valid))


def test_unknown_count_rule_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown count rule 'official'"):
        MADTPConfig(counts="official")


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        data.synthetic_splits(4, 2, 2, image_size=60, patch_size=8)
    with pytest.raises(ValueError, match=">= 1 image"):
        data.synthetic_splits(4, 0, 2)


def test_coco_missing_files_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="download-coco"):
        data.load_coco(tmp_path / "nowhere", "annotations/captions_val2017.json")
    with pytest.raises(FileNotFoundError, match="captions_val2017.json.*download-coco"):
        data.load_coco(tmp_path, "annotations/captions_val2017.json")
    with pytest.raises(FileNotFoundError, match="looked for.*captions_\\*.json.*download-coco"):
        data.coco_splits(tmp_path, [], 16)
    _official(tmp_path, 3, images=False)
    with pytest.raises(FileNotFoundError, match="image folder .*val2017"):
        data.load_coco(tmp_path, "annotations/captions_val2017.json")


def test_coco_rejects_bad_json(tmp_path):
    (tmp_path / "neither.json").write_text(json.dumps({"foo": [1]}))
    with pytest.raises(ValueError, match="neither COCO captions format"):
        data.load_coco(tmp_path, "neither.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        data.load_coco(tmp_path, "broken.json")
    ann = _official(tmp_path, 3)
    content = json.loads(ann.read_text())
    content["annotations"][0]["caption"] = " ... !"
    ann.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="image 100 has caption ' ... !'"):
        data.load_coco(tmp_path, ann)


@pytest.mark.parametrize("name", ["../outside.jpg", "/etc/passwd", "val2017/../../x.jpg"])
def test_coco_refuses_file_names_escaping_the_root(tmp_path, name):
    ann = _official(tmp_path, 2)
    content = json.loads(ann.read_text())
    content["images"][0]["file_name"] = name
    ann.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="escapes the image root"):
        data.load_coco(tmp_path, ann)
    (tmp_path / "k.json").write_text(json.dumps([{"image": name, "caption": "a cat", "image_id": 1}]))
    with pytest.raises(ValueError, match="escapes the image root"):
        data.load_coco(tmp_path, "k.json")


def test_coco_skips_and_counts_bad_images(tmp_path, capsys):
    ann = _official(tmp_path, 25)
    content = json.loads(ann.read_text())
    content["annotations"] = [a for a in content["annotations"] if a["image_id"] != 124]  # an image with no captions
    ann.write_text(json.dumps(content))
    (tmp_path / "val2017" / "000000000100.jpg").unlink()
    splits = data.coco_splits(tmp_path, [ann], 16)
    assert sum(s.num_images for s in splits.values()) == 23
    err = capsys.readouterr().err
    assert "skipped 1 of 25 images that have no captions" in err
    assert "skipped 1 of 24 images, missing or unreadable" in err and "000000000100.jpg (missing)" in err
    (tmp_path / "val2017" / "000000000101.jpg").write_bytes(b"not a jpeg")  # now 2 of 24: over 5%
    with pytest.raises(ValueError, match="2 of 24 images are missing or unreadable.*--coco-num-images"):
        data.coco_splits(tmp_path, [ann], 16)


def test_a_checkpoint_from_another_config_is_refused(tiny_run, tmp_path, capsys):
    shutil.copy(tiny_run / "dense.pt", tmp_path / "dense.pt")
    with stage_inputs(tmp_path, "--seed", "1") as (cfg, vcfg, _, run, splits, tokenizer):
        with pytest.raises(SystemExit) as e:
            train.stage_dense(cfg, run, vcfg, splits, tokenizer)
    assert e.value.code == 2
    assert "seed: 0 in the checkpoint, 1 now" in capsys.readouterr().err


def test_divergence_stops_with_step_and_stage_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch,
                                                                                one_thread):
    """One thread: with two, the step it diverges at moves from run to run, and before step 2 there
    would be no checkpoint to keep."""
    monkeypatch.setitem(train.PRESETS["tiny"], "save_every", 2)
    with pytest.raises(SystemExit) as e:
        train.main(FAST + ["--out", str(tmp_path), "--lr", "1e1", "--dense-steps", "60"])
    err = capsys.readouterr().err
    assert e.value.code == 3 and "Traceback" not in err
    step = int(re.search(r"at step (\d+) of stage dense", err)[1])
    assert step >= 2 and train.load_checkpoint(tmp_path / "dense.pt")["step"] == step - step % 2   # loads: all finite


def test_a_checkpoint_with_nonfinite_weights_or_another_version_is_refused_by_name(tiny_run, tmp_path, capsys):
    ckpt = torch.load(tiny_run / "dense.pt", weights_only=True)
    ckpt["model"]["text_pos"][0, 3, 5] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    torch.save(dict(ckpt, version=3), tmp_path / "old.pt")
    (tmp_path / "torn.pt").write_bytes((tiny_run / "dense.pt").read_bytes()[:1000])
    for name, message in (("nan.pt", "model tensor text_pos holds non-finite values"),
                          ("old.pt", "version 3"), ("torn.pt", "is not a readable checkpoint")):
        with pytest.raises(SystemExit) as e:
            train.load_checkpoint(tmp_path / name)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err


BAD_FLAGS = [  # (flags, what the one line must say); each was a traceback, a hang or silence once
    (["--batch-size", "-4"], "--batch-size must be at least 2"),
    (["--eval-batch-size", "0"], "--eval-batch-size"),
    (["--num-align-tokens", "0"], "--num-align-tokens must be at least 1"),
    (["--tau", "0"], "--tau must be > 0"),
    (["--tau", "-1"], "--tau must be > 0"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--num-train", "0"], "--num-train"),
    (["--num-test", "1"], "--num-test must be at least 10: Recall@10 needs as many test images"),
    (["--prune-ratio", "1"], "--prune-ratio is a GFLOPs reduction in [0, 1)"),
    (["--max-text-len", "20"], "--max-text-len must be at least"),
    (["--counts", "official"], "invalid choice: 'official'"),
    (["--seeds", "0,1"], "--seeds belongs to python -m experiments.compare"),
    (["--method", "cls-static"], "--method belongs to python -m experiments.compare"),
    (["--eval-only", "x.pt"], "--eval-only belongs to python -m experiments.evaluate"),
    (["--batch-size", "many"], "invalid int value: 'many'"),
    (["--beta", "0.3"], "--beta belongs to python -m experiments.evaluate"),
    (["--data", "coco", "--coco-root", "x", "--num-train", "9"], "--num-train does nothing in this run"),
    (["--data", "coco"], "--data coco needs --coco-root DIR"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_line_before_any_work(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(FAST + ["--out", str(tmp_path / "out")] + flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert not (tmp_path / "out").exists(), "work began before the flags were checked"


def test_one_run_per_out_and_failed_writes_are_one_line(tmp_path, monkeypatch, capsys):
    held = train.lock(tmp_path)
    with pytest.raises(SystemExit) as e:
        train.main(FAST + ["--out", str(tmp_path)])
    assert e.value.code == 2 and f"another run (pid {os.getpid()}) is using --out {tmp_path}" in capsys.readouterr().err
    held.close()

    def full_disk(obj, path):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as e:
        train.save_checkpoint(tmp_path / "x.pt", {})
    assert e.value.code == 2 and "could not write" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / ".lock"], "a temporary file was left behind"


def test_a_test_split_too_small_for_recall_at_10_is_said_before_training(tmp_path, capsys):
    _official(tmp_path, 30)
    with pytest.raises(SystemExit) as e:
        train.main(FAST + ["--data", "coco", "--coco-root", str(tmp_path), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "Recall@10 needs at least 10 of each" in capsys.readouterr().err
    assert not (tmp_path / "o" / "dense.pt").exists()


def test_cuda_requested_without_cuda_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        train.main(["--device", "cuda", "--preset", "tiny", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "CUDA is not available" in err and len(err.strip().splitlines()) == 1
