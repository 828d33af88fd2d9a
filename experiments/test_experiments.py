"""Tests of the research code (experiments/): the variants through the seam, the comparison, the
decomposition, the ground truth, re-evaluation, the benchmark and the GPU check, on tiny configs on
the CPU. Collected by the README's `pytest` with test_madtp.py."""

import contextlib
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from experiments import compare, decompose, evaluate, gpucheck, truth
from experiments import static as static_module
from experiments.common import HostSyncs, best_times, positions
from experiments.methods import ARMS, Options, Variant, search_cuts, share_threshold
from madtp import ENCODERS, MADTPConfig
from vlt import VLT
from test_madtp import TINY, TINY_RUN, captions, images, load_json, run, tiny_main_job, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def tiny_variant(arm, beta=1.0, **changes):
    torch.manual_seed(0)
    options = Options(**dict(vars(ARMS[arm]), **changes))
    madtp = Variant(MADTPConfig(num_align_tokens=8), TINY, options)
    madtp.beta.fill_(beta)
    return VLT(TINY).eval(), madtp


def kept_total(trace):
    return sum(int(trace.counts(e).sum()) for e in ENCODERS)


@pytest.fixture
def tiny_run(tmp_path_factory):
    """The tiny main job of test_madtp.py, run once a session."""
    return tiny_main_job(tmp_path_factory)


@pytest.mark.parametrize("arm", ARMS)
def test_every_arm_prunes_more_as_beta_grows(arm):
    model, madtp = tiny_variant(arm)
    imgs, (ids, valid) = images(4, device="cpu"), captions([3, 11, 7, 5], device="cpu")
    kept = []
    for beta in (0.0, 0.5, 1.0, 2.0, 3.0):
        madtp.beta.fill_(beta)
        kept.append(kept_total(run(model, madtp, imgs, ids, valid)[1]))
    if arm == "madtp-batch-max":   # the official guard: past the β where no token passes, nothing is pruned
        cliff = next((i for i in range(1, len(kept)) if kept[i] > kept[i - 1]), len(kept))
        kept = kept[:cliff]
    assert all(b <= a for a, b in zip(kept, kept[1:])) and kept[-1] < kept[0], kept


@pytest.mark.parametrize("arm", ["madtp-sample", "madtp-static", "cls-static", "dtp-no-mag", "random"])
def test_the_batch_invariant_arms_are(arm):
    model, madtp = tiny_variant(arm)
    lengths = [3, 11, 7, 1]
    imgs, (ids, valid) = images(4, device="cpu"), captions(lengths, device="cpu")
    together = run(model, madtp, imgs, ids, valid)[0]
    for b, n in enumerate(lengths):
        alone = run(model, madtp, imgs[b:b + 1], ids[b:b + 1, : 1 + n], valid[b:b + 1, : 1 + n])[0]
        torch.testing.assert_close(alone["itm"][0], together["itm"][b], rtol=1e-4, atol=1e-5)


def test_the_madtp_arms_are_the_main_path():
    """Through the seam, madtp-sample decides exactly as madtp.MADTP does."""
    (model, main), (_, arm) = tiny_model(device="cpu"), tiny_variant("madtp-sample")
    arm.load_state_dict(main.state_dict(), strict=False)
    imgs, (ids, valid) = images(3, device="cpu"), captions([4, 9, 2], device="cpu")
    a, b = run(model, main, imgs, ids, valid), run(model, arm, imgs, ids, valid)
    assert torch.equal(a[0]["itm"], b[0]["itm"]) and all(torch.equal(a[2][e], b[2][e]) for e in ENCODERS)


def test_fixed_counts_first_layer_and_switches():
    """Fixed counts keep ceil(n ρ) of every sample's n tokens; layers before first_layer and the
    encoders switched off keep all."""
    model, madtp = tiny_variant("madtp-static", beta=1.5, first_layer=1, prune=("vision", "fusion"))
    _, trace, _ = run(model, madtp, images(3, device="cpu"), *captions([4, 8, 6], device="cpu"))
    for e in ENCODERS:
        r = trace.layers[e]
        assert torch.equal(r[0]["valid_in"].sum(1), r[0]["valid_out"].sum(1)), e
    n = trace.layers["vision"][1]["valid_in"].sum(1) - 1
    kept = trace.layers["vision"][1]["keep"].sum(1)
    assert kept.tolist() == [math.ceil(k / 2.5) for k in n.tolist()]
    assert torch.equal(trace.layers["text"][1]["valid_in"], trace.layers["text"][1]["valid_out"])


def test_share_threshold_pools_the_batch_skips_padding_and_reads_nothing():
    v = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    stat = torch.tensor([[5.0, 1.0, 3.0, 99.0], [4.0, 0.5, 2.0, 6.0]])
    with HostSyncs() as syncs:
        bar = share_threshold(stat, v, 3 / 7)                              # keep 3 of the 7 valid tokens
    assert syncs.total == 0, syncs.calls   # indexing with a 0-d tensor would read it (aten::_local_scalar_dense)
    assert ((stat > bar) & v).int().tolist() == [[1, 0, 0, 0], [1, 0, 0, 1]]
    assert share_threshold(stat, v, 1.0) == -math.inf                     # ρ = 1 keeps everything


def test_host_sync_counter_sees_reads_inside_aten():
    t, k = torch.arange(5.0), torch.tensor(2)
    with HostSyncs() as syncs:
        bool(t.any()), int(t[0]), t.sum().item(), t.tolist(), t.nonzero(), t[t > 2], t.argsort(), t[k]
    assert syncs.calls == {"aten::_local_scalar_dense": 4, "aten::nonzero": 2, "tolist": 1}


def test_search_cuts_spends_the_cut_where_it_costs_least():
    """Three layers that save the same GFLOPs; the second costs 4 times as much per cut, the third
    saves nothing. The greedy search reaches the target, cuts the cheap layer deepest and the useless
    one never."""
    price, gain = torch.tensor([1.0, 4.0, 1.0]), torch.tensor([0.3, 0.3, 0.0])

    def cost(cuts):
        w = cuts[0]
        return float((price * w ** 2).sum()), float((gain * (1 - 2 ** -w)).sum())
    cuts = search_cuts(cost, [(0, 0), (0, 1), (0, 2)], (1, 3), target=0.4, step=0.25)
    w = cuts[0]
    assert cost(cuts)[1] >= 0.4 and cost(cuts - 0.25 * (w > 0))[1] < 0.4   # no further than needed
    assert w[0] > w[1] > 0 and w[2] == 0


def test_positions_follow_the_kept_tokens():
    model, madtp = tiny_variant("madtp-sample", beta=2.0)
    _, trace, _ = run(model, madtp, images(3, device="cpu"), *captions([4, 8, 2], device="cpu"))
    for e in ENCODERS:
        for pos, r in zip(positions(trace, e), trace.layers[e]):
            assert (pos[:, 0] == 0).all() and (pos[~r["valid_out"]] == -1).all()    # CLS first; padding -1
            kept = [sorted(p[p >= 1].tolist()) for p in pos]
            assert all(p == sorted(set(p)) for p in kept)                  # each original token at most once


def test_compare_writes_the_table(tiny_run, tmp_path):
    shutil.copy(tiny_run / "dense.pt", tmp_path / "dense.pt")
    arms = ["madtp-static", "cls-dynamic"]
    compare.main(TINY_RUN + ["--out", str(tmp_path), "--ratios", "0.5", "--prune-steps", "4", "--arms", ",".join(arms),
                             "--no-timed", "--control"])
    results = load_json(tmp_path / "results.json")
    assert {(r["method"], r["target"]) for r in results["summary"]} == \
        {("dense", 0.0), ("control", 0.0)} | {(m, 0.5) for m in arms}
    for r in results["summary"]:
        if r["method"] != "dense":
            assert abs(r["gflops_reduction"][0] - r["target"]) <= 0.05, r
    control = torch.load(tmp_path / "seed0" / "control-0.00.pt", weights_only=True)   # fine-tuned, not dense
    assert control["step"] == 4 and control["pruner"]["counts"] == "fixed"
    assert (tmp_path / "results.md").read_text().count("\n") == 2 + 2 + len(arms)


def test_decomposition_switches_one_thing_at_a_time(tiny_run, tmp_path):
    rows = dict(decompose.main([str(tiny_run / "madtp-sample-0.50.pt"), "--device", "cpu", "--out", str(tmp_path)]))
    trained = load_json(tiny_run / "metrics.json")["madtp 50% sample"]
    assert rows["vision + text + fusion (as trained)"]["r_mean"] == trained["r_mean"]
    assert abs(rows["none"]["gflops_reduction"]) < 1e-9 < rows["vision"]["gflops_reduction"]
    fixed = rows["vision at fixed counts"]["kept_tokens"]
    assert all(sd == 0 for _, sd in fixed["vision"]) and fixed["text"][0][1] > 0
    truth_first = rows["vision: object patches first, fixed counts"]
    assert truth_first["kept_tokens"]["vision"] == fixed["vision"]
    probe = decompose.Truth(MADTPConfig(), TINY, ARMS["madtp-static"], torch.ones(3, 16, dtype=torch.bool))
    assert "objects" in dict(probe.named_buffers()), "the ground truth must follow the model to its device"


def test_ground_truth_measures_and_drawing(tiny_run, tmp_path):
    masks = [torch.tensor([j < k for j in range(4)]) for k in (1, 2, 3, 4)]
    kept = (2, 2, 2, 2), (1, 2, 3, 4)   # layer 1 keeps 2 patches each, layer 2 as many as it has objects
    pos = [[torch.tensor([0] + list(range(1, 1 + kept[l][s])) + [-1]) for l in range(2)] for s in range(4)]
    assert truth.recall(masks, pos).mean(0).tolist() == pytest.approx([(1 + 1 + 2 / 3 + 1 / 2) / 4, 1.0])
    m = truth.main([str(tiny_run / "madtp-sample-0.50.pt"), "--device", "cpu", "--out", str(tmp_path)])
    assert m["object_share"][-1] > m["object_share_all_patches"], "MADTP keeps object patches above their share"
    assert all(len(m[k]) == 2 for k in ("object_recall", "pearson_r"))   # the tiny preset's vision layers
    assert (tmp_path / "tokens.png").stat().st_size > 1000


def test_reevaluation_matches_the_main_job_and_beta_reprunes(tiny_run, tmp_path):
    m = evaluate.main([str(tiny_run / "madtp-sample-0.50.pt"), "--device", "cpu", "--out", str(tmp_path), "--timed"])
    assert m["pairs_per_s_batch1"] > 0
    trained = load_json(tiny_run / "metrics.json")["madtp 50% sample"]
    assert m["r_mean"] == trained["r_mean"] and m["gflops"] == pytest.approx(trained["gflops"])
    barely = evaluate.main([str(tiny_run / "madtp-sample-0.50.pt"), "--device", "cpu", "--out", str(tmp_path),
                            "--beta", "0.001", "--no-timed"])
    assert barely["gflops_reduction"] < m["gflops_reduction"]


def test_timing_copies_nothing_inside_the_timed_rounds():
    """best_times takes batches already on the device: no copy to a device in the timed region."""
    class Copies(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            to_device = getattr(func, "__name__", "") in ("to", "cuda", "pin_memory") and any(
                isinstance(a, (torch.device, str)) for a in (*args[1:], *(kwargs or {}).values()))
            Copies.n += to_device
            return func(*args, **(kwargs or {}))
    model, madtp = tiny_model(device="cpu")
    batches = [(images(2, device="cpu"), *captions([3, 5], device="cpu"))]
    with Copies():
        best_times(type("Run", (), dict(autocast=contextlib.nullcontext, device=torch.device("cpu")))(),
                   dict(dense=(model, None), pruned=(model, madtp)), batches, rounds=1, warmup=0)
    assert Copies.n == 0


def test_the_gpu_check_runs_on_the_cpu_within_twelve_minutes_on_paper(tmp_path):
    assert sum(gpucheck.TIME_BOX.values()) <= 12 * 60
    # a process of its own, as a user starts it: gpucheck forks its steps, and a fork of this
    # process, which has run OpenMP, can hang
    subprocess.run([sys.executable, "-m", "experiments.gpucheck", "--out", str(tmp_path), "--device", "cpu",
                    "--size", "tiny", "--tests", "test_batch_invariance"], cwd=Path(__file__).parent.parent,
                   check=True, timeout=300)
    results = load_json(tmp_path / "summary.json")
    assert all(r["rc"] == 0 for r in results.values()), results
    for f in ("env.log", "summary.md", "main/metrics.json", "main/tokens.png", "speed/bench-cpu.md",
              "bench/bench-cpu.md", "static/static-cpu.md"):
        assert (tmp_path / f).exists(), f
    rows = load_json(tmp_path / "bench" / "bench-cpu.json")["rows"]   # the bench: every model, both batches
    assert {(r["model"], r["batch"]) for r in rows} == {(m, b) for m in ("dense", "sample 50%", "sample 80%",
                                                                           "batch-max 50%", "batch-max 80%")
                                                        for b in (1, 8)}
    assert all(r["pairs_per_s"] > 0 and (r["model"] == "dense") == (r["calls_per_pruned_layer"] is None)
               for r in rows)


@pytest.mark.parametrize("pruner", ["madtp", "variant"])
def test_static_widths_give_the_dynamic_result_without_reading_the_host(pruner):
    """Widths measured on the batches themselves hold every sample: the same outputs as the dynamic
    layer (MADTP's or a compare arm's), each layer exactly its width wide, and not one host read
    (what a CUDA graph needs)."""
    model, madtp = tiny_model("batch-max", beta=1.0) if pruner == "madtp" else tiny_variant("madtp-batch-max")
    batches = [(images(4, seed=s), *captions([3, 9, 15, 6], pad_to=TINY.max_text_len - 1, seed=s)) for s in (0, 1)]
    fake_run = type("Run", (), dict(autocast=contextlib.nullcontext))()
    static = static_module.static_of(madtp, static_module.widths_of(fake_run, model, madtp, batches))
    assert static.widths["vision"][-1] < 1 + TINY.num_patches                    # it pruned
    for b in batches:
        (dynamic, _, _), (fixed, trace, _) = run(model, madtp, *b), run(model, static, *b)
        assert static_module.largest_difference(dynamic, fixed) < 1e-5
        assert [r["valid_out"].shape[1] for r in trace.layers["vision"]] == static.widths["vision"]
        with HostSyncs() as syncs:
            run(model, static, *b)
        assert syncs.total == 0, syncs.calls
    assert int(static.overflows) == 0


def test_a_static_width_too_narrow_keeps_the_best_scores_and_fuses_the_rest():
    keep = torch.tensor([[1, 1, 1, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    S = torch.tensor([[0.3, 0.1, 0.4, 0.05, 0.15], [0.9, 0.1, 0.0, 0.0, 0.0]])
    cut, n = static_module.capped(keep, S, 2)
    assert cut.int().tolist() == [[1, 0, 1, 0, 0], [1, 0, 0, 0, 0]] and int(n) == 1
    model, madtp = tiny_model("batch-max", beta=0.5)
    widths = dict(vision=[6, 5], text=[4, 4], fusion=[4, 3])    # narrower than β's counts
    static = static_module.static_of(madtp, widths)
    out, trace, _ = run(model, static, images(3), *captions([5, 12, 8]))
    assert all(torch.isfinite(v).all() for v in out.values()) and int(static.overflows) > 0
    for e, ws in widths.items():
        assert [r["valid_out"].shape[1] for r in trace.layers[e]] == ws
        for r, w in zip(trace.layers[e], ws):   # x_fuse needs a slot unless the input fits whole
            assert int(r["keep"].sum(dim=1).max()) <= (w - 2 if w < r["valid_in"].shape[1] else w - 1)


def test_a_fixed_width_forward_is_one_graph_for_torch_compile():
    """What --compile and a CUDA graph need: no break in the whole forward (the dynamic layer's host
    read breaks it in every pruned layer, 19 times here)."""
    model, madtp = tiny_model("batch-max", beta=1.0)
    static = static_module.static_of(madtp, dict(vision=[12, 8], text=[10, 8], fusion=[8, 6]))
    hooks = static.hooks(static_module.Untraced())
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(lambda *b: model(*b, hooks))(images(3), *captions([5, 12, 8]))
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_static_refuses_a_dense_checkpoint_and_a_batch_of_none(tiny_run, capsys):
    for argv, words in (([str(tiny_run / "dense.pt"), "--device", "cpu"], "is a dense model"),
                        (["--batch-size", "0", "--device", "cpu"], "must be at least 1")):
        with pytest.raises(SystemExit):
            static_module.main(argv + ["--out", str(tiny_run / "static")])
        assert words in capsys.readouterr().err
