"""The OBS sweep of SparseGPT: prune Wᵀ column by column, pushing each error onto the later columns.

Follows `fasterprune` of IST-DASLab/sparsegpt, blocked: see _obs_block. All float64; the time goes to the
trailing matrix products and the per-group array operations, in about equal parts (MiniLM 2:4).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

GROUP = 16  # columns per sequential group when the mask is chosen per block (unstructured)
SUB = 32  # columns per sub-block: groups update their sub-block, sub-blocks the rest of the block


def obs_sweep(wt: np.ndarray, hinv: np.ndarray, block_size: int, sparsity: float | None,
              nm: tuple[int, int] | None) -> np.ndarray:
    """Prune Wᵀ [K, rows] in place column by column, block by block, against the upper factor hinv [K, K]
    of (H + λI)⁻¹; returns the removed mask [K, rows]."""
    k, rows = wt.shape
    prune = np.zeros((k, rows), dtype=bool)  # transposed like wt
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2].copy()
        err1 = _obs_block(w1, hinv[i1:i2, i1:i2], prune[i1:i2], sparsity, nm)
        wt[i1:i2] = w1
        if i2 < k:  # the block's error, carried to every later column at once
            wt[i2:] -= hinv[i1:i2, i2:].T @ err1
    return prune


def obs_sweep_factored(wt: np.ndarray, low: np.ndarray, block_size: int, sparsity: float | None,
                       nm: tuple[int, int] | None) -> tuple[np.ndarray, bool]:
    """obs_sweep from the Cholesky factor itself, without inverting it: (removed mask, all finite).

    With V = P L P (upper, H + λI = V Vᵀ) the sweep's factor is U = V⁻¹. The errors E_a of the blocks
    before block b reach it as Σ E_a U_ab = −S_b U_bb, with S_b = Σ_{a<b} Y_a V_ab and Y_a = (E_a − S_a) U_aa
    (from Y = E U, so Y V = E): only U's diagonal blocks are inverted. That saves K³/3 flops of the full
    inverse for 4·rows·block·K more in products: the cheaper way when 12·rows·block < K² (a down-projection
    of few rows, or any large K). Equal to obs_sweep up to rounding.
    """
    k, rows = wt.shape
    v = low[::-1, ::-1]
    prune = np.zeros((k, rows), dtype=bool)
    st = np.zeros_like(wt)  # Sᵀ: what the finished blocks owe each later column, in V's basis
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        ub, info = scipy.linalg.lapack.dtrtri(np.asfortranarray(v[i1:i2, i1:i2]), lower=0)
        if info != 0 or not np.isfinite(ub).all():
            return prune, False
        w1 = wt[i1:i2] + ub.T @ st[i1:i2] if i1 else wt[i1:i2].copy()
        err1 = _obs_block(w1, np.ascontiguousarray(ub), prune[i1:i2], sparsity, nm)
        wt[i1:i2] = w1
        if i2 < k:
            st[i2:] += v[i1:i2, i2:].T @ (ub.T @ (err1 - st[i1:i2]))
    return prune, bool(np.isfinite(wt).all())


def _obs_block(w1: np.ndarray, hinv1: np.ndarray, p1: np.ndarray, sparsity: float | None,
               nm: tuple[int, int] | None) -> np.ndarray:
    """One block: choose its mask (all at once, or per N:M group), update w1 in place; the errors.

    Columns go in groups (an N:M group, or GROUP columns when the mask is chosen per block): inside a
    group each column's error updates only the group's later columns (small, sequential), then the
    group's errors reach the later columns of its sub-block (SUB columns) in one matrix product, and a
    sub-block's errors the rest of the block in one wider product (BLAS-3): the same result as pushing
    each column's error on at once, in fewer, larger products."""
    d = np.diag(hinv1)
    d2 = (d**2)[:, None]
    if nm is None:
        p1[:] = _lowest_removed((w1**2 / d2).T, sparsity).T  # ranked in row-major [rows, block] order
    err1 = np.zeros_like(w1)
    step = nm[1] if nm is not None else GROUP
    sub = step * max(1, SUB // step)
    for s0 in range(0, len(w1), sub):
        s1 = min(s0 + sub, len(w1))
        for g in range(s0, s1, step):
            e = min(g + step, s1)
            if nm is not None:
                _nm_removed(w1[g:e] ** 2 / d2[g:e], nm[0], out=p1[g:e])
            for i in range(g, e):
                # (w - q)/d with q = w·(1 - mask); err1 starts at zero where nothing is removed
                np.divide(w1[i], d[i], out=err1[i], where=p1[i])
                if i + 1 < e:
                    w1[i + 1:e] -= hinv1[i, i + 1:e, None] * err1[i]
            if e < s1:
                w1[e:s1] -= hinv1[g:e, e:s1].T @ err1[g:e]
        if s1 < len(w1):  # the sub-block's errors reach the rest of the block in one wider product
            w1[s1:] -= hinv1[s0:s1, s1:].T @ err1[s0:s1]
    w1[p1] = 0.0
    return err1


def _nm_removed(scores: np.ndarray, n: int, out: np.ndarray) -> None:
    """For one N:M group [m, rows]: True where a member has n others beating it (masks.nm_mask's rule:
    higher wins, the earlier on a tie), in a few whole-group comparisons instead of nm_mask's general
    chunked ranking: it runs once per group of every layer (about 40% fewer array operations)."""
    later, earlier = scores[None, :, :], scores[:, None, :]
    beats = later > earlier  # [i, j, :]: member j beats member i
    beats |= _EARLIER[len(scores)] & (later == earlier)
    np.greater_equal(beats.sum(axis=1, dtype=np.uint8), n, out=out)


class _Earlier(dict):
    """_EARLIER[m][i, j, 0]: j < i (the earlier member wins a tie), made once per m."""

    def __missing__(self, m: int) -> np.ndarray:
        self[m] = np.tril(np.ones((m, m), dtype=bool), -1)[:, :, None]
        return self[m]


_EARLIER = _Earlier()


def _lowest_removed(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """True for the round(sparsity·size) lowest scores; on ties the earlier (row-major) goes first.

    Same selection as masks.unstructured_mask(group="layer") but O(size) instead of a full sort.
    """
    flat = scores.ravel()
    k = int(round(sparsity * flat.size))
    if k <= 0:
        return np.zeros(scores.shape, dtype=bool)
    if k >= flat.size:
        return np.ones(scores.shape, dtype=bool)
    thresh = np.partition(flat, k - 1)[k - 1]
    out = flat < thresh
    ties = np.flatnonzero(flat == thresh)
    out[ties[: k - int(out.sum())]] = True
    return out.reshape(scores.shape)
