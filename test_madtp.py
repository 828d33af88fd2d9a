"""Tests for the MADTP reference: tiny configs on the CPU; each checks a property the method or
the pipeline promises (SPEC sections 1-9). Run with `pytest`."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from madtp import (ENCODERS, METHODS, MADTP, MADTPConfig, Trace, count_only, gflops, dense_gflops,
                   keep_mask, package_weights, prune_tokens, threshold, normalise, alignment_loss)
from vlt import VLT, VLTConfig, task_loss

TINY = VLTConfig(image_size=32, patch_size=8, vocab_size=40, max_text_len=16, dim=32, heads=2,
                 vision_layers=2, text_layers=2, fusion_layers=2, embed_dim=16)


def tiny_model(method="madtp", beta=1.0, seed=0, **kw):
    torch.manual_seed(seed)
    model = VLT(TINY).eval()
    madtp = MADTP(MADTPConfig(method=method, num_align_tokens=8, **kw), TINY.dim)
    madtp.beta.fill_(beta)
    return model, madtp


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
    hooks = madtp.hooks(trace) if madtp is not None else {e: count_only(trace, e) for e in ENCODERS}
    with torch.no_grad():
        out = model(imgs, ids, valid, hooks)
    g = gflops(model.cfg, trace, image_tokens=trace.layers["vision"][-1]["n_out"])
    return out, trace, g


def kept_total(trace):
    return sum(int(r["n_out"].sum()) for e in ENCODERS for r in trace.layers[e])


# --- core: MAG, DTP and the VLT (issue 2) ------------------------------------------------------

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
    out, out_valid, _ = prune_tokens(x, keep, S, valid)
    torch.testing.assert_close(out[0, -1], (w[0, :, None] * x[0, 1:]).sum(0))
    assert out_valid.int().tolist() == [[1, 1, 1, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0, 0, 1]]
    assert (out[~out_valid] == 0).all()


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


@pytest.mark.parametrize("method", METHODS)
def test_larger_beta_keeps_fewer_tokens(method):
    model, madtp = tiny_model(method)
    imgs, (ids, valid) = images(4), captions([3, 11, 7, 5])
    kept = []
    for beta in (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0):
        madtp.beta.fill_(beta)
        kept.append(kept_total(run(model, madtp, imgs, ids, valid)[1]))
    assert all(b <= a for a, b in zip(kept, kept[1:])), kept
    assert kept[-1] < kept[0]


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
    (lambda i, t, v: (i, t + TINY.vocab_size, v), "token ids must lie in"),
    (lambda i, t, v: (i, t - 5, v), "token ids must lie in"),
    (lambda i, t, v: (i[:1], t, v), "2 captions"),
])
def test_bad_input_is_a_clear_error(bad, message):
    model, madtp = tiny_model()
    imgs, (ids, valid) = images(2), captions([4, 6])
    with pytest.raises(ValueError, match=message):
        model(*bad(imgs, ids, valid), madtp.hooks(Trace()))


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown pruning method"):
        MADTPConfig(method="evit")
