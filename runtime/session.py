"""onnxruntime sessions and random inputs drawn from a model's input spec."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from sparsec.errors import SparsecError
from sparsec.tensors import TensorStore

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


PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider", "dml": "DmlExecutionProvider",
             "coreml": "CoreMLExecutionProvider", "openvino": "OpenVINOExecutionProvider"}


def resolve_providers(names: list[str] | tuple[str, ...]) -> list[str]:
    """Short provider names (cuda, cpu) to onnxruntime's, refusing ones this install lacks."""
    available = ort.get_available_providers()
    out = []
    for name in names:
        full = PROVIDERS.get(name.strip().lower(), name.strip())
        if full not in available:
            hint = "pip install sparsec[gpu] on a machine with CUDA" if "CUDA" in full else \
                f"available here: {', '.join(available)}"
            raise SparsecError(f"--providers {name}: onnxruntime has no {full} here", hint)
        out.append(full)
    return out


def session_with_values(model: onnx.ModelProto, tensors: list[onnx.TensorProto], store: TensorStore,
                        providers: list[str] | None = None) -> ort.InferenceSession:
    """A session on `model` (which has no initializers) with `tensors` fed from the store.

    Large values go to onnxruntime as OrtValues over numpy arrays, so no copy of the model
    is ever serialized and models over 2 GB work too.
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # extended fusions rewrite attention into kernels that mishandle the pruned-to-the-statistics
    # graph (seen: a Slice fed a scalar); basic optimizations keep the speed that matters here
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    names, values, keep = [], [], []
    for tensor in tensors:
        array = np.ascontiguousarray(store.read(tensor))
        if array.nbytes < 1024 or array.dtype.name not in _ORT_VALUE_DTYPES:
            model.graph.initializer.append(numpy_helper.from_array(array, tensor.name))
            continue
        stub = model.graph.initializer.add()
        stub.name, stub.data_type = tensor.name, tensor.data_type
        stub.dims.extend(tensor.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        entry = stub.external_data.add()
        entry.key, entry.value = "location", "sparsec-fed-by-session"
        names.append(tensor.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
        keep.append(array)
    if names:
        opts.add_external_initializers(names, values)
    try:
        session = ort.InferenceSession(model.SerializeToString(), opts,
                                       providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SparsecError(f"onnxruntime cannot run the calibration graph: {first}") from None
    session._sparsec_keepalive = (values, keep)  # onnxruntime reads these buffers in place
    return session


_ORT_VALUE_DTYPES = {"float32", "float16", "float64", "int64", "int32", "int8", "uint8"}


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
