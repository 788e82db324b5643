"""Keep-masks from scores: N:M along the reduction axis, and unstructured by comparison group.

Pure numpy. A mask is a bool array shaped like the scores; True means keep.
Ties are broken by position (earlier wins) so masks are deterministic and exact in count.
"""

from __future__ import annotations

import math

import numpy as np

from sparsec.core.options import GROUPS

_CHUNK_ELEMENTS = 1 << 18  # keeps the comparison temporaries in cache


def nm_mask(scores: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Keep the n highest scores in every m consecutive elements along `axis`.

    This is TensorRT's layout when `axis` is the reduction axis: for a Conv weight
    [K, C, R, S] the groups run along C for each (k, r, s).
    """
    shape = scores.shape
    if shape[axis] % m:
        raise ValueError(f"axis {axis} of length {shape[axis]} is not divisible by {m}")
    pre = math.prod(shape[:axis]) * (shape[axis] // m)
    post = math.prod(shape[axis + 1 :])
    s = np.ascontiguousarray(_nan_as_inf(scores)).reshape(pre, m, post)
    keep = np.empty(s.shape, dtype=bool)
    step = max(1, _CHUNK_ELEMENTS // (m * post))
    for lo in range(0, pre, step):
        keep[lo : lo + step] = _nm_block(s[lo : lo + step], n, m)
    return keep.reshape(shape)


class NonFinite(ValueError):
    """`nm_prune(finite=True)` met a NaN or ±Inf: the caller leaves the weight dense
    (`non_finite_reason` counts them; this rare path reads the weight again)."""


def nm_prune(values: np.ndarray, n: int, m: int, axis: int, scores: np.ndarray | None = None,
             finite: bool = False) -> tuple[np.ndarray, int, int]:
    """N:M-prune `values` in one cache-friendly sweep: (pruned copy, non-zeros before, after).

    Scores default to |values|, computed chunk by chunk with the mask and its application, so
    each byte of a large weight is read from memory once. With `finite` (magnitude scores only),
    the chunk's max |value|, which the sweep computes anyway, is also the NaN/±Inf check: raise
    NonFinite instead of a separate read of the whole weight.
    """
    shape = values.shape
    if shape[axis] % m:
        raise ValueError(f"axis {axis} of length {shape[axis]} is not divisible by {m}")
    pre = math.prod(shape[:axis]) * (shape[axis] // m)
    post = math.prod(shape[axis + 1 :])
    v = np.ascontiguousarray(values).reshape(pre, m, post)
    s = None if scores is None else np.ascontiguousarray(_nan_as_inf(scores)).reshape(pre, m, post)
    out = np.empty_like(v)
    bits = np.dtype(f"u{v.dtype.itemsize}")
    before = after = 0
    step = max(1, _CHUNK_ELEMENTS // (m * post))
    for lo in range(0, pre, step):
        chunk = v[lo : lo + step]
        if s is not None:
            score = s[lo : lo + step]
        else:
            score = _finite_or_raise(np.abs(chunk)) if finite else _nan_as_inf(np.abs(chunk))
        keep = _nm_block(score, n, m)
        np.multiply(chunk.view(bits), keep, out=out[lo : lo + step].view(bits))
        nonzero = int(np.count_nonzero(chunk != 0))
        before += nonzero
        # no zero in the chunk: exactly n of every m are kept, all non-zero (saves a compare and count)
        kept = out[lo : lo + step]
        after += chunk.size // m * n if nonzero == chunk.size else int(np.count_nonzero(kept != 0))
    return out.reshape(shape), before, after


def _nm_block(s: np.ndarray, n: int, m: int) -> np.ndarray:
    # rank[i] = how many members beat member i; one comparison settles each pair, and on a
    # tie the earlier member wins. A member is kept when fewer than n beat it.
    if s.shape[2] < 16:  # members m apart in memory: compare contiguous copies instead
        t = np.ascontiguousarray(s.transpose(1, 0, 2))
        ranks = np.zeros(t.shape, dtype=np.uint8)
        for i in range(m):
            for j in range(i + 1, m):
                later_wins = t[j] > t[i]
                ranks[i] += later_wins
                np.logical_not(later_wins, out=later_wins)
                ranks[j] += later_wins
        return (ranks < n).transpose(1, 0, 2)
    ranks = np.zeros(s.shape, dtype=np.uint8)
    for i in range(m):
        for j in range(i + 1, m):
            later_wins = s[:, j] > s[:, i]
            ranks[:, i] += later_wins
            np.logical_not(later_wins, out=later_wins)
            ranks[:, j] += later_wins
    return ranks < n


def unstructured_mask(
    scores: np.ndarray, sparsity: float, group: str, *, output_axis: int, reduction_axis: int
) -> np.ndarray:
    """Remove round(sparsity·size) lowest scores in each comparison group.

    group "output": each output channel's weights compete among themselves (Wanda's best);
    "input": each input channel's; "layer": the whole tensor.
    """
    if group not in GROUPS:
        raise ValueError(f"unknown comparison group {group!r}; choose one of {GROUPS}")
    scores = _nan_as_inf(scores)
    if group == "layer":
        return _lowest_k_removed(scores.reshape(1, -1), sparsity, 1).reshape(scores.shape)
    axis = output_axis if group == "output" else reduction_axis
    if axis == 0:  # groups are rows of a [A, rest] view: no copy
        return _lowest_k_removed(scores.reshape(scores.shape[0], -1), sparsity, 1).reshape(scores.shape)
    if axis == scores.ndim - 1:  # groups are columns of a [rest, A] view
        return _lowest_k_removed(scores.reshape(-1, scores.shape[-1]), sparsity, 0).reshape(scores.shape)
    moved = np.moveaxis(scores, axis, 0)
    keep = _lowest_k_removed(moved.reshape(moved.shape[0], -1), sparsity, 1).reshape(moved.shape)
    return np.moveaxis(keep, 0, axis)


def _lowest_k_removed(table: np.ndarray, sparsity: float, along: int) -> np.ndarray:
    """Remove the k lowest of every group running along axis `along` of a 2-D table.

    A partition finds each group's threshold in linear time. Groups where ties at the
    threshold would remove more than k are redone with a stable sort, so among equal scores
    the earlier ones go first (the same result as a stable argsort everywhere).
    """
    size = table.shape[along]
    k = int(round(sparsity * size))
    if k <= 0:
        return np.ones(table.shape, dtype=bool)
    if k >= size:
        return np.zeros(table.shape, dtype=bool)
    keep = table > _kth_smallest(table, k, along)
    removed = size - keep.sum(axis=along)
    for g in np.flatnonzero(removed != k):
        line = table[g] if along == 1 else table[:, g]
        fixed = np.ones(size, dtype=bool)
        fixed[np.argsort(line, kind="stable")[:k]] = False
        if along == 1:
            keep[g] = fixed
        else:
            keep[:, g] = fixed
    return keep


def _kth_smallest(table: np.ndarray, k: int, along: int) -> np.ndarray:
    """Each group's k-th smallest score, shaped to broadcast against the table."""
    if along == 1:
        return np.partition(table, k - 1, axis=1)[:, k - 1 : k]
    # columns: partition cache-sized transposed blocks instead of strided columns
    out = np.empty((1, table.shape[1]), dtype=table.dtype)
    for j in range(0, table.shape[1], 256):
        block = np.ascontiguousarray(table[:, j : j + 256].T)
        out[0, j : j + 256] = np.partition(block, k - 1, axis=1)[:, k - 1]
    return out


def apply_mask(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """A copy with removed weights set to +0.0 and kept ones bit for bit (-0.0 and NaN too).

    Multiplying the integer view by the mask is exact and as fast as a float multiply;
    a float multiply would turn removed negatives into -0.0.
    """
    bits = np.dtype(f"u{values.dtype.itemsize}")
    out = np.empty(values.shape, dtype=values.dtype)
    np.multiply(np.ascontiguousarray(values).view(bits), np.ascontiguousarray(keep),
                out=out.view(bits))
    return out


def count_nonzero(values: np.ndarray, zero: np.ndarray | None = None) -> int:
    """Non-zeros, with -0.0 counted as zero (a compare is 2× faster than numpy's float count).

    `zero` (broadcastable) is what counts as zero instead of 0: a QDQ weight's zero point.
    """
    return int(np.count_nonzero(values != (0 if zero is None else zero)))


def satisfies_nm(weight: np.ndarray, n: int, m: int, axis: int, zero: np.ndarray | None = None) -> bool:
    """True when every m consecutive weights along `axis` hold at most n non-zeros
    (values other than `zero`, broadcastable, when given: a QDQ weight's zero point)."""
    shape = weight.shape
    if shape[axis] % m:
        return False
    pre = math.prod(shape[:axis]) * (shape[axis] // m)
    post = math.prod(shape[axis + 1 :])
    nonzero = np.ascontiguousarray(weight != (0 if zero is None else zero)).reshape(pre, m, post)
    return bool((nonzero.sum(axis=1) <= n).all())


def _nan_as_inf(scores: np.ndarray) -> np.ndarray:
    # a NaN weight is never silently zeroed: it ranks highest and stays (max propagates NaN)
    if scores.size and np.issubdtype(scores.dtype, np.floating) and np.isnan(scores.max()):
        return np.where(np.isnan(scores), np.inf, scores)
    return scores


def _finite_or_raise(magnitudes: np.ndarray) -> np.ndarray:
    if magnitudes.size and np.issubdtype(magnitudes.dtype, np.floating) \
            and not math.isfinite(float(magnitudes.max())):  # max propagates NaN; |-Inf| is +Inf
        raise NonFinite
    return magnitudes


def non_finite_reason(values: np.ndarray) -> str | None:
    """Why a weight with NaN or ±Inf is left dense: no score ranks such a value, and zeroing it
    would hide a broken model behind a working-looking one. One float64 sum finds them."""
    if values.dtype.kind != "f" or math.isfinite(float(np.sum(values, dtype=np.float64))):
        return None
    nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
    if nan == 0 and inf == 0:
        return None  # finite values whose sum overflowed
    return f"weight holds {nan} NaN and {inf} ±Inf values: left dense (fix the model's weights)"
