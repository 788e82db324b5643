"""onnxruntime sessions and random inputs drawn from a model's input spec."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort

from sparsec.errors import SparsecError

ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def make_session(
    path: str | os.PathLike, providers: list[str] | None = None, optimize: bool = True
) -> ort.InferenceSession:
    """An onnxruntime session, or a one-line SparsecError naming the model."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    try:
        return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SparsecError(f"onnxruntime cannot load {path}: {first}") from None


def make_session_from_proto(model: onnx.ModelProto) -> ort.InferenceSession:
    """A CPU session on an in-memory model whose values are all inline (< 2 GB)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def input_shape(arg: ort.NodeArg, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """A concrete shape for an input: --shape if given, else symbolic dims as 1."""
    if arg.name in shapes:
        return tuple(shapes[arg.name])
    return tuple(d if isinstance(d, int) and d > 0 else 1 for d in arg.shape)


def random_feeds(
    session: ort.InferenceSession,
    shapes: dict[str, tuple[int, ...]],
    seed: int = 0,
    int_range: tuple[int, int] = (0, 2),
) -> dict[str, np.ndarray]:
    """Random inputs respecting each input's dtype; integers drawn from int_range."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for arg in session.get_inputs():
        dtype = ORT_DTYPES.get(arg.type)
        if dtype is None:
            raise SparsecError(f"input {arg.name} has type {arg.type}, which random inputs cannot fill")
        shape = input_shape(arg, shapes)
        if np.issubdtype(dtype, np.floating):
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[arg.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[arg.name] = rng.integers(int_range[0], int_range[1], shape).astype(dtype)
    return feeds
