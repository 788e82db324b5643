"""Shared test helpers: run models, print graphs, apply reference masks."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper


def run(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    data = model if isinstance(model, str) else model.SerializeToString()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def graph_lines(model: onnx.ModelProto) -> list[str]:
    """The graph in one printed form (op, name, inputs, outputs) so diffs read like a review."""
    return [f"{n.op_type} {n.name} ({', '.join(n.input)}) -> ({', '.join(n.output)})"
            for n in model.graph.node]


def io_shapes(model: onnx.ModelProto) -> list[tuple]:
    def dims(vi):
        return tuple(d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim)

    return [(v.name, dims(v)) for v in list(model.graph.input) + list(model.graph.output)]


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def random_feeds(model: onnx.ModelProto, shapes: dict[str, tuple], seed: int = 0):
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in model.graph.input:
        shape = shapes[inp.name]
        if inp.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            feeds[inp.name] = rng.integers(0, 2, shape).astype(np.int64)
        else:
            feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def reference_nm_mask(w: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Obvious N:M by |w| along axis; ties go to the earlier element."""
    moved = np.moveaxis(np.abs(w), axis, -1)
    keep = np.zeros(moved.shape, dtype=bool)
    flat = moved.reshape(-1, moved.shape[-1])
    kflat = keep.reshape(-1, moved.shape[-1])
    for g in range(0, flat.shape[1], m):
        order = np.argsort(-flat[:, g:g + m], axis=1, kind="stable")[:, :n]
        np.put_along_axis(kflat[:, g:g + m], order, True, axis=1)
    return np.moveaxis(kflat.reshape(moved.shape), -1, axis)
