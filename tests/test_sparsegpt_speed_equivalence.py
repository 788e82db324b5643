"""The fast SparseGPT solver equals a plain transcription of the paper's algorithm, and shows progress.

The reference below follows `fasterprune` of IST-DASLab/sparsegpt line by line (H⁻¹ by a full inverse,
its upper Cholesky factor, one column at a time with the whole row of H⁻¹), so the blocked, grouped,
single-factorisation solver in sparsec/weights/sparsegpt_solver.py is pinned against it.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from pass_helpers import calibration, context, mlp, run_pass, targets

from sparsec.core.options import NMPattern
from sparsec.weights import sparsegpt_solver
from sparsec.weights.calibrate_pass import CalibratePass
from sparsec.weights.sparsegpt_pass import SparseGPTPass
from sparsec.weights.sparsegpt_solver import sparsegpt_prune


def reference_sparsegpt(w: np.ndarray, gram: np.ndarray, count: int, *, sparsity=None, n=None, m=None,
                        block_size=128, percdamp=0.01) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(weight, keep, error_before, error_after), column by column, float64, no shortcuts."""
    W = w.astype(np.float64).copy()
    H = gram.astype(np.float64) / count
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H = H + percdamp * np.mean(np.diag(H)) * np.eye(len(H))
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper U with UᵀU = H⁻¹
    rows, k = W.shape
    mask = np.zeros((rows, k), dtype=bool)  # True = pruned
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1, Hinv1, Err1 = W[:, i1:i2].copy(), Hinv[i1:i2, i1:i2], np.zeros((rows, i2 - i1))
        if sparsity is not None:
            tmp = (W1**2 / np.diag(Hinv1)[None, :] ** 2).ravel()
            removed = np.argsort(tmp, kind="stable")[: int(round(sparsity * tmp.size))]
            mask[:, i1:i2].flat[removed] = True
        for i in range(i2 - i1):
            if n is not None and i % m == 0:
                tmp = W1[:, i:i + m] ** 2 / np.diag(Hinv1)[i:i + m][None, :] ** 2
                order = np.argsort(-tmp, axis=1, kind="stable")  # highest first, earlier on ties
                mask[np.arange(rows)[:, None], i1 + i + order[:, n:]] = True
            col, d = W1[:, i], Hinv1[i, i]
            q = np.where(mask[:, i1 + i], 0.0, col)
            err = (col - q) / d
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    keep = ~mask
    new = np.where(keep, W, 0.0).astype(w.dtype)
    g = gram.astype(np.float64)

    def quad(dw):
        dw = dw.astype(np.float64)
        return float(np.sum((dw @ g) * dw))

    total = quad(w)
    return new, keep, np.sqrt(quad(w - w * keep) / total), np.sqrt(quad(w - new) / total)


def _layer(rows, k, samples, seed, dead=()):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, k)) * rng.uniform(0.2, 3.0, k)  # uneven input scales
    x[:, list(dead)] = 0.0
    w = rng.standard_normal((rows, k)).astype(np.float32)
    return w, x.T @ x, samples


@pytest.mark.parametrize("rows,k,block,pattern,seed", [
    (24, 64, 16, (2, 4), 0),
    (40, 96, 32, (2, 4), 1),
    (16, 128, 128, (4, 8), 2),
    (32, 64, 16, (1, 4), 3),
    (24, 64, 16, 0.5, 4),
    (40, 96, 32, 0.3, 5),
    (17, 80, 80, 0.7, 6),
    (6, 128, 16, (2, 4), 9),  # few rows against K: swept on the Cholesky factor (obs_sweep_factored)
    (5, 160, 32, 0.5, 10),
])
def test_solver_equals_reference(rows, k, block, pattern, seed):
    nm = isinstance(pattern, tuple)
    kwargs = dict(n=pattern[0], m=pattern[1]) if nm else dict(sparsity=pattern)
    w, gram, count = _layer(rows, k, samples=3 * k, seed=seed, dead=(5,))
    fast = sparsegpt_prune(w, gram, count, block_size=block, **kwargs)
    ref_w, ref_keep, ref_before, ref_after = reference_sparsegpt(w, gram, count, block_size=block, **kwargs)
    np.testing.assert_array_equal(fast.keep, ref_keep)
    np.testing.assert_allclose(fast.weight, ref_w, rtol=0, atol=1e-5 * float(np.abs(w).max()))
    assert fast.weight.dtype == w.dtype and (fast.weight[~fast.keep] == 0).all()
    assert fast.error_before == pytest.approx(ref_before, rel=1e-9)
    assert fast.error_after == pytest.approx(ref_after, rel=1e-6)  # float32 weights: rounding only
    assert fast.error_after < fast.error_before


def test_rank_deficient_gram_equals_reference():
    """Fewer samples than inputs: H is singular and only the damping makes it invertible."""
    w, gram, count = _layer(12, 64, samples=20, seed=7)
    fast = sparsegpt_prune(w, gram, count, n=2, m=4, block_size=32)
    ref_w, ref_keep, _, ref_after = reference_sparsegpt(w, gram, count, n=2, m=4, block_size=32)
    np.testing.assert_array_equal(fast.keep, ref_keep)
    np.testing.assert_allclose(fast.weight, ref_w, rtol=0, atol=1e-5 * float(np.abs(w).max()))
    assert fast.error_after == pytest.approx(ref_after, rel=1e-6, abs=1e-9)


def test_solve_runs_with_one_blas_thread(monkeypatch):
    """The per-layer solve limits BLAS threads (oversubscribed OpenBLAS pools spin against each other)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    seen = []
    real = sparsegpt_solver.obs_sweep

    def spy(*args, **kwargs):
        seen.append({i["internal_api"]: i["num_threads"] for i in threadpoolctl.threadpool_info()
                     if i["user_api"] == "blas"})
        return real(*args, **kwargs)

    monkeypatch.setattr(sparsegpt_solver, "obs_sweep", spy)
    w, gram, count = _layer(8, 16, samples=64, seed=8)
    sparsegpt_prune(w, gram, count, n=2, m=4, block_size=16)
    assert seen and all(v == sparsegpt_solver.SOLVE_THREADS for v in seen[0].values())


def _solve_pass(model, progress, monkeypatch):
    nm = NMPattern(2, 4)
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    ctx = context(model)
    run_pass(CalibratePass(targets(model, nm=nm), calibration(model, samples=32), gram=True), ctx)
    result = run_pass(SparseGPTPass(targets(model, nm=nm), nm=nm, block_size=8, progress=progress), ctx)
    return result, stream.getvalue()


def test_pass_shows_layers_done_and_eta(monkeypatch):
    model = mlp()
    result, err = _solve_pass(model, True, monkeypatch)
    solved = len(result.details["weights"])
    assert solved == 2
    assert f"sparsegpt [{'#' * 24}] {solved}/{solved} layers" in err and "ETA" in err


def test_pass_is_silent_when_quiet(monkeypatch):
    model = mlp()
    result, err = _solve_pass(model, False, monkeypatch)
    assert result.modified and err == ""


@pytest.mark.parametrize("sequential", [False, True])
def test_compile_composes_with_sequential(tmp_path, sequential):
    """--sequential solves level by level (each level on the inputs the pruned levels before it give):
    2:4 holds, the written model matches its own weights, and it does not lose to one-shot by much."""
    import onnx

    import sparsec
    from sparsec.weights.masks import satisfies_nm

    model = mlp()
    onnx.save(model, tmp_path / "m.onnx")
    report = sparsec.compile(tmp_path / "m.onnx", output=tmp_path / "out", nm="2:4", method="sparsegpt",
                             calib_random=64, seed=3, min_params=0, force=True, quiet=True,
                             sequential=sequential, block_size=8).as_dict()
    pruned = onnx.load(str(tmp_path / "out" / "model.onnx"))
    ws = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert all(satisfies_nm(ws[n], 2, 4, 0) for n in ("w1", "w2"))
    rows = [w for w in report["layers"] if w["method"] == "sparsegpt"]
    assert len(rows) == 2 and all(0.0 < w["rel_error"] < 1.0 for w in rows)
