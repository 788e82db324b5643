"""SparseGPT core: mask invariants, lower reconstruction error than magnitude and Wanda, edge cases."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsec.weights.masks import nm_mask, satisfies_nm, unstructured_mask
from sparsec.weights.obs_sweep import _lowest_removed
from sparsec.weights.sparsegpt_solver import relative_errors, sparsegpt_prune


def correlated_inputs(rng: np.random.Generator, samples: int, k: int) -> np.ndarray:
    """X = Z·A with a random mixing A of decaying spectrum and uneven column scales: correlated inputs."""
    mix = rng.standard_normal((k, k)) * np.geomspace(1.0, 0.05, k)[:, None]
    return (rng.standard_normal((samples, k)) @ mix) * rng.uniform(0.2, 3.0, k)


def direct_error(w: np.ndarray, pruned: np.ndarray, x: np.ndarray) -> float:
    """||W Xᵀ − Ŵ Xᵀ|| / ||W Xᵀ|| from the data itself, not the Gram matrix."""
    w, pruned = w.astype(np.float64), pruned.astype(np.float64)
    return float(np.linalg.norm((w - pruned) @ x.T) / np.linalg.norm(w @ x.T))


def reference_fasterprune(w, gram, count, sparsity=0.0, n=0, m=0, block=128, percdamp=0.01):
    """Literal port of IST-DASLab/sparsegpt fasterprune (rows × K layout, chol → inv → chol)."""
    w = w.astype(np.float64).copy()
    h = gram / count
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h[np.diag_indices_from(h)] += percdamp * np.mean(np.diag(h))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    prune = np.zeros(w.shape, dtype=bool)
    for i1 in range(0, w.shape[1], block):
        i2 = min(i1 + block, w.shape[1])
        w1, h1 = w[:, i1:i2].copy(), hinv[i1:i2, i1:i2]
        q1, err1 = np.zeros_like(w1), np.zeros_like(w1)
        d = np.diag(h1)
        if n == 0:
            p1 = ~unstructured_mask(w1**2 / d**2, sparsity, "layer", output_axis=0, reduction_axis=1)
        else:
            p1 = np.zeros(w1.shape, dtype=bool)
        for i in range(i2 - i1):
            if n and i % m == 0:
                p1[:, i : i + m] = ~nm_mask(w1[:, i : i + m] ** 2 / d[i : i + m] ** 2, n, m, axis=1)
            q = np.where(p1[:, i], 0.0, w1[:, i])
            q1[:, i] = q
            err1[:, i] = (w1[:, i] - q) / d[i]
            w1[:, i:] -= np.outer(err1[:, i], h1[i, i:])
        w[:, i1:i2] = q1
        prune[:, i1:i2] = p1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w, ~prune


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(7)
    x = correlated_inputs(rng, 1024, 64)
    w = rng.standard_normal((24, 64)).astype(np.float32)
    return w, x, x.T @ x


@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"n": 2, "m": 4}])
@pytest.mark.parametrize("block", [16, 128])
def test_matches_reference_implementation(layer, pattern, block):
    w, x, gram = layer
    got = sparsegpt_prune(w, gram, len(x), block_size=block, **pattern)
    n = pattern.get("m", 0) - pattern.get("n", 0)
    ref_w, ref_keep = reference_fasterprune(w, gram, len(x), pattern.get("sparsity", 0.0), n,
                                            pattern.get("m", 0), block)
    np.testing.assert_array_equal(got.keep, ref_keep)
    np.testing.assert_allclose(got.weight, ref_w.astype(np.float32), rtol=1e-5, atol=1e-6)


def test_nm_invariant_and_exact_block_counts(layer):
    w, x, gram = layer
    r = sparsegpt_prune(w, gram, len(x), n=2, m=4, block_size=32)
    assert (r.keep.reshape(24, 16, 4).sum(axis=2) == 2).all()
    assert satisfies_nm(r.weight, 2, 4, axis=1)
    r = sparsegpt_prune(w, gram, len(x), sparsity=0.3, block_size=24)  # blocks of 24, 24, 16 columns
    for lo, hi in [(0, 24), (24, 48), (48, 64)]:
        assert (~r.keep[:, lo:hi]).sum() == round(0.3 * 24 * (hi - lo))


@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"n": 2, "m": 4}])
def test_beats_magnitude_and_wanda(layer, pattern):
    w, x, gram = layer
    r = sparsegpt_prune(w, gram, len(x), **pattern)
    norms = np.linalg.norm(x, axis=0)
    errors = {}
    for name, scores in [("magnitude", np.abs(w)), ("wanda", np.abs(w) * norms)]:
        if "n" in pattern:
            keep = nm_mask(scores, 2, 4, axis=1)
        else:
            keep = unstructured_mask(scores, 0.5, "output", output_axis=0, reduction_axis=1)
        errors[name] = direct_error(w, np.where(keep, w, 0), x)
    after = direct_error(w, r.weight, x)
    assert after < errors["wanda"] < errors["magnitude"]
    assert after < 0.9 * errors["wanda"]  # a real gain, not a rounding one
    assert r.error_after == pytest.approx(after, rel=1e-6)
    assert r.error_before == pytest.approx(direct_error(w, np.where(r.keep, w, 0), x), rel=1e-6)
    assert r.error_after < r.error_before


def test_identity_gram_gives_magnitude_nm_mask():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((10, 32))
    r = sparsegpt_prune(w, np.eye(32) * 50.0, 50, n=2, m=4, block_size=32)
    np.testing.assert_array_equal(r.keep, nm_mask(np.abs(w), 2, 4, axis=1))
    np.testing.assert_allclose(r.weight, np.where(r.keep, w, 0.0), rtol=1e-12)  # no update: H diagonal


def test_dead_inputs_are_zeroed(layer):
    w, x, _ = layer
    x = x.copy()
    x[:, [5, 40]] = 0.0
    for pattern in ({"sparsity": 0.25}, {"n": 3, "m": 4}):
        r = sparsegpt_prune(w, x.T @ x, len(x), **pattern)
        assert (r.weight[:, [5, 40]] == 0).all()
        assert np.isfinite(r.weight).all()
        assert r.error_after == pytest.approx(direct_error(w, r.weight, x), rel=1e-6)


def test_dtype_and_positive_zero(layer):
    w, x, gram = layer
    for pattern in ({"sparsity": 0.6}, {"n": 1, "m": 4}):
        r = sparsegpt_prune(-np.abs(w), gram, len(x), **pattern)  # all negative: -0.0 would show
        assert r.weight.dtype == np.float32 and r.weight.shape == w.shape
        pruned = r.weight[~r.keep]
        assert pruned.size and not np.signbit(pruned).any() and (pruned == 0).all()
        assert not np.array_equal(r.weight[r.keep], -np.abs(w)[r.keep])  # kept weights were updated


def test_edge_cases(layer):
    w, x, gram = layer
    with pytest.raises(ValueError, match=r"K = 64.*m = 6"):
        sparsegpt_prune(w, gram, len(x), n=2, m=6)
    r = sparsegpt_prune(w, gram, len(x), sparsity=0.0)
    assert r.keep.all() and np.array_equal(r.weight, w) and r.weight is not w
    zero = sparsegpt_prune(w, np.zeros_like(gram), 10, sparsity=0.5)  # all inputs dead: H = I
    assert (zero.weight == 0).all() and zero.error_after == 0.0
    rank1 = np.outer(x[0], x[0])  # singular; with percdamp 0 the damping must be raised
    r = sparsegpt_prune(w, rank1, 1, sparsity=0.5, percdamp=0.0)
    assert r.damp > 0 and np.isfinite(r.weight).all()
    with pytest.raises(ValueError, match="negative diagonal"):
        sparsegpt_prune(w, -np.eye(64), 1, sparsity=0.5)
    indefinite = np.eye(64) + np.diag(np.full(63, 50.0), 1) + np.diag(np.full(63, 50.0), -1)
    with pytest.raises(ValueError, match="not positive definite"):
        sparsegpt_prune(w, indefinite, 1, sparsity=0.5)
    with pytest.raises(ValueError, match="sparsity or n and m"):
        sparsegpt_prune(w, gram, len(x))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 8),
    groups=st.integers(1, 8),
    sparsity=st.floats(0.0, 0.9),
    nm=st.sampled_from([None, (2, 4), (1, 4), (3, 4)]),
    block=st.sampled_from([4, 8, 128]),
    seed=st.integers(0, 2**31 - 1),
)
def test_invariants_random_shapes(rows, groups, sparsity, nm, block, seed):
    rng = np.random.default_rng(seed)
    k = 4 * groups
    x = correlated_inputs(rng, 3 * k, k)
    w = rng.standard_normal((rows, k)).astype(np.float32)
    pattern = {"sparsity": sparsity} if nm is None else {"n": nm[0], "m": nm[1]}
    r = sparsegpt_prune(w, x.T @ x, len(x), block_size=block, **pattern)
    assert r.weight.dtype == np.float32 and np.isfinite(r.weight).all()
    assert (r.weight[~r.keep] == 0).all() and not np.signbit(r.weight[~r.keep]).any()
    if nm is None:
        for lo in range(0, k, block):
            hi = min(lo + block, k)
            assert (~r.keep[:, lo:hi]).sum() == round(sparsity * rows * (hi - lo))
    else:
        assert (r.keep.reshape(rows, groups, 4).sum(axis=2) == nm[0]).all()
    assert r.error_after == pytest.approx(direct_error(w, r.weight, x), rel=1e-6, abs=1e-12)
    assert r.error_after == pytest.approx(relative_errors(w, x.T @ x, r.weight)[0], rel=1e-9, abs=1e-12)


@settings(max_examples=80, deadline=None)
@given(size=st.integers(1, 60), sparsity=st.floats(0.0, 1.0), ties=st.booleans(), seed=st.integers(0, 2**31))
def test_fast_selection_equals_masks_module(size, sparsity, ties, seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, (3, size)).astype(float) if ties else rng.random((3, size))
    expected = ~unstructured_mask(scores, sparsity, "layer", output_axis=0, reduction_axis=1)
    np.testing.assert_array_equal(_lowest_removed(scores, sparsity), expected)
