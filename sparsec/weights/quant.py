"""Values of QDQ weights: an int8/uint8 tensor is "zero" where it equals its zero point.

Scores must see the real (dequantized) weights, since per-channel scales make raw integers
incomparable across channels; a removed weight is set to the zero point, which dequantizes
to exactly 0.
"""

from __future__ import annotations

import numpy as np
import onnx

from sparsec.core.graph_index import GraphIndex, WeightSource, to_effective
from sparsec.core.tensors import TensorStore


def _broadcast(values: np.ndarray, source: WeightSource, ndim: int) -> np.ndarray:
    """A per-channel parameter shaped to broadcast against the stored tensor."""
    dq = source.dequant
    assert dq is not None
    shape = [1] * ndim
    if dq.axis is not None:
        shape[dq.axis] = values.size
    return values.reshape(shape)


def zero_point(index: GraphIndex, store: TensorStore, source: WeightSource) -> np.ndarray | None:
    """The zero point(s) in the stored layout (broadcastable), or None for a float weight."""
    dq = source.dequant
    if dq is None:
        return None
    ndim = len(source.stored_shape)
    if not dq.zero_point:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(index.constant(source).data_type)
        return np.zeros([1] * ndim, dtype=dtype)
    tensor = index.stored_tensor(dq.zero_point)
    assert tensor is not None
    return _broadcast(np.asarray(store.read(tensor)), source, ndim)


def dequantize(index: GraphIndex, store: TensorStore, source: WeightSource, stored: np.ndarray
               ) -> np.ndarray:
    """(q - zero_point)·scale as float32, in the stored layout; float weights pass unchanged."""
    if source.dequant is None:
        return stored
    tensor = index.stored_tensor(source.dequant.scale)
    assert tensor is not None
    scale = _broadcast(np.asarray(store.read(tensor), dtype=np.float32), source, stored.ndim)
    zero = zero_point(index, store, source)
    return ((stored.astype(np.int32) - zero.astype(np.int32)) * scale).astype(np.float32)


def real_weight(index: GraphIndex, store: TensorStore, source: WeightSource) -> np.ndarray:
    """The weight as the layer computes with it: dequantized, in the layer's layout."""
    stored = store.read(index.constant(source))
    return to_effective(dequantize(index, store, source, stored), source.steps)


def effective_zero(index: GraphIndex, store: TensorStore, source: WeightSource) -> np.ndarray | None:
    """The zero point broadcastable against the weight in the layer's layout (None: float)."""
    zero = zero_point(index, store, source)
    return None if zero is None else to_effective(zero, source.steps)
