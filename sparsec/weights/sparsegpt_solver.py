"""SparseGPT (Frantar & Alistarh 2023) on one weight matrix, given its inputs' Gram matrix.

Follows `fasterprune` of IST-DASLab/sparsegpt: Hinv is the upper Cholesky factor of H⁻¹, columns
are pruned left to right in blocks, and each pruned column's error is pushed onto the columns
to its right (OBS), eagerly inside the block and as one matrix product after it. Pure numpy/scipy.

Everything runs in float64. float32 was measured on MiniLM shapes ((384, 1536), (1536, 384), one
core): same masks, weights within 7e-7 of max|W|, and only ~5-10% faster (within run-to-run noise),
because the time goes to the float64 Cholesky, the float64 error metrics and the per-column loop.

A solve runs with one BLAS thread (threadpoolctl, when installed): its calls are small (K ≤ a few
thousand, blocks of 4-128 columns), and numpy's and scipy's two OpenBLAS pools, each spinning while
the other works, made a 384×384 Cholesky take 0.76 s instead of 1.3 ms on a loaded 2-core machine
(MiniLM 2:4 solve 26 s -> 6.5 s). Layers run in parallel through --workers instead.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import scipy.linalg

try:
    from threadpoolctl import ThreadpoolController
except ImportError:  # optional: without it BLAS keeps its own thread count
    ThreadpoolController = None

from sparsec.weights.masks import apply_mask, nm_mask

_DAMP_RETRIES = 3  # each retry multiplies the damping by 10
_COMPUTE = np.float64  # float32 works too; see the module docstring
GROUP = 16  # columns per sequential group when the mask is chosen per block (unstructured)
SUB = 32  # columns per sub-block: groups update their sub-block, sub-blocks the rest of the block
SOLVE_THREADS = 1  # BLAS threads inside one solve; see the module docstring
_controller = None  # threadpoolctl's view of the loaded BLAS libraries, made on first use


def _blas_threads(limit: int):
    """A context limiting every loaded BLAS (numpy's and scipy's) to `limit` threads, if it can."""
    global _controller
    if ThreadpoolController is None:
        return contextlib.nullcontext()
    if _controller is None:
        _controller = ThreadpoolController()
    return _controller.limit(limits=limit, user_api="blas")


@dataclass(frozen=True)
class SparseGPTResult:
    """Pruned weight plus what the caller reports: the mask, errors with and without update, λ."""

    weight: np.ndarray  # updated weight, same shape/dtype as input, pruned entries exactly +0.0
    keep: np.ndarray  # bool mask, True = kept
    error_before: float  # sqrt(tr(ΔW G ΔWᵀ)/tr(W G Wᵀ)) for plain masking with the same mask
    error_after: float  # the same for the updated weight
    damp: float  # λ actually added to diag(H)


def sparsegpt_prune(
    weight: np.ndarray,
    gram: np.ndarray,
    count: int,
    *,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    block_size: int = 128,
    percdamp: float = 0.01,
) -> SparseGPTResult:
    """Prune `weight` [rows, K] to `sparsity` (per block) or n:m along K, updating kept weights.

    `gram` is XᵀX summed over `count` input rows. H = gram/count; dead inputs (H_jj == 0) get
    H_jj = 1 and their weight column zeroed (they never reach the output); λ = percdamp·mean(diag H).
    If H + λI is still not positive definite (numerically), λ is multiplied by 10 up to
    3 times before a ValueError; `damp` reports the λ used. Nothing to prune returns W as is.
    """
    nm = _check_args(weight, gram, count, sparsity, n, m, block_size, percdamp)
    if (nm and n == m) or (not nm and sparsity == 0):
        # nothing to prune: the update would be a no-op, so return the weights untouched
        return SparseGPTResult(weight.copy(), np.ones(weight.shape, dtype=bool), 0.0, 0.0, 0.0)

    with _blas_threads(SOLVE_THREADS):
        h = gram.astype(np.float64) / count
        dead = np.diag(h) == 0
        h[dead, dead] = 1.0
        # work on Wᵀ [K, rows] so that a column of W is a contiguous row
        wt = weight.astype(_COMPUTE).T.copy()
        wt[dead] = 0.0
        hinv, damp, low = _hinv_upper(h, percdamp * float(np.mean(np.diag(h))))
        prune = _obs_sweep(wt, hinv.astype(_COMPUTE, copy=False), block_size, sparsity,
                           (n, m) if nm else None)
        keep = ~prune.T
        new = apply_mask(wt.T.astype(weight.dtype), keep)  # +0.0 for pruned, even after the cast
        # the errors of the weights as written (after the cast): the sweep's own ‖E‖² is the error of
        # the float64 weights, which differs from it by the rounding, more than 1e-6 relative on small
        # errors; measured with the Cholesky factor already made (half the cost of a product with G)
        before, after = _factor_errors(weight, low, damp, dead, apply_mask(weight, keep), new)
    return SparseGPTResult(weight=new, keep=keep, error_before=before, error_after=after, damp=damp)


def _obs_sweep(wt: np.ndarray, hinv: np.ndarray, block_size: int, sparsity: float | None,
               nm: tuple[int, int] | None) -> np.ndarray:
    """Prune Wᵀ [K, rows] in place column by column, block by block; returns the removed mask [K, rows]."""
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


def _obs_block(w1: np.ndarray, hinv1: np.ndarray, p1: np.ndarray, sparsity: float | None,
               nm: tuple[int, int] | None) -> np.ndarray:
    """One block: choose its mask (all at once, or per N:M group), update w1 in place; the errors.

    Columns go in groups (an N:M group, or GROUP columns when the mask is chosen per block): inside a
    group each column's error updates only the group's later columns (small, sequential), then the
    group's errors reach the later columns of its sub-block (SUB columns) in one matrix product, and a
    sub-block's errors the rest of the block in one wider product (BLAS-3): the same result as pushing
    each column's error on at once, in fewer, larger products."""
    d = np.diag(hinv1)
    if nm is None:
        scores = w1**2 / (d**2)[:, None]
        p1[:] = _lowest_removed(scores.T, sparsity).T  # ranked in row-major [rows, block] order
    err1 = np.zeros_like(w1)
    step = nm[1] if nm is not None else GROUP
    sub = step * max(1, SUB // step)
    for s0 in range(0, len(w1), sub):
        s1 = min(s0 + sub, len(w1))
        for g in range(s0, s1, step):
            e = min(g + step, s1)
            if nm is not None:
                s = w1[g:e] ** 2 / (d[g:e] ** 2)[:, None]
                p1[g:e] = ~nm_mask(s, nm[0], nm[1], axis=0)
            for i in range(g, e):
                err = np.where(p1[i], w1[i] / d[i], 0.0)  # (w - q)/d with q = w·(1 - mask)
                err1[i] = err
                if i + 1 < e:
                    w1[i + 1:e] -= hinv1[i, i + 1:e, None] * err
            if e < s1:
                w1[e:s1] -= hinv1[g:e, e:s1].T @ err1[g:e]
        if s1 < len(w1):  # the sub-block's errors reach the rest of the block in one wider product
            w1[s1:] -= hinv1[s0:s1, s1:].T @ err1[s0:s1]
    w1[p1] = 0.0
    return err1


def relative_errors(weight: np.ndarray, gram: np.ndarray, *pruned: np.ndarray) -> tuple[float, ...]:
    """sqrt(tr(ΔW G ΔWᵀ) / tr(W G Wᵀ)) = ||(W − Ŵ)Xᵀ|| / ||W Xᵀ|| for each Ŵ, without needing X.

    One product with G for W and all the ΔW together: these products dominate the cost.
    """
    w = weight.astype(np.float64)
    stacked = np.concatenate([w] + [w - p.astype(np.float64) for p in pruned])
    quad = np.einsum("ij,ij->i", stacked @ gram, stacked).reshape(len(pruned) + 1, -1).sum(axis=1)
    if quad[0] <= 0.0:
        return (0.0,) * len(pruned)
    return tuple(float(np.sqrt(max(q, 0.0) / quad[0])) for q in quad[1:])


def _factor_errors(weight: np.ndarray, low: np.ndarray, lam: float, dead: np.ndarray,
                   *pruned: np.ndarray) -> tuple[float, ...]:
    """relative_errors from the solve's own factor: P (H + λI) P = L Lᵀ, so with H = G/count
    tr(ΔW H ΔWᵀ) = ‖ΔW P L‖² − λ‖ΔW‖² − Σ dead columns² (their diagonal was set to 1).

    One triangular product (BLAS trmm, half a general product's work) for W and every ΔW together.
    """
    w = weight.astype(np.float64)
    stacked = np.concatenate([w] + [w - p.astype(np.float64) for p in pruned])
    sq = np.einsum("ij,ij->i", stacked, stacked)
    dead_sq = np.einsum("ij,ij->i", stacked[:, dead], stacked[:, dead]) if dead.any() else 0.0
    prod = scipy.linalg.blas.dtrmm(1.0, low, np.asfortranarray(stacked[:, ::-1]), side=1, lower=1,
                                   overwrite_b=1)
    quad = (np.einsum("ij,ij->i", prod, prod) - lam * sq - dead_sq).reshape(len(pruned) + 1, -1).sum(axis=1)
    if quad[0] <= 0.0:
        return (0.0,) * len(pruned)
    return tuple(float(np.sqrt(max(q, 0.0) / quad[0])) for q in quad[1:])


def _hinv_upper(h: np.ndarray, damp: float) -> tuple[np.ndarray, float, np.ndarray]:
    """Upper U with UᵀU = (H + λI)⁻¹, raising λ when H + λI is not numerically positive definite;
    also λ and the lower Cholesky factor L of P (H + λI) P (P reverses the index order).

    Reversing the index order turns the reference's chol → inverse → chol into one Cholesky and
    one triangular inverse: if P H P = L Lᵀ then H⁻¹ = (P L⁻¹ P)ᵀ (P L⁻¹ P) and P L⁻¹ P is upper.
    """
    base = np.diag(h).copy()
    step = damp if damp > 0 else 1e-8 * float(np.mean(base))
    lam = damp
    for attempt in range(_DAMP_RETRIES + 1):
        lam = damp if attempt == 0 else step * 10.0**attempt
        a = h[::-1, ::-1].copy()  # C-ordered and symmetric, so a.T is the same matrix in Fortran order
        a[np.diag_indices_from(a)] = base[::-1] + lam
        low, info = scipy.linalg.lapack.dpotrf(a.T, lower=1, overwrite_a=1, clean=1)
        if info != 0:
            continue
        inv, info = scipy.linalg.lapack.dtrtri(low, lower=1, overwrite_c=0)
        if info == 0 and np.all(np.isfinite(inv)):
            return np.ascontiguousarray(inv[::-1, ::-1]), lam, low
    raise ValueError(
        f"H + λI is not positive definite even with λ = {lam:.3g} (damping raised 10x, "
        f"{_DAMP_RETRIES} times); is the Gram matrix symmetric positive semi-definite?"
    )


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


def _check_args(
    weight: np.ndarray,
    gram: np.ndarray,
    count: int,
    sparsity: float | None,
    n: int | None,
    m: int | None,
    block_size: int,
    percdamp: float,
) -> bool:
    """Validate inputs; returns True for N:M, False for unstructured."""
    if weight.ndim != 2 or not np.issubdtype(weight.dtype, np.floating):
        raise ValueError(f"weight must be a 2-D float matrix [rows, K], got {weight.dtype} {weight.shape}")
    k = weight.shape[1]
    if gram.shape != (k, k):
        raise ValueError(f"gram must be [K, K] = [{k}, {k}], got {gram.shape}")
    if not (np.all(np.isfinite(gram)) and np.all(np.isfinite(weight))):
        raise ValueError("weight and gram must be finite for SparseGPT")
    if np.diag(gram).min(initial=0.0) < 0:
        raise ValueError("gram has a negative diagonal: it is not XᵀX (not positive semi-definite)")
    if count <= 0:
        raise ValueError(f"count must be positive, got {count}")
    if block_size <= 0 or percdamp < 0:
        raise ValueError(f"need block_size > 0 and percdamp >= 0, got {block_size}, {percdamp}")
    if (sparsity is None) == (n is None and m is None):
        raise ValueError("give either sparsity or n and m")
    if sparsity is not None:
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
        return False
    if n is None or m is None or not 0 <= n <= m or m < 1:
        raise ValueError(f"N:M needs 0 <= n <= m and m >= 1, got n={n}, m={m}")
    if k % m:
        raise ValueError(f"K = {k} (the reduction dimension) is not divisible by m = {m}")
    if block_size % m:
        raise ValueError(f"block_size {block_size} must be a multiple of m = {m} (groups within blocks)")
    return True
