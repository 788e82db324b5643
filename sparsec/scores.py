"""Importance scores for the weights of one layer (higher = keep). Pure functions."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sparsec.layers import Layer

ScoreFn = Callable[[Layer, np.ndarray], np.ndarray]


def magnitude(layer: Layer, weight: np.ndarray) -> np.ndarray:
    """|W|: the classic baseline; needs no data."""
    return np.abs(weight)
