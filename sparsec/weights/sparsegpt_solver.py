"""SparseGPT (Frantar & Alistarh 2023) on one weight matrix, given its inputs' Gram matrix.

Follows `fasterprune` of IST-DASLab/sparsegpt: Hinv is the upper Cholesky factor of H⁻¹, columns
are pruned left to right in blocks, and each pruned column's error is pushed onto the columns
to its right (OBS), eagerly inside the block and as one matrix product after it. Pure numpy/scipy.

Everything runs in float64. float32 was measured on MiniLM shapes ((384, 1536), (1536, 384), one
core): same masks, weights within 7e-7 of max|W|, and only ~5-10% faster (within run-to-run noise),
because the time goes to the float64 Cholesky, the float64 error metrics and the per-column loop.
Weights reading one input (Q, K, V) share one factorisation and, with N:M, one sweep; a layer with few
rows against its K (a down-projection) sweeps on the Cholesky factor without inverting it
(obs_sweep_factored). MiniLM 2:4, same masks and weights bit for bit: solve 2.9 s -> 2.0 s (loaded machine).

A solve runs with one BLAS thread (threadpoolctl, when installed): its calls are small (K ≤ a few
thousand, blocks of 4-128 columns), and numpy's and scipy's two OpenBLAS pools, each spinning while
the other works, made a 384×384 Cholesky take 0.76 s instead of 1.3 ms on a loaded 2-core machine
(MiniLM 2:4 solve 26 s -> 6.5 s). Layers run in parallel through --workers instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg

try:
    from threadpoolctl import ThreadpoolController
except ImportError:  # optional: without it BLAS keeps its own thread count
    ThreadpoolController = None

from sparsec.weights.masks import apply_mask
from sparsec.weights.obs_sweep import obs_sweep, obs_sweep_factored

_DAMP_RETRIES = 3  # each retry multiplies the damping by 10
_COMPUTE = np.float64  # float32 works too; see the module docstring
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
    error_before: float | None  # sqrt(tr(ΔW G ΔWᵀ)/tr(W G Wᵀ)) for plain masking with the same mask
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
    error_before: bool = True,
) -> SparseGPTResult:
    """Prune `weight` [rows, K] to `sparsity` (per block) or n:m along K, updating kept weights.

    `gram` is XᵀX summed over `count` input rows. H = gram/count; dead inputs (H_jj == 0) get
    H_jj = 1 and their weight column zeroed (they never reach the output); λ = percdamp·mean(diag H).
    If H + λI is still not positive definite (numerically), λ is multiplied by 10 up to
    3 times before a ValueError; `damp` reports the λ used. Nothing to prune returns W as is.
    `error_before=False` skips plain masking's error (a third of the error products): it is then None.
    """
    return sparsegpt_prune_shared([weight], gram, count, sparsity=sparsity, n=n, m=m, block_size=block_size,
                                  percdamp=percdamp, error_before=error_before)[0]


def sparsegpt_prune_shared(
    weights: Sequence[np.ndarray],
    gram: np.ndarray,
    count: int,
    *,
    sparsity: float | Sequence[float | None] | None = None,
    n: int | None = None,
    m: int | None = None,
    block_size: int = 128,
    percdamp: float = 0.01,
    error_before: bool = True,
) -> list[SparseGPTResult]:
    """sparsegpt_prune for weights that multiply the same input (Q, K and V read one tensor).

    H + λI is factored once for all of them. With N:M every row chooses its own mask, so all their
    rows go through one sweep (fewer, larger array operations); an unstructured mask is chosen per
    block over a weight's rows, so each weight gets its own sweep. `sparsity` may be one per weight.
    Each result equals the weight's own sparsegpt_prune (tests/test_sparsegpt_shared.py).
    """
    ratios = list(sparsity) if isinstance(sparsity, Sequence) else [sparsity] * len(weights)
    if len(ratios) != len(weights):
        raise ValueError(f"{len(weights)} weights but {len(ratios)} sparsities")
    nm = [_check_args(w, gram, count, r, n, m, block_size, percdamp)
          for w, r in zip(weights, ratios, strict=True)]
    out: list = [None] * len(weights)
    for i, (w, r, is_nm) in enumerate(zip(weights, ratios, nm, strict=True)):
        if (is_nm and n == m) or (not is_nm and r == 0):
            # nothing to prune: the update would be a no-op, so return the weights untouched
            out[i] = SparseGPTResult(w.copy(), np.ones(w.shape, dtype=bool), 0.0, 0.0, 0.0)
    todo = [i for i in range(len(weights)) if out[i] is None]
    if not todo:
        return out
    sweeps = [todo] if nm[todo[0]] else [[i] for i in todo]
    rows = max(sum(weights[i].shape[0] for i in members) for members in sweeps)
    with _blas_threads(SOLVE_THREADS):
        # few rows against a large K: sweep on the Cholesky factor and skip its full inverse
        factored = 12 * rows * block_size < len(gram) ** 2
        hinv, damp, low, dead = _factor(gram, count, percdamp, invert=not factored)
        done = _sweeps(weights, sweeps, ratios, nm, (n, m), hinv, low, dead, block_size)
        if done is None:  # not finite without the full inverse: its check raises λ until it is
            hinv, damp, low, dead = _factor(gram, count, percdamp, invert=True)
            done = _sweeps(weights, sweeps, ratios, nm, (n, m), hinv, low, dead, block_size)
        for members, wt, prune in done:
            _unstack(out, weights, members, wt, prune)
        _finish(out, weights, todo, low, damp, dead, error_before)
    return out


def _sweeps(weights: Sequence[np.ndarray], sweeps: list[list[int]], ratios: list, nm: list[bool],
            pattern: tuple, hinv: np.ndarray | None, low: np.ndarray, dead: np.ndarray, block_size: int
            ) -> list[tuple[list[int], np.ndarray, np.ndarray]] | None:
    """(members, swept Wᵀ, removed mask) per sweep: on U, or on the Cholesky factor without U (None when
    that gave a non-finite weight)."""
    done = []
    for members in sweeps:
        ratio, nm_pattern = ratios[members[0]], pattern if nm[members[0]] else None
        # work on Wᵀ [K, rows] so that a column of W is a contiguous row; N:M stacks the members' rows
        wt = np.concatenate([weights[i].T for i in members], axis=1, dtype=_COMPUTE)
        wt[dead] = 0.0
        if hinv is not None:
            done.append((members, wt, obs_sweep(wt, hinv, block_size, ratio, nm_pattern)))
            continue
        prune, finite = obs_sweep_factored(wt, low, block_size, ratio, nm_pattern)
        if not finite:
            return None
        done.append((members, wt, prune))
    return done


def _factor(gram: np.ndarray, count: int, percdamp: float, invert: bool = True
            ) -> tuple[np.ndarray | None, float, np.ndarray, np.ndarray]:
    """(upper factor of (H + λI)⁻¹ or None without `invert`, λ, lower Cholesky factor of the reversed
    H + λI, dead inputs)."""
    h = np.divide(gram, count, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    hinv, damp, low = _hinv_upper(h, percdamp * float(np.mean(np.diag(h))), invert)
    return hinv, damp, low, dead


def _unstack(out: list, weights: Sequence[np.ndarray], members: list[int], wt: np.ndarray,
             prune: np.ndarray) -> None:
    """Each member's (new weight, keep) from its columns of the swept Wᵀ."""
    start = 0
    for i in members:
        stop = start + weights[i].shape[0]
        keep = np.ascontiguousarray(~prune[:, start:stop].T)
        out[i] = (apply_mask(wt[:, start:stop].T.astype(weights[i].dtype), keep), keep)  # +0.0 when pruned
        start = stop


def _finish(out: list, weights: Sequence[np.ndarray], todo: list[int], low: np.ndarray, damp: float,
            dead: np.ndarray, error_before: bool) -> None:
    """The solved members' results with their errors.

    The errors of the weights as written (after the cast): the sweep's own ‖E‖² is the error of the
    float64 weights, which differs from it by the rounding, more than 1e-6 relative on small errors;
    measured with the Cholesky factor already made (half the cost of a product with G)."""
    versions = [[out[i][0] for i in todo]]
    if error_before:
        versions.insert(0, [apply_mask(weights[i], out[i][1]) for i in todo])
    errors = _factor_errors([weights[i] for i in todo], low, damp, dead, *versions)
    for i, errs in zip(todo, errors, strict=True):
        new, keep = out[i]
        before, after = errs if error_before else (None, errs[0])
        out[i] = SparseGPTResult(weight=new, keep=keep, error_before=before, error_after=after, damp=damp)


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


def _factor_errors(weights: list[np.ndarray], low: np.ndarray, lam: float, dead: np.ndarray,
                   *versions: list[np.ndarray]) -> list[tuple[float, ...]]:
    """relative_errors of each version (one Ŵ per weight) for every weight, from the solve's own factor:
    P (H + λI) P = L Lᵀ, so with H = G/count tr(ΔW H ΔWᵀ) = ‖ΔW P L‖² − λ‖ΔW‖² − Σ dead columns² (their
    diagonal was set to 1).

    One triangular product (BLAS trmm, half a general product's work) for every W and ΔW together,
    written straight into the Fortran-ordered, column-reversed array that trmm wants.
    """
    parts = list(weights) + [v for version in versions for v in version]
    rows = [len(p) for p in parts]
    stacked = np.empty((sum(rows), low.shape[0]), order="F")
    start = 0
    for i, p in enumerate(parts):
        w = weights[i % len(weights)]
        block = stacked[start:start + rows[i]]
        if i < len(weights):
            block[:] = p[:, ::-1]
        else:
            np.subtract(w[:, ::-1], p[:, ::-1], out=block, dtype=np.float64)
        start += rows[i]
    sq = np.einsum("ij,ij->i", stacked, stacked)
    gone = dead[::-1]
    dead_sq = np.einsum("ij,ij->i", stacked[:, gone], stacked[:, gone]) if dead.any() else 0.0
    prod = scipy.linalg.blas.dtrmm(1.0, low, stacked, side=1, lower=1, overwrite_b=1)
    per_row = np.einsum("ij,ij->i", prod, prod) - lam * sq - dead_sq
    quad = np.add.reduceat(per_row, np.cumsum([0] + rows[:-1])).reshape(len(versions) + 1, len(weights))
    return [(0.0,) * len(versions) if quad[0, j] <= 0.0
            else tuple(float(np.sqrt(max(q, 0.0) / quad[0, j])) for q in quad[1:, j])
            for j in range(len(weights))]


def _hinv_upper(h: np.ndarray, damp: float, invert: bool = True
                ) -> tuple[np.ndarray | None, float, np.ndarray]:
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
        if not invert:  # the caller sweeps on L (obs_sweep_factored)
            return None, lam, low
        inv, info = scipy.linalg.lapack.dtrtri(low, lower=1, overwrite_c=0)
        if info == 0 and np.all(np.isfinite(inv)):
            return np.ascontiguousarray(inv[::-1, ::-1]), lam, low
    raise ValueError(
        f"H + λI is not positive definite even with λ = {lam:.3g} (damping raised 10x, "
        f"{_DAMP_RETRIES} times); is the Gram matrix symmetric positive semi-definite?"
    )


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
