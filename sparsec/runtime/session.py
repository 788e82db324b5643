"""onnxruntime sessions and random inputs drawn from a model's input spec."""

from __future__ import annotations

import logging
import os
import re

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from sparsec.core.graph import load_model
from sparsec.core.tensors import TensorStore, external_info, inline_copy
from sparsec.errors import SparsecError
from sparsec.runtime.calib_checks import InputSpec
from sparsec.runtime.kv_cache import CacheFill, plan_cache_fill

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


def log_severity() -> int:
    """onnxruntime's own log level: its warnings (graph.cc "Removing initializer ...") and the
    errors sparsec re-raises as one line reach the terminal only with -v."""
    return 1 if logging.getLogger("sparsec").isEnabledFor(logging.INFO) else 4


def make_session(
    path: str | os.PathLike, providers: list[str] | None = None, optimize: bool = True
) -> ort.InferenceSession:
    """An onnxruntime session, or a one-line SparsecError naming the model."""
    opts = ort.SessionOptions()
    opts.log_severity_level = log_severity()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    try:
        return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "external" in first:  # shape constants in external data: read them through the store
            return session_from_store(path, providers)
        raise SparsecError(f"onnxruntime cannot load {path}: {first}") from None


def session_from_store(path: str | os.PathLike, providers: list[str] | None = None) -> ort.InferenceSession:
    """A session on a model file with external data, its values read through sparsec's store.

    onnxruntime refuses shape inputs (Reshape targets, Unsqueeze axes) kept in external data, as
    exports with size_threshold=0 write them; the store brings small tensors into the protobuf
    and feeds the weights as OrtValues, so the outputs are the model's own."""
    loaded = load_model(path)
    light = onnx.ModelProto()
    light.CopyFrom(loaded.model)
    del light.graph.initializer[:]
    return session_with_values(light, list(loaded.model.graph.initializer), loaded.store, providers)


def run_checked(session: ort.InferenceSession, names: list[str] | None, feeds: dict[str, np.ndarray],
                what: str = "the model") -> list:
    """``session.run``, or a one-line SparsecError naming the failing node and the inputs fed.

    A failure here is nearly always an input the model does not accept (a symbolic dim left at 1,
    an integer input such as a sample rate outside the values the model's If branches expect)."""
    try:
        return session.run(names, feeds)
    except Exception as exc:  # onnxruntime raises several unrelated types
        text = " ".join(str(exc).split())
        nodes = re.findall(r"running (\w+) node\. Name:'([^']*)'", text)
        where = f" at {nodes[-1][0]} node {nodes[-1][1]}" if nodes else ""
        reason = text.rsplit("Status Message: ", 1)[-1].split(" : ")[-1][:200]
        fed = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
        raise SparsecError(f"onnxruntime cannot run {what} on inputs {fed}{where}: {reason}",
                           "give --shape NAME=d0,... and --calib-range NAME=lo,hi (or --calib data) that "
                           "the model accepts, or --no-verify") from None


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
                        providers: list[str] | None = None, threads: int | None = None
                        ) -> ort.InferenceSession:
    """A session on `model` (which has no initializers) with `tensors` fed from the store.

    Large values go to onnxruntime as OrtValues over numpy arrays, so no copy of the model
    is ever serialized and models over 2 GB work too. `threads`: onnxruntime's intra-op threads
    (one per Ray worker, so N workers share the cores instead of oversubscribing them).
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = log_severity()
    if threads is not None:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    # extended fusions rewrite attention into kernels that mishandle the pruned-to-the-statistics
    # graph (seen: a Slice fed a scalar); basic optimizations keep the speed that matters here
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    names, values, keep = [], [], []
    graph_inputs = {i.name for i in model.graph.input}
    # values still in the model's data file stay references onnxruntime maps itself: fed as OrtValues
    # they would be held twice (the mapped pages and onnxruntime's own copy)
    on_disk = getattr(store, "on_disk", None)  # duck-typed stores (a Ray worker's arrays) have no files
    if on_disk is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                      str(store.base_dir))
    for tensor in tensors:
        if on_disk is not None and on_disk(tensor) and tensor.name not in graph_inputs:
            model.graph.initializer.append(tensor)
            continue
        array = np.require(store.read(tensor), requirements="C")  # ascontiguousarray makes a scalar 1-d
        # an initializer that is also a graph input is an overridable default: onnxruntime takes it
        # only from the model itself, not as an external initializer
        if array.nbytes < 1024 or array.dtype.name not in _ORT_VALUE_DTYPES or tensor.name in graph_inputs:
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
    if sum(a.nbytes for a in keep) >= PREPACK_LIMIT:  # MatMul would keep a packed copy of each fed weight
        opts.add_session_config_entry("session.disable_prepacking", "1")
    try:
        session = ort.InferenceSession(model.SerializeToString(), opts,
                                       providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SparsecError(f"onnxruntime cannot run the calibration graph: {first}") from None
    session._sparsec_keepalive = (values, keep)  # onnxruntime reads these buffers in place
    return session


def session_on_store(model: onnx.ModelProto, store: TensorStore, outputs=()) -> ort.InferenceSession:
    """A CPU session on the graph as it is now, its initializers fed from the store (pending
    rewrites included): no inline copy of the model is made or serialized, at any size. `outputs`:
    intermediate tensors to add as graph outputs (a probe), on the session's own copy of the graph."""
    if any(external_info(t) is not None for node in model.graph.node for a in node.attribute
           if a.type == onnx.AttributeProto.TENSOR for t in [a.t]) or \
            any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                for node in model.graph.node for a in node.attribute):
        # values outside the initializers
        return make_session_from_proto(_with_outputs(inline_copy(model, store), outputs))
    light = onnx.ModelProto()
    light.CopyFrom(model)
    del light.graph.initializer[:]
    return session_with_values(_with_outputs(light, outputs), list(model.graph.initializer), store)


def _with_outputs(model: onnx.ModelProto, outputs) -> onnx.ModelProto:
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(outputs) if n not in have)
    return model


PREPACK_LIMIT = 2**30  # bytes of fed values past which onnxruntime's packed copies would double them
_ORT_VALUE_DTYPES = {"float32", "float16", "float64", "int64", "int32", "int8", "uint8"}


def make_session_from_proto(model: onnx.ModelProto) -> ort.InferenceSession:
    """A CPU session on an in-memory model whose values are all inline (< 2 GB)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = log_severity()
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
    ranges: dict[str, tuple[float, float]] | None = None,
) -> dict[str, np.ndarray]:
    """Random inputs respecting each input's dtype: floats N(0, 1), integers from int_range, or per input
    uniform in `ranges` (--calib-range: [lo, hi), whole numbers for integer inputs)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for arg in session.get_inputs():
        dtype = ORT_DTYPES.get(arg.type)
        if dtype is None:
            raise SparsecError(f"input {arg.name} has type {arg.type}, which random inputs cannot fill")
        shape = input_shape(arg, shapes)
        given = (ranges or {}).get(arg.name)
        if np.issubdtype(dtype, np.floating):
            values = rng.standard_normal(shape) if given is None else rng.uniform(given[0], given[1], shape)
            feeds[arg.name] = values.astype(dtype)
        elif dtype is np.bool_:
            feeds[arg.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            lo, hi = int_range if given is None else (int(given[0]), int(given[1]))
            feeds[arg.name] = rng.integers(lo, hi, shape).astype(dtype)
    return fill_decoder_inputs(session, feeds)


def session_cache_fill(session: ort.InferenceSession) -> CacheFill | None:
    """The KV-cache fill plan of a session's inputs (None: not a decoder with a cache)."""
    specs = [InputSpec(a.name, np.dtype(ORT_DTYPES[a.type]), tuple(a.shape)) for a in session.get_inputs()
             if a.type in ORT_DTYPES]
    return plan_cache_fill(specs)


def fill_decoder_inputs(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A decoder's random feed as a first step: empty cache, mask of ones, positions counted (random
    masks and positions would index out of range; a past comes only from --calib data)."""
    fill = session_cache_fill(session)
    if fill is None:
        return feeds
    return fill.fill({k: v for k, v in feeds.items() if k not in fill.names})
