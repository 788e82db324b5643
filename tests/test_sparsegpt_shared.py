"""Layers reading one input (Q, K and V) share one factorisation of H: results equal one solve per layer.

sparsegpt_prune_shared factors H + λI once and, with N:M, sweeps all the weights' rows together; the pass
groups its layers by Gram matrix. Both must give bit for bit the weights and masks of one solve per layer.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import run
from pass_helpers import calibration, context, make_model, run_pass, samples, targets, weights

from sparsec.core.options import NMPattern
from sparsec.weights import sparsegpt_solver
from sparsec.weights.calibrate_pass import CalibratePass
from sparsec.weights.sparsegpt_pass import SparseGPTPass
from sparsec.weights.sparsegpt_solver import sparsegpt_prune, sparsegpt_prune_shared


def _inputs(k: int, samples: int, seed: int, dead: int | None = None):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)))  # correlated
    if dead is not None:
        x[:, dead] = 0.0
    return x.T @ x, samples


@pytest.mark.parametrize("pattern", [{"n": 2, "m": 4}, {"n": 1, "m": 4}, {"sparsity": [0.5, 0.3, 0.7]}])
def test_shared_solve_equals_one_solve_per_weight(pattern):
    rng = np.random.default_rng(0)
    gram, count = _inputs(64, 200, seed=1, dead=9)
    ws = [rng.standard_normal((rows, 64)).astype(dtype)
          for rows, dtype in ((24, np.float32), (8, np.float16), (40, np.float32))]
    shared = sparsegpt_prune_shared(ws, gram, count, block_size=32, **pattern)
    ratios = pattern.get("sparsity", [None] * 3)
    for w, s, ratio in zip(ws, shared, ratios, strict=True):
        kw = {k: v for k, v in pattern.items() if k != "sparsity"}
        one = sparsegpt_prune(w, gram, count, block_size=32, sparsity=ratio, **kw)
        np.testing.assert_array_equal(s.keep, one.keep)
        np.testing.assert_array_equal(s.weight, one.weight)  # bit for bit, dtype kept
        assert s.weight.dtype == w.dtype and s.damp == one.damp
        assert s.error_after == pytest.approx(one.error_after, rel=1e-12)
        assert s.error_before == pytest.approx(one.error_before, rel=1e-12)
        assert s.error_after < s.error_before


def test_error_before_can_be_skipped():
    rng = np.random.default_rng(2)
    gram, count = _inputs(32, 100, seed=3)
    w = rng.standard_normal((16, 32)).astype(np.float32)
    full = sparsegpt_prune(w, gram, count, n=2, m=4, block_size=16)
    lean = sparsegpt_prune(w, gram, count, n=2, m=4, block_size=16, error_before=False)
    assert lean.error_before is None and full.error_before > full.error_after > 0
    assert lean.error_after == pytest.approx(full.error_after, rel=1e-12)
    np.testing.assert_array_equal(lean.weight, full.weight)


def test_nothing_to_prune_in_a_shared_solve_keeps_that_weight():
    rng = np.random.default_rng(4)
    gram, count = _inputs(32, 100, seed=5)
    ws = [rng.standard_normal((8, 32)).astype(np.float32) for _ in range(2)]
    out = sparsegpt_prune_shared(ws, gram, count, sparsity=[0.0, 0.5], block_size=16)
    np.testing.assert_array_equal(out[0].weight, ws[0])
    assert out[0].keep.all() and out[0].error_after == 0.0
    assert (~out[1].keep).sum() == 8 * 32 // 2 and out[1].error_after > 0


def _qkv(seed: int = 0, k: int = 16):
    """x → three MatMuls reading x (q, k, v) → Add → Relu → MatMul: three layers share one Gram."""
    rng = np.random.default_rng(seed)
    inits = {name: rng.standard_normal((k, 24)) for name in ("wq", "wk", "wv")}
    inits["wo"] = rng.standard_normal((24, 8))
    from onnx import helper

    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], "q_proj"),
             helper.make_node("MatMul", ["x", "wk"], ["kk"], "k_proj"),
             helper.make_node("Add", ["q", "kk"], ["qk"], "add_qk"),
             helper.make_node("MatMul", ["x", "wv"], ["v"], "v_proj"),
             helper.make_node("Add", ["qk", "v"], ["s"], "add_v"),
             helper.make_node("Relu", ["s"], ["r"], "relu"),
             helper.make_node("MatMul", ["r", "wo"], ["y"], "o_proj")]
    return make_model(nodes, {"x": ("N", k)}, ["y"], inits)


def test_pass_factors_once_per_input_and_equals_per_layer_solves(monkeypatch):
    nm = NMPattern(2, 4)
    model = _qkv()
    settings = calibration(model, samples=64)
    ctx = context(model)
    run_pass(CalibratePass(targets(model, nm=nm), settings, gram=True), ctx)
    factored = []
    real = sparsegpt_solver._factor

    def spy(gram, count, percdamp, **kwargs):
        factored.append(gram.shape)
        return real(gram, count, percdamp, **kwargs)

    monkeypatch.setattr(sparsegpt_solver, "_factor", spy)
    result = run_pass(SparseGPTPass(targets(model, nm=nm), nm=nm, block_size=8), ctx)
    assert sorted(factored) == [(16, 16), (24, 24)]  # q, k, v share one factor; o_proj has its own
    assert [p.weight for p in result.details["weights"]] == ["wq", "wk", "wv", "wo"]  # layer order
    calib = ctx.facts["calibration"]
    dense, new = weights(model), weights(ctx.model)
    for name, layer in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
        stats = calib.layers[layer]
        one = sparsegpt_prune(dense[name].T, stats.gram, stats.rows, n=2, m=4, block_size=8)
        np.testing.assert_array_equal(new[name], one.weight.T)
        row = next(p for p in result.details["weights"] if p.weight == name)
        assert row.rel_error == pytest.approx(one.error_after, rel=1e-12)
    x = samples(settings)
    h = np.maximum(x @ new["wq"] + x @ new["wk"] + x @ new["wv"], 0.0) @ new["wo"]
    np.testing.assert_allclose(run(ctx.model, {"x": x})[0], h, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pattern", [{"n": 2, "m": 4}, {"sparsity": 0.6}])
def test_few_rows_sweep_on_the_factor_without_its_inverse(monkeypatch, pattern):
    """12·rows·block < K²: the sweep runs on L (obs_sweep_factored), and equals the sweep on U = L⁻¹."""
    rng = np.random.default_rng(6)
    gram, count = _inputs(128, 300, seed=7, dead=3)
    w = rng.standard_normal((6, 128)).astype(np.float32)
    used = []
    real = sparsegpt_solver.obs_sweep_factored
    monkeypatch.setattr(sparsegpt_solver, "obs_sweep_factored", lambda *a: used.append(1) or real(*a))
    fast = sparsegpt_prune(w, gram, count, block_size=16, **pattern)
    assert used
    factor = sparsegpt_solver._factor
    monkeypatch.setattr(sparsegpt_solver, "_factor",  # force the inverse: the path before
                        lambda g, c, p, invert=True: factor(g, c, p, invert=True))
    slow = sparsegpt_prune(w, gram, count, block_size=16, **pattern)
    assert len(used) == 1
    np.testing.assert_array_equal(fast.keep, slow.keep)
    np.testing.assert_allclose(fast.weight, slow.weight, rtol=0, atol=1e-6 * float(np.abs(w).max()))
    assert fast.error_after == pytest.approx(slow.error_after, rel=1e-9)


def test_non_finite_sweep_on_the_factor_falls_back_to_the_inverse(monkeypatch):
    rng = np.random.default_rng(8)
    gram, count = _inputs(128, 300, seed=9)
    w = rng.standard_normal((6, 128)).astype(np.float32)
    expected = sparsegpt_prune(w, gram, count, n=2, m=4, block_size=16)
    monkeypatch.setattr(sparsegpt_solver, "obs_sweep_factored",
                        lambda wt, *a: (np.zeros(wt.shape, bool), False))
    got = sparsegpt_prune(w, gram, count, n=2, m=4, block_size=16)
    np.testing.assert_array_equal(got.keep, expected.keep)
    np.testing.assert_allclose(got.weight, expected.weight, rtol=0, atol=1e-6 * float(np.abs(w).max()))
