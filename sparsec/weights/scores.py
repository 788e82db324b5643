"""Importance scores for the weights of one layer (higher = keep), and what removal costs.

Pure functions over a weight (in the layout the layer reads it) and calibration statistics.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sparsec.core.layers import Layer

ScoreFn = Callable[[Layer, np.ndarray], np.ndarray]


def magnitude(layer: Layer, weight: np.ndarray) -> np.ndarray:
    """|W|: the classic baseline; needs no data."""
    return np.abs(weight)


def channel_energy(layer: Layer, sumsq: np.ndarray) -> np.ndarray:
    """Per-input-channel statistic broadcast onto the weight's layout.

    A grouped Conv [M, C/g, R, S] reads input channel (m // (M/g))·(C/g) + c for weight
    (m, c), so each output group sees its own slice of the statistic.
    """
    ndim = len(layer.shape)
    if layer.op == "Conv" and layer.groups > 1:
        out, per_group = layer.shape[0], layer.shape[1]
        table = sumsq.reshape(layer.groups, per_group)[np.arange(out) // (out // layer.groups)]
        return table.reshape(out, per_group, *([1] * (ndim - 2)))
    shape = [1] * ndim
    shape[layer.reduction_axis] = sumsq.shape[0]
    return sumsq.reshape(shape)


def wanda(sumsq_by_layer: dict[str, np.ndarray]) -> ScoreFn:
    """|W_ij|·‖X_j‖₂ (Sun et al. 2023): a weight matters as much as the input it multiplies."""

    def score(layer: Layer, weight: np.ndarray) -> np.ndarray:
        norm = np.sqrt(channel_energy(layer, sumsq_by_layer[layer.name])).astype(np.float32)
        return np.abs(weight).astype(np.float32, copy=False) * norm

    return score


def relative_error_diagonal(layer: Layer, weight: np.ndarray, pruned: np.ndarray,
                            sumsq: np.ndarray) -> float:
    """‖(W−Ŵ)X‖/‖WX‖ with XᵀX replaced by its diagonal (cross-channel terms ignored)."""
    energy = channel_energy(layer, sumsq)
    w = weight.astype(np.float64)
    delta = w - pruned.astype(np.float64)
    den = float((w * w * energy).sum())
    return float(np.sqrt((delta * delta * energy).sum() / den)) if den > 0 else 0.0


def as_rows(layer: Layer, weight: np.ndarray) -> np.ndarray:
    """The weight as [outputs·positions, K] with K the reduction axis last."""
    moved = np.moveaxis(weight, layer.reduction_axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def from_rows(layer: Layer, rows: np.ndarray) -> np.ndarray:
    """Inverse of `as_rows`."""
    moved_shape = list(np.moveaxis(np.empty(layer.shape, dtype=np.bool_), layer.reduction_axis, -1).shape)
    return np.moveaxis(rows.reshape(moved_shape), -1, layer.reduction_axis)


def relative_error_gram(layer: Layer, weight: np.ndarray, pruned: np.ndarray, gram: np.ndarray) -> float:
    """Exact ‖(W−Ŵ)X‖/‖WX‖ = sqrt(tr(ΔW G ΔWᵀ)/tr(W G Wᵀ)) for 2-D and 1×1 layers."""
    w = as_rows(layer, weight.astype(np.float64))
    d = w - as_rows(layer, pruned.astype(np.float64))
    den = float(((w @ gram) * w).sum())
    num = float(((d @ gram) * d).sum())
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0
