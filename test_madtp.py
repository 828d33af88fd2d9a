"""Tests for the MADTP reference: tiny configs on the CPU; each checks a property that the method,
the data or the pipeline promises (../shared/SPEC.md). Run with `pytest`; the whole file takes a
few minutes on a 2-core CPU. Tests that need ../shared/coco-mini skip when it is absent."""

import functools
import http.server
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision.io import decode_image, encode_jpeg, read_file, write_file

import data
import train
from madtp import (ENCODERS, METHODS, MADTP, MADTPConfig, Trace, dense_hooks, gflops, dense_gflops,
                   keep_mask, keep_statistic, package_weights, prune_tokens, threshold, normalise, alignment_loss,
                   share_threshold)
from vlt import VLT, VLTConfig, pack, seq_of, task_loss, unpack

# torchvision 0.29 deprecates its image codecs in favour of torchcodec, which this project does not depend on
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
HERE = Path(__file__).parent
COCO_MINI = HERE.parent / "shared" / "coco-mini"


# --- core: MAG, DTP and the VLT (issue 2) ------------------------------------------------------

TINY = VLTConfig(image_size=32, patch_size=8, vocab_size=40, max_text_len=16, dim=32, heads=2,
                 vision_layers=2, text_layers=2, fusion_layers=2, embed_dim=16)


def tiny_model(method="madtp", beta=1.0, seed=0, **kw):
    """A tiny VLT and a MADTP at β, with its bars fitted and frozen (eval mode)."""
    torch.manual_seed(seed)
    model = VLT(TINY).eval()
    madtp = train.new_madtp(MADTPConfig(method=method, num_align_tokens=8, **kw), TINY)
    set_beta(model, madtp, beta)
    return model, madtp


def set_beta(model, madtp, beta):
    """β, and for a fitted budget the bars β_ℓ it asks for, fitted on a fixed batch, then frozen
    (as calibration does on the validation split)."""
    madtp.beta.fill_(beta)
    madtp.train()
    run(model, madtp, images(6, seed=99), *captions([2, 4, 6, 8, 10, 12], seed=99))
    madtp.eval()


def captions(lengths, pad_to=None, seed=0):
    """Random word ids for captions of the given lengths (words, CLS excluded), padded with 0."""
    g = torch.Generator().manual_seed(seed)
    N = 1 + (pad_to or max(lengths))
    ids = torch.zeros(len(lengths), N, dtype=torch.long)
    valid = torch.zeros(len(lengths), N, dtype=torch.bool)
    for b, n in enumerate(lengths):
        ids[b, 0] = 1
        ids[b, 1:1 + n] = torch.randint(3, TINY.vocab_size, (n,), generator=g)
        valid[b, : 1 + n] = True
    return ids, valid


def images(B, seed=0):
    return torch.randn(B, 3, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(seed))


def run(model, madtp, imgs, ids, valid, positions=False):
    """One traced forward over matching pairs -> (outputs, trace, per-sample GFLOPs per encoder)."""
    trace = Trace(positions=positions)
    hooks = madtp.hooks(trace) if madtp is not None else dense_hooks(trace)
    with torch.no_grad():
        out = model(imgs, ids, valid, hooks)
    g = gflops(model.cfg, trace, image_tokens=trace.layers["vision"][-1]["n_out"])
    return out, trace, g


def kept_total(trace):
    return sum(int(r["n_out"].sum()) for e in ENCODERS for r in trace.layers[e])


def test_beta_zero_prunes_nothing_and_matches_dense():
    model, madtp = tiny_model(beta=0.0)
    imgs, (ids, valid) = images(3), captions([5, 9, 2])
    dense, _, _ = run(model, None, imgs, ids, valid)
    pruned, trace, _ = run(model, madtp, imgs, ids, valid)
    for r in trace.layers["vision"] + trace.layers["text"]:
        assert torch.equal(r["n_in"], r["n_out"])
    for key in ("e_img", "e_txt", "itm"):
        torch.testing.assert_close(pruned[key], dense[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_batch_invariance(method):
    """A sample's embeddings, ITM logits and GFLOPs do not depend on its batch-mates."""
    model, madtp = tiny_model(method, beta=1.0)
    lengths = [3, 11, 7, 1]
    imgs, (ids, valid) = images(4), captions(lengths)
    together, trace, g = run(model, madtp, imgs, ids, valid)
    assert kept_total(trace) < sum(r["n_in"].sum() for e in ENCODERS for r in trace.layers[e]), "nothing pruned"
    for b, n in enumerate(lengths):
        alone, _, g1 = run(model, madtp, imgs[b:b + 1], ids[b:b + 1, : 1 + n], valid[b:b + 1, : 1 + n])
        for key in ("e_img", "e_txt", "itm"):
            torch.testing.assert_close(alone[key][0], together[key][b], rtol=1e-4, atol=1e-5)
        for e in ENCODERS:
            torch.testing.assert_close(g1[e][0], g[e][b])


def test_longer_padding_changes_nothing():
    model, madtp = tiny_model(beta=1.0)
    imgs = images(2)
    short, _, g_short = run(model, madtp, imgs, *captions([4, 6]))
    long, _, g_long = run(model, madtp, imgs, *captions([4, 6], pad_to=14))
    for key in ("e_img", "e_txt", "itm"):
        torch.testing.assert_close(long[key], short[key], rtol=1e-4, atol=1e-5)
    for e in ENCODERS:
        torch.testing.assert_close(g_long[e], g_short[e])


def test_padding_content_is_never_seen():
    """Whatever sits in the padding (here: real word ids) is never kept, fused or attended."""
    model, madtp = tiny_model(beta=1.0)
    imgs, (ids, valid) = images(2), captions([3, 10])
    noisy = ids.clone()
    noisy[~valid] = torch.randint(3, TINY.vocab_size, (int((~valid).sum()),))
    a, trace, _ = run(model, madtp, imgs, ids, valid, positions=True)
    b, _, _ = run(model, madtp, imgs, noisy, valid)
    for key in ("e_img", "e_txt", "itm"):
        torch.testing.assert_close(a[key], b[key])
    for e in ("text", "fusion"):
        for r in trace.layers[e]:
            assert r["kept"][0].max() <= 3, "a padding position of caption 0 was kept"


def test_cls_is_never_pruned():
    model, madtp = tiny_model(beta=2.0)
    _, trace, _ = run(model, madtp, images(3), *captions([4, 8, 2]), positions=True)
    for e in ENCODERS:
        for r in trace.layers[e]:
            assert (r["kept"][:, 0] == 0).all()
            assert (r["n_out"] >= 1).all()


def test_fusion_positions_map_back_to_words():
    """Evaluation runs the fusion encoder on text tokens stored after the text encoder; the words
    its layers keep must be the same as in one forward pass over the pair."""
    model, madtp = tiny_model(beta=1.0)
    imgs, (ids, valid) = images(3), captions([9, 12, 5])
    _, trace, _ = run(model, madtp, imgs, ids, valid, positions=True)
    text_trace = Trace(positions=True)
    with torch.no_grad():
        img, img_valid = model.encode_image(imgs, madtp.hooks(Trace())["vision"])
        txt, txt_valid = model.encode_text(ids, valid, madtp.hooks(text_trace)["text"])
        fusion_trace = Trace(positions=True, start=dict(fusion=text_trace.layers["text"][-1]["kept"]))
        model.fuse(txt, txt_valid, img, img_valid, madtp.hooks(fusion_trace)["fusion"])
    assert len(trace.layers["fusion"]) == TINY.fusion_layers
    for a, b in zip(trace.layers["fusion"], fusion_trace.layers["fusion"]):
        assert torch.equal(a["kept"], b["kept"])
        assert a["kept"].max() <= 12


def test_package_weights_sum_to_one_and_skip_padding():
    S = normalise(torch.rand(3, 6), torch.ones(3, 6, dtype=torch.bool))
    v = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    keep = torch.tensor([[1, 0, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool) & v
    w = package_weights(S, v & ~keep)
    torch.testing.assert_close(w.sum(1), torch.tensor([1.0, 0.0, 1.0]))
    assert (w[~v] == 0).all() and (w[keep] == 0).all()
    # and the package token is exactly that weighted mean of the fused tokens
    x = torch.randn(3, 7, 4)
    valid = torch.cat([torch.ones(3, 1, dtype=torch.bool), v], 1)
    seq = seq_of(valid)
    out, seq, _ = prune_tokens(pack(x, seq), seq, keep, S)
    out = unpack(out, seq)
    # each sample: CLS, its kept tokens in order, its package token (if it pruned any), then padding
    assert seq.valid.int().tolist() == [[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0]]
    torch.testing.assert_close(out[0, :3], x[0, [0, 1, 4]])
    torch.testing.assert_close(out[0, 3], (w[0, :, None] * x[0, 1:]).sum(0))
    torch.testing.assert_close(out[2, 1], (w[2, :, None] * x[2, 1:]).sum(0))
    torch.testing.assert_close(out[1], x[1])
    assert (out[~seq.valid] == 0).all()
    assert seq.flat.tolist() == [i for i, real in enumerate(seq.valid.flatten().tolist()) if real]


def test_threshold_lies_between_min_and_max_score():
    g = torch.Generator().manual_seed(0)
    for tau in (0.1, 1.0, 10.0):
        v = torch.rand(8, 20, generator=g) > 0.3
        v[:, 0] = True
        a = (torch.randn(8, 20, 5, generator=g) * 3).masked_fill(~v[:, :, None], float("-inf"))
        S = normalise(torch.rand(8, 20, generator=g), v)
        theta = threshold(a, S, tau)
        lo = S.masked_fill(~v, float("inf")).amin(1)
        hi = S.amax(1)
        assert (lo <= theta + 1e-7).all() and (theta <= hi + 1e-7).all()
        assert (keep_mask(S, theta, 0.0, v) == v).all()


BUDGET_RULES = [dict(budget="global"), dict(budget="encoder"), dict(budget="layer"), dict(budget="back"),
                dict(budget="layer", rule="margin"), dict(budget="layer", first_layer=1)]


@pytest.mark.parametrize("rule", BUDGET_RULES, ids=lambda r: "-".join(map(str, r.values())))
@pytest.mark.parametrize("method", METHODS)
def test_larger_beta_keeps_fewer_tokens(method, rule):
    """The one knob is monotone under every budget rule, for every method, on the data the bars are
    fitted to (what calibration bisects on; on other data a fitted budget is only nearly so)."""
    model, madtp = tiny_model(method, **rule)
    madtp.train()
    imgs, (ids, valid) = images(4), captions([3, 11, 7, 5])
    kept = []
    for beta in (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0):
        madtp.beta.fill_(beta)
        kept.append(kept_total(run(model, madtp, imgs, ids, valid)[1]))
    assert all(b <= a for a, b in zip(kept, kept[1:])), kept
    assert kept[-1] < kept[0]


@pytest.mark.parametrize("budget", ["layer", "encoder"])
def test_fitted_bars_keep_the_share_rho(budget):
    """Fitting (training mode): the first pruned layer of each encoder keeps ceil(ρ T) of the T
    prunable tokens of the batch, ρ = 1 / (1 + β), but each sample its own number of them; with
    the per-layer budget every layer does."""
    model, madtp = tiny_model(beta=0.0, budget=budget)
    madtp.beta.fill_(1.5)
    madtp.train()
    _, trace, _ = run(model, madtp, images(5), *captions([3, 11, 7, 5, 9]), positions=True)
    layers = {e: trace.layers[e] if budget == "layer" else trace.layers[e][:1] for e in ENCODERS}
    for e, records in layers.items():
        for r in records:
            prunable = int((r["n_in"] - 1).sum())
            kept = [int((pos[1:] >= 1).sum()) for pos in r["kept"]]
            assert sum(kept) == math.ceil(prunable / 2.5), (e, kept)
    vision_kept = [int((pos[1:] >= 1).sum()) for pos in trace.layers["vision"][0]["kept"]]
    assert len(set(vision_kept)) > 1, "every image kept the same count: the budget is not per sample"


def test_share_threshold_and_statistics():
    v = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    stat = torch.tensor([[5.0, 1.0, 3.0, 99.0], [4.0, 0.5, 2.0, 6.0]])
    assert share_threshold(stat, v, 1.0) == float("-inf")                 # ρ = 1 keeps everything
    bar = share_threshold(stat, v, 3 / 7)                                  # keep 3 of the 7 valid tokens
    assert ((stat > bar) & v).int().tolist() == [[1, 0, 0, 0], [1, 0, 0, 1]]
    S = normalise(torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]]), torch.ones(2, 4, dtype=torch.bool))
    theta = torch.tensor([0.25, 0.1])
    ones = torch.ones(2, 4, dtype=torch.bool)
    torch.testing.assert_close(keep_statistic(S, theta, ones, "ratio"), S / theta[:, None])
    # margin: a flat scene stands nowhere above its bar; a peaked one stands out by n (S - θ)
    torch.testing.assert_close(keep_statistic(S, theta, ones, "margin"), torch.tensor([[0.0] * 4, [2.4, 0, 0, 0]]))


def test_layers_before_first_layer_never_prune():
    model, madtp = tiny_model(beta=2.0, first_layer=1)
    _, trace, _ = run(model, madtp, images(3), *captions([4, 8, 6]))
    for e in ENCODERS:
        assert torch.equal(trace.layers[e][0]["n_in"], trace.layers[e][0]["n_out"]), e
    assert (trace.layers["vision"][1]["n_out"] < trace.layers["vision"][1]["n_in"]).all()


def test_object_recall_and_pearson_on_known_positions():
    """Four scenes of 4 patches with 1, 2, 3 and 4 object patches; the pruner kept the first k."""
    masks = [torch.tensor([j < k for j in range(4)]) for k in (1, 2, 3, 4)]
    split = type("Split", (), dict(object_patches=lambda self, i: masks[i]))()
    kept = (2, 2, 2, 2), (1, 2, 3, 4)   # layer 1 keeps 2 patches each, layer 2 as many as it has objects
    positions = [[torch.tensor([0] + list(range(1, 1 + kept[l][s])) + [-1]) for l in range(2)] for s in range(4)]
    r = train.object_recall(split, positions)
    assert r["per_layer"] == pytest.approx([(1 + 1 + 2 / 3 + 1 / 2) / 4, 1.0])
    assert r["cluttered"] == pytest.approx([0.5, 1.0])                    # the quarter: the 4-object scene
    assert r["pearson_r"] == pytest.approx([0.0, 1.0])


def test_unknown_or_inconsistent_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown budget rule"):
        MADTPConfig(budget="per-head")
    with pytest.raises(ValueError, match="margin rule needs a fitted bar"):
        MADTPConfig(budget="global", rule="margin")


def test_every_parameter_gets_a_finite_nonzero_gradient():
    torch.manual_seed(0)
    model, madtp = tiny_model(beta=1.0)
    model.train()
    imgs, (ids, valid) = images(6), captions([3, 8, 5, 2, 7, 4])
    trace = Trace(features=True)
    loss, _ = task_loss(model, imgs, ids, valid, torch.arange(6), madtp.hooks(trace))
    L_align = alignment_loss(trace.F["vision"], trace.F["text"])
    (loss + madtp.cfg.alpha * L_align).backward()
    assert kept_total(trace) < sum(r["n_in"].sum() for e in ENCODERS for r in trace.layers[e])
    for name, p in [*model.named_parameters(), *(("madtp." + n, p) for n, p in madtp.named_parameters())]:
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("off", ENCODERS)
def test_each_encoder_can_be_switched_off(off):
    """A switched-off encoder keeps every token but still feeds L_align, so training still works."""
    model, madtp = tiny_model(beta=1.0, **{f"prune_{off}": False})
    trace = Trace(features=True)
    loss, _ = task_loss(model.train(), images(4), *captions([3, 8, 5, 6]), torch.arange(4), madtp.hooks(trace))
    (loss + madtp.cfg.alpha * alignment_loss(trace.F["vision"], trace.F["text"])).backward()
    assert madtp.T.grad is not None and madtp.T.grad.abs().sum() > 0
    for e in ENCODERS:
        pruned = any((r["n_out"] < r["n_in"]).any() for r in trace.layers[e])
        assert pruned == (e != off), e


@pytest.mark.parametrize("beta", [None, 0.0, 1.0, 1.6])
def test_analytic_gflops_match_flop_counter(beta):
    model, madtp = tiny_model(beta=beta or 0.0)
    imgs, (ids, valid) = images(1), captions([9])
    with FlopCounterMode(display=False) as counter:
        _, trace, g = run(model, madtp if beta is not None else None, imgs, ids, valid)
    analytic = sum(v.item() for v in g.values())
    assert analytic == pytest.approx(counter.get_total_flops() / 2 / 1e9, rel=0.01)
    if beta is None:
        assert analytic == pytest.approx(sum(v.item() for v in dense_gflops(TINY, valid.sum(1)).values()))


def test_bf16_autocast_runs_and_prunes():
    model, madtp = tiny_model(beta=1.0)
    imgs, (ids, valid) = images(3), captions([4, 8, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, trace, _ = run(model, madtp, imgs, ids, valid)
    assert all(torch.isfinite(out[k].float()).all() for k in ("e_img", "e_txt", "itm"))
    assert kept_total(trace) < sum(r["n_in"].sum() for e in ENCODERS for r in trace.layers[e])


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
    model, _ = tiny_model()
    imgs, (ids, valid) = images(2), captions([4, 6])
    model.check_inputs(imgs, ids, valid)
    with pytest.raises(ValueError, match=message):
        model.check_inputs(*bad(imgs, ids, valid))


def test_host_sync_counter_sees_every_kind_of_read():
    t = torch.arange(5.0)
    with train.HostSyncs() as syncs:
        bool(t.any()), int(t[0]), t.sum().item(), t.tolist(), t.nonzero(), t[t > 2], t.argsort()
    assert syncs.calls == {"__bool__": 1, "__int__": 1, "item": 1, "tolist": 1, "nonzero": 1, "__getitem__": 1}


@pytest.mark.parametrize("method", METHODS)
def test_forward_waits_for_the_device_once_per_pruned_layer(method):
    """Issue 10: a GPU runs a forward ahead of the host. The dense forward reads one count per
    padded input sequence (the captions, and the fusion encoder's captions), never inside a layer;
    a pruned layer reads one more (the size of its shorter sequence), with frozen or fitting bars."""
    model, madtp = tiny_model(method)
    imgs, (ids, valid) = images(4), captions([3, 11, 7, 5])
    with torch.no_grad(), train.HostSyncs() as dense:
        model(imgs, ids, valid)
    assert dense.total == 2, dense.calls
    pruned_layers = sum(madtp.prunes(e, layer) for e, depth in madtp.depths.items() for layer in range(depth))
    for fitting in (False, True):
        madtp.train(fitting)
        with torch.no_grad(), train.HostSyncs() as pruned:
            model(imgs, ids, valid, madtp.hooks(Trace()))
        assert pruned.total == dense.total + pruned_layers, pruned.calls


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown pruning method"):
        MADTPConfig(method="evit")


# --- data: synthetic scenes, tokenizer, COCO (issue 3) -----------------------------------------

POSITION_WORDS = {w for _, place in data.POSITIONS for w in place.split()}


# ---------------------------------------------------------------------------------------------- synthetic


@functools.lru_cache
def _splits(seed=0, num_train=40):
    return data.synthetic_splits(num_train, 12, 12, captions_per_image=2, seed=seed)


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
    item = data.PairDataset(split)[7]
    assert item["image"].shape == (3, 64, 64) and item["image_index"] == 3 and item["image_id"] == split.image_ids[3]
    assert torch.equal(item["image"], split.image(3, train=True))  # synthetic images are never augmented
    batch = next(iter(torch.utils.data.DataLoader(data.ImageDataset(split), batch_size=8)))
    assert batch["image"].shape == (8, 3, 64, 64) and batch["index"].tolist() == list(range(8))


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


def test_synthetic_content_words_align_with_pre_caption():
    for split in _splits().values():
        for c, caption in enumerate(split.captions):
            words = data.pre_caption(caption, 1000)
            assert " ".join(words) == caption and len(words) <= data.SYNTHETIC_MAX_WORDS
            flags = split.content_words(c)
            assert len(flags) == len(words)
            assert all((_category(w) is not None) == f for w, f in zip(words, flags)), caption
            counts = [sum(_category(w) == k for w in words) for k in ("size", "colour", "shape")]
            assert counts[0] == counts[1] == counts[2] and 1 <= counts[0] <= data.MAX_OBJECTS


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


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        data.synthetic_splits(4, 2, 2, image_size=60, patch_size=8)
    with pytest.raises(ValueError, match=">= 1 image"):
        data.synthetic_splits(4, 0, 2)


# ---------------------------------------------------------------------------------------------- text


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


# ---------------------------------------------------------------------------------------------- COCO fixtures


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
    with pytest.raises(ValueError, match="2 of 24 images are missing or unreadable.*num_images"):
        data.coco_splits(tmp_path, [ann], 16)


@pytest.mark.skipif(not COCO_MINI.is_dir(), reason="../shared/coco-mini is not there")
def test_coco_mini_both_formats():
    official = {s: data.load_coco(COCO_MINI, f"annotations/captions_{s}.json") for s in ("train2017", "val2017")}
    karpathy = {s: data.load_coco(COCO_MINI, f"karpathy/coco_mini_karpathy_{s}.json") for s in ("train", "test")}
    expected = ((official["train2017"], 80), (official["val2017"], 159), (karpathy["train"], 80), (karpathy["test"], 159))
    for records, n in expected:
        assert len(records) == n and all(len(r.captions) == 5 and r.image.is_file() for r in records)
    assert {r.image_id for r in karpathy["train"]} == {r.image_id for r in official["train2017"]}
    assert {r.image_id for r in karpathy["test"]} == {r.image_id for r in official["val2017"]}
    splits = data.coco_splits(COCO_MINI, [], 32, num_images=40, sample_seed=0)
    assert sum(s.num_images for s in splits.values()) == 40
    assert splits["train"].image(0, train=True).shape == (3, 32, 32)


# ---------------------------------------------------------------------------------------------- downloader


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


# --- the main job: train.py (issues 4 and 5) ----------------------------------------------------

FAST = ["--preset", "tiny", "--device", "cpu"]


def load_json(path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One whole tiny pipeline (dense, MADTP at 50%, evaluation), shared by the tests below."""
    out = tmp_path_factory.mktemp("tiny")
    train.main(FAST + ["--out", str(out)])
    return out


def test_tiny_pipeline_end_to_end(tiny_run):
    m = load_json(tiny_run / "metrics.json")
    dense, pruned = m["dense"], m["madtp 50%"]
    # chance r_mean on 100 test images with 2 captions each is about 8
    assert dense["r_mean"] > 20, dense["r_mean"]
    assert abs(pruned["gflops_reduction"] - 0.5) <= 0.03, pruned["gflops_reduction"]
    for row in (dense, pruned):
        for key in ("r_mean", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "gflops",
                    "gflops_reduction", "pairs_per_s_batch1", "pairs_per_s_batch"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), key
        assert set(row["kept_tokens"]) == set(ENCODERS)
    assert pruned["object_share"]["per_layer"][-1] > pruned["object_share"]["all_patches"], \
        "MADTP should keep object patches more often than their share of the image"
    layers = len(pruned["kept_tokens"]["vision"])
    assert all(len(pruned["object_recall"][k]) == layers for k in ("per_layer", "cluttered", "pearson_r"))
    assert dense["object_recall"]["per_layer"] == [1.0] * layers and dense["content_recall"]["text"][-1] == 1.0
    assert pruned["object_recall"]["per_layer"][-1] < 1.0 and len(pruned["content_recall"]["fusion"]) >= 1
    png = decode_image(read_file(str(tiny_run / "tokens.png")))
    assert png.shape[0] == 3 and png.shape[1] > 100 and png.shape[2] > 100
    log = (tiny_run / "train.log").read_text()
    assert "stage 1" in log and "r_mean" in log
    for name, kind in (("dense.pt", "dense"), ("madtp-0.50.pt", "compressed")):
        ckpt = torch.load(tiny_run / name, weights_only=True)
        assert ckpt["kind"] == kind and ckpt["done"]
        assert {"vlt_config", "train_config", "tokenizer", "model"} <= set(ckpt)
    ckpt = torch.load(tiny_run / "madtp-0.50.pt", weights_only=True)
    assert ckpt["beta"] > 0 and ckpt["tau"] == 0.1 and "T" in ckpt["madtp"]


def test_a_finished_dense_model_is_reused(tiny_run, capsys):
    out = tiny_run.parent / "reuse"
    out.mkdir()
    shutil.copy(tiny_run / "dense.pt", out / "dense.pt")
    train.main(FAST + ["--out", str(out), "--method", "cls-static", "--prune-steps", "10"])
    assert "skipping dense training" in capsys.readouterr().out


def test_a_checkpoint_from_another_config_is_refused(tiny_run, tmp_path, capsys):
    shutil.copy(tiny_run / "dense.pt", tmp_path / "dense.pt")
    with pytest.raises(SystemExit) as e:
        train.main(FAST + ["--out", str(tmp_path), "--seed", "1"])
    assert e.value.code != 0
    assert "seed: 0 in the checkpoint, 1 now" in capsys.readouterr().err


def test_a_checkpoint_of_another_version_is_refused(tiny_run, tmp_path, capsys):
    ckpt = torch.load(tiny_run / "madtp-0.50.pt", weights_only=True)
    ckpt["version"] = 1
    torch.save(ckpt, tmp_path / "old.pt")
    with pytest.raises(SystemExit):
        train.main(["--eval-only", str(tmp_path / "old.pt"), "--device", "cpu", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "version 1" in err and "train it again" in err and "Traceback" not in err


def test_an_unreachable_target_is_said(tmp_path, capsys):
    """The tiny model's text and fusion encoders have one layer each: from layer 2 on, only the
    vision encoder's second layer prunes, and 90% is out of reach."""
    train.main(FAST + ["--out", str(tmp_path), "--dense-steps", "20", "--prune-steps", "5", "--first-layer", "1",
                       "--prune-ratio", "0.9"])
    assert "misses the target 0.90" in capsys.readouterr().out


def test_eval_only_does_not_depend_on_eval_batch_size(tiny_run, tmp_path):
    results = []
    for bs in ("1", "64"):
        train.main(["--eval-only", str(tiny_run / "madtp-0.50.pt"), "--eval-batch-size", bs,
                    "--device", "cpu", "--out", str(tmp_path / bs)])
        results.append(load_json(tmp_path / bs / "eval-madtp-0.50.json"))
    one, many = results
    for key in ("r_mean", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert one[key] == many[key], key
    assert one["gflops"] == pytest.approx(many["gflops"], rel=1e-9)
    for e in ENCODERS:
        assert sum(one["kept_tokens"][e], []) == pytest.approx(sum(many["kept_tokens"][e], [])), e


@pytest.fixture
def one_thread():
    """Multithreaded CPU reductions are not bitwise reproducible (two identical 2-thread runs of 30
    steps differ by ~1e-5), so comparisons of whole training runs use one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_resume_after_interruption_gives_the_same_model(tmp_path, monkeypatch, one_thread):
    args = FAST + ["--dense-steps", "30", "--prune-steps", "0"]
    train.main(args + ["--out", str(tmp_path / "straight")])
    real_lr = train.lr_at

    def interrupt_at_12(step, *a):
        if step == 12:
            raise KeyboardInterrupt
        return real_lr(step, *a)

    monkeypatch.setattr(train, "lr_at", interrupt_at_12)
    with pytest.raises(SystemExit) as e:
        train.main(args + ["--out", str(tmp_path / "stopped")])
    assert e.value.code == 130
    assert torch.load(tmp_path / "stopped" / "dense.pt", weights_only=True)["step"] == 12
    monkeypatch.setattr(train, "lr_at", real_lr)
    with pytest.raises(SystemExit):   # an unfinished run is not silently restarted or continued
        train.main(args + ["--out", str(tmp_path / "stopped")])
    train.main(args + ["--out", str(tmp_path / "stopped"), "--resume"])
    a = torch.load(tmp_path / "straight" / "dense.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "stopped" / "dense.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_a_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = train.task_loss
    calls = []

    def blows_up(*a, **kw):
        loss, info = real(*a, **kw)
        calls.append(1)
        return (loss * float("nan") if len(calls) > 12 else loss), info

    monkeypatch.setattr(train, "task_loss", blows_up)
    with pytest.raises(SystemExit) as e:
        train.main(FAST + ["--out", str(tmp_path), "--dense-steps", "30", "--save-every", "5"])
    assert e.value.code == 3
    assert "at step 12" in capsys.readouterr().out
    assert torch.load(tmp_path / "dense.pt", weights_only=True)["step"] == 10


def test_cuda_requested_without_cuda_is_one_clear_line(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, "train.py", "--device", "cuda", "--preset", "tiny", "--out", str(tmp_path)],
                       cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "CUDA is not available" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_two_process_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *FAST, "--out", str(tmp_path), "--dense-steps", "20", "--prune-steps", "10"]
    p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    m = load_json(tmp_path / "metrics.json")
    assert "madtp 50%" in m
    log = (tmp_path / "train.log").read_text()
    assert log.count("stage 1: training") == 1, "only rank 0 writes"


@pytest.mark.skipif(not COCO_MINI.exists(), reason="../shared/coco-mini is not here")
def test_coco_mini_end_to_end(tmp_path):
    for ann in ("annotations/captions_train2017.json,annotations/captions_val2017.json",
                "karpathy/coco_mini_karpathy_train.json,karpathy/coco_mini_karpathy_test.json"):
        out = tmp_path / ann.split("/")[0]
        train.main(["--data", "coco", "--coco-root", str(COCO_MINI), "--coco-ann", ann, *FAST,
                    "--out", str(out), "--dense-steps", "6", "--prune-steps", "6", "--batch-size", "16"])
        m = load_json(out / "metrics.json")
        assert set(m) == {"dense", "madtp 50%"}
        assert all(math.isfinite(r["r_mean"]) for r in m.values())


def test_ablation_writes_one_row_per_budget_rule(tmp_path):
    arms = ["global", "layer"]
    train.main(FAST + ["--out", str(tmp_path), "--ablation", "0.5", "--arms", ",".join(arms), "--dense-steps", "30",
                       "--prune-steps", "10"])
    results = load_json(tmp_path / "ablation-0.50.json")
    labels = {train.ABLATION[a][0] for a in arms}
    assert {r["method"] for r in results["summary"]} == labels | {"dense"}
    for r in results["summary"]:
        if r["method"] != "dense":
            assert abs(r["gflops_reduction"][0] - 0.5) <= 0.05, r
    md = (tmp_path / "ablation-0.50.md").read_text()
    assert md.startswith("| budget rule") and md.count("\n") == 2 + 1 + len(labels)


def test_compare_writes_results(tmp_path):
    train.main(FAST + ["--out", str(tmp_path), "--compare", "0.5", "--dense-steps", "60", "--prune-steps", "20"])
    results = load_json(tmp_path / "results.json")
    rows = {(r["method"], r["target"]) for r in results["summary"]}
    assert rows == {("dense", 0.0)} | {(m, 0.5) for m in METHODS}
    for r in results["summary"]:
        if r["method"] != "dense":
            assert abs(r["gflops_reduction"][0] - 0.5) <= 0.05, r
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("| method") and md.count("\n") == 2 + 1 + len(METHODS)
