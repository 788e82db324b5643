"""Twins: copies of a model to edit (a masked oracle, a probe) that share its values.

A structured step checks the smaller model against the dense one with the removed parts zeroed. A full
copy of a model with external data would cost its size again; a twin copies the graph only, points at
the data file for every value it leaves alone and makes the values it changes when a session reads them.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx

from sparsec.core.tensors import TensorStore, external_info


def twin(model: onnx.ModelProto, store: TensorStore) -> tuple[onnx.ModelProto, TensorStore]:
    """A copy of the model to edit (a masked oracle, a probe with more outputs) that shares the values:
    external tensors still point at the data file and the store's pending rewrites are carried by
    reference, so the twin holds in memory only what is then written to its own store. Inline
    tensors are copied with the graph (a model without external data is small)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # external tensors carry no values: this copies the graph
    return copy, store.for_copy(model, copy)


class ZeroingStore(TensorStore):
    """A twin's values with some slices read as zeros (the masked oracle: removed filters, heads).

    External tensors are zeroed in a fresh copy at each read, so between sessions the twin holds no
    weight in memory, and during one only the tensors it changes; the rest stay in the data file.
    Inline tensors (the twin's own copies) are zeroed in place."""

    def __init__(self, shared: TensorStore) -> None:
        super().__init__(shared.base_dir)
        self._pending = shared._pending  # the twin's rewrites, by reference
        # keyed like _pending and holding the tensor: a protobuf wrapper's id is stable only while it lives
        self._zeros: dict[int, tuple[onnx.TensorProto, list[tuple[int, list[int]]]]] = {}

    def zero(self, tensor: onnx.TensorProto, axis: int, positions: Iterable[int]) -> None:
        """Read `tensor` with `positions` along `axis` set to zero from now on."""
        if external_info(tensor) is None:
            self.write(tensor, _zeroed(super().read(tensor), [(axis, list(positions))]))
            return
        self._zeros.setdefault(id(tensor), (tensor, []))[1].append((axis, list(positions)))

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        values = super().read(tensor)
        return _zeroed(values, self._zeros[id(tensor)][1]) if id(tensor) in self._zeros else values

    def on_disk(self, tensor: onnx.TensorProto) -> bool:
        return id(tensor) not in self._zeros and super().on_disk(tensor)


def _zeroed(values: np.ndarray, slices: list[tuple[int, list[int]]]) -> np.ndarray:
    out = np.array(values)
    for axis, positions in slices:
        where: list = [slice(None)] * out.ndim
        where[axis] = positions
        out[tuple(where)] = 0
    return out


def masked_twin(model: onnx.ModelProto, store: TensorStore) -> tuple[onnx.ModelProto, ZeroingStore]:
    """A twin of the model (see `twin`) whose store can zero slices of its tensors lazily."""
    copy, shared = twin(model, store)
    return copy, ZeroingStore(shared)
