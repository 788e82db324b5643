"""N:M and unstructured masks: invariants over random shapes, exact counts, reference masks."""

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsec.weights.masks import nm_mask, satisfies_nm, unstructured_mask


def reference_nm(scores: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Slow, obvious N:M: sort each group of m along axis, earlier wins ties."""
    moved = np.moveaxis(scores, axis, -1)
    keep = np.zeros(moved.shape, dtype=bool)
    for idx in np.ndindex(moved.shape[:-1]):
        row = moved[idx]
        for g in range(0, row.shape[0], m):
            order = np.argsort(-row[g:g + m], kind="stable")[:n]
            keep[idx + (g + order,)] = True
    return np.moveaxis(keep, -1, axis)


@st.composite
def nm_case(draw):
    n, m = draw(st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8)]))
    ndim = draw(st.integers(1, 4))
    axis = draw(st.integers(0, ndim - 1))
    shape = [draw(st.integers(1, 5)) for _ in range(ndim)]
    shape[axis] = m * draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if draw(st.booleans()):  # many ties: small integers
        scores = rng.integers(0, 3, shape).astype(np.float32)
    else:
        scores = np.abs(rng.standard_normal(shape)).astype(np.float32)
    return scores, n, m, axis


@settings(max_examples=150, deadline=None)
@given(nm_case())
def test_nm_mask_keeps_exactly_n_per_group_and_matches_reference(case):
    scores, n, m, axis = case
    keep = nm_mask(scores, n, m, axis)
    assert keep.shape == scores.shape
    groups = np.moveaxis(keep, axis, -1).reshape(-1, m)
    assert (groups.sum(axis=1) == n).all()
    np.testing.assert_array_equal(keep, reference_nm(scores, n, m, axis))
    pruned = np.where(keep, scores + 1.0, 0.0)
    assert satisfies_nm(pruned, n, m, axis)


def test_nm_mask_keeps_the_largest_and_handles_nan():
    w = np.array([[0.1, -5.0, 3.0, 0.2, np.nan, 0.0, 1.0, 2.0]], dtype=np.float32)
    keep = nm_mask(np.abs(w), 2, 4, axis=1)
    assert keep.tolist() == [[False, True, True, False, True, False, False, True]]


def test_nm_mask_rejects_indivisible_axis():
    try:
        nm_mask(np.ones((3, 6)), 2, 4, axis=1)
    except ValueError as exc:
        assert "not divisible by 4" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def test_satisfies_nm_detects_a_violation():
    w = np.array([[1.0, 1.0, 1.0, 0.0]], dtype=np.float32)
    assert not satisfies_nm(w, 2, 4, axis=1)
    assert satisfies_nm(w, 3, 4, axis=1)
    assert not satisfies_nm(np.ones((1, 6)), 2, 4, axis=1)


@settings(max_examples=100, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 40),
    sparsity=st.floats(0.0, 0.99),
    group=st.sampled_from(["output", "layer", "input"]),
    seed=st.integers(0, 1000),
)
def test_unstructured_mask_exact_ratio_per_group(rows, cols, sparsity, group, seed):
    scores = np.abs(np.random.default_rng(seed).standard_normal((rows, cols)))
    keep = unstructured_mask(scores, sparsity, group, output_axis=0, reduction_axis=1)
    if group == "layer":
        assert (~keep).sum() == int(round(sparsity * rows * cols))
    elif group == "output":
        assert ((~keep).sum(axis=1) == int(round(sparsity * cols))).all()
    else:
        assert ((~keep).sum(axis=0) == int(round(sparsity * rows))).all()
    if keep.any() and (~keep).any() and group == "layer":
        assert scores[keep].min() >= scores[~keep].max()


def test_unstructured_output_group_follows_the_output_axis():
    # MatMul weight [K, N]: outputs are columns, so each column loses the same count
    scores = np.abs(np.random.default_rng(0).standard_normal((8, 3)))
    keep = unstructured_mask(scores, 0.5, "output", output_axis=1, reduction_axis=0)
    assert ((~keep).sum(axis=0) == 4).all()
    for col in range(3):
        assert scores[keep[:, col], col].min() >= scores[~keep[:, col], col].max()


def test_unstructured_conv_input_group_spans_kernel_positions():
    scores = np.abs(np.random.default_rng(1).standard_normal((4, 6, 3, 3)))
    keep = unstructured_mask(scores, 0.25, "input", output_axis=0, reduction_axis=1)
    per_input = (~keep).sum(axis=(0, 2, 3))
    assert (per_input == round(0.25 * 4 * 9)).all()
    assert math.isclose((~keep).mean(), 9 / 36)


@settings(max_examples=80, deadline=None)
@given(nm_case())
def test_fused_nm_prune_equals_mask_then_apply(case):
    from sparsec.weights.masks import apply_mask, count_nonzero, nm_prune

    scores, n, m, axis = case
    rng = np.random.default_rng(int(scores.size))
    values = (scores * rng.choice([-1.0, 1.0], scores.shape)).astype(np.float32)
    pruned, before, after = nm_prune(values, n, m, axis)
    expected = apply_mask(values, nm_mask(np.abs(values), n, m, axis))
    assert (pruned.view(np.uint32) == expected.view(np.uint32)).all()  # bit for bit, +0.0 included
    assert (before, after) == (count_nonzero(values), count_nonzero(expected))


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 30), sparsity=st.floats(0.0, 0.99),
       seed=st.integers(0, 1000))
def test_unstructured_ties_match_stable_argsort(rows, cols, sparsity, seed):
    scores = np.random.default_rng(seed).integers(0, 4, (rows, cols)).astype(np.float32)
    keep = unstructured_mask(scores, sparsity, "output", output_axis=0, reduction_axis=1)
    k = int(round(sparsity * cols))
    expected = np.ones_like(keep)
    order = np.argsort(scores, axis=1, kind="stable")[:, :k]
    np.put_along_axis(expected, order, False, axis=1)
    np.testing.assert_array_equal(keep, expected)
