"""TensorRT engine builds with 2:4 sparse weights, and the equivalent command lines.

Facts and sources: docs/TENSORRT.md. In short: sparse tactics need BuilderFlag.SPARSE_WEIGHTS and
reduced precision. A strongly typed network (TensorRT 10: opt-in flag / ``--stronglyTyped``;
TensorRT 11: always) takes every precision from the ONNX types, so an fp16/bf16 ONNX
(``convert_precision``) is what enables sparse fp16/bf16 kernels; ``--fp16``/``--bf16`` do not
apply there (TensorRT 11 removed them). TensorRT reports sparsity in two INFO log lines, "(Sparsity)
Layers eligible for sparse math: a, b" and "(Sparsity) TRT inference plan picked sparse
implementation for layers: b", and the engine inspector (DETAILED) names each layer's tactic.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass

from sparsec.errors import MissingDependencyError, SparsecError

_ELIGIBLE = re.compile(r"Layers eligible for sparse math:[ \t]*(.*)$", re.IGNORECASE)
_PICKED = re.compile(r"picked sparse implementation for layers:[ \t]*(.*)$", re.IGNORECASE)
_SPARSE_TACTIC = re.compile(r"sparse|sptensor", re.IGNORECASE)

Shape = tuple[int, ...]


@dataclass(frozen=True)
class EngineInfo:
    """What a sparse TensorRT build produced.

    ``layers``/``eligible_sparse`` are network layer names (the ONNX node names). ``sparse_layers``
    comes from the "picked sparse implementation" log line (``sparse_source == "log"``); if
    TensorRT logged none, from inspector layers with a sparse tactic ("inspector", fused engine
    layer names such as "conv1 + relu1"); else empty ("none").
    """

    trt_version: str
    engine_path: str
    build_seconds: float
    layers: tuple[str, ...]
    eligible_sparse: tuple[str, ...]
    sparse_layers: tuple[str, ...]
    sparse_source: str
    inspector_sparse: tuple[str, ...]
    log_lines: tuple[str, ...]


def trt_commands(
    onnx_path: str, precision: str = "fp16", *, engine_path: str | None = None
) -> dict[str, str]:
    """Shell commands equivalent to ``build_engine``, for pipelines that build elsewhere.

    ``trtexec``: strongly typed (precision comes from the ONNX types, so it must already be
    fp16/bf16; ``--stronglyTyped`` is required on TensorRT 10 and a no-op on 11) with sparse
    tactics enabled, a saved engine and the DETAILED layer JSON. ``polygraphy``: checks the 2:4
    pattern of the ONNX weights. For ``fp32`` models also ``trtexec_weakly_typed_fp16``: the
    TensorRT <= 10 way (``--fp16``, deprecated in 10.12, removed in 11) to get fp16 sparse kernels.
    """
    if precision not in ("fp32", "fp16", "bf16"):
        raise SparsecError(f"unknown precision {precision!r}", hint="use fp32, fp16 or bf16")
    engine = engine_path or os.path.splitext(onnx_path)[0] + ".engine"
    layers_json = os.path.splitext(engine)[0] + ".layers.json"
    common = [f"--onnx={onnx_path}", "--sparsity=enable", f"--saveEngine={engine}"]
    detail = ["--profilingVerbosity=detailed", f"--exportLayerInfo={layers_json}"]
    cmds = {
        "trtexec": shlex.join(["trtexec", *common, "--stronglyTyped", *detail]),
        "polygraphy": shlex.join(["polygraphy", "inspect", "sparsity", onnx_path]),
    }
    if precision == "fp32":
        cmds["trtexec_weakly_typed_fp16"] = shlex.join(["trtexec", *common, "--fp16", *detail])
    return cmds


def _split_names(text: str) -> list[str]:
    return [n.strip() for n in text.split(", ") if n.strip()]


def parse_sparsity_log(lines: Iterable[str]) -> tuple[list[str], list[str]]:
    """(eligible, picked) layer names from TensorRT/trtexec log lines, in order, deduplicated."""
    eligible: dict[str, None] = {}
    picked: dict[str, None] = {}
    for line in lines:
        for pattern, into in ((_ELIGIBLE, eligible), (_PICKED, picked)):
            if m := pattern.search(line.rstrip("\r\n")):
                into.update(dict.fromkeys(_split_names(m.group(1))))
    return list(eligible), list(picked)


def parse_inspector_layers(info: str | dict) -> tuple[list[str], list[str]]:
    """(all layer names, names whose tactic is a sparse kernel) from engine-inspector JSON.

    Accepts ``get_engine_information(JSON)`` text, ``trtexec --exportLayerInfo`` files' content, or
    the parsed dict; layers may be plain names (LAYER_NAMES_ONLY) or DETAILED objects whose
    ``TacticName`` contains "sparse"/"sptensor" for sparse tensor-core kernels.
    """
    data = json.loads(info) if isinstance(info, str) else info
    names, sparse = [], []
    for layer in data.get("Layers", []) if isinstance(data, dict) else []:
        if isinstance(layer, str):
            names.append(layer)
        elif isinstance(layer, dict) and "Name" in layer:
            names.append(str(layer["Name"]))
            if _SPARSE_TACTIC.search(str(layer.get("TacticName", ""))):
                sparse.append(str(layer["Name"]))
    return names, sparse


def _cuda_devices() -> tuple[int, str]:
    """(visible CUDA device count, reason when 0), via the driver API: no CUDA Python needed."""
    lib = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        cuda = ctypes.CDLL(lib)
    except OSError:
        return 0, f"NVIDIA driver library {lib} not found"
    count = ctypes.c_int(0)
    if (rc := cuda.cuInit(0)) != 0:
        return 0, f"cuInit failed with CUDA error {rc} (no usable GPU; check CUDA_VISIBLE_DEVICES)"
    if (rc := cuda.cuDeviceGetCount(ctypes.byref(count))) != 0 or count.value == 0:
        return 0, f"no CUDA device visible (cuDeviceGetCount error {rc})"
    return count.value, ""


def _import_tensorrt(onnx_path: str):
    fallback = f"or build elsewhere with: {trt_commands(onnx_path)['trtexec']}"
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise MissingDependencyError(
            f"TensorRT Python package not found ({exc})",
            hint=f"pip install tensorrt on a machine with an NVIDIA GPU, {fallback}",
        ) from exc
    if (found := _cuda_devices())[0] == 0:
        raise MissingDependencyError(
            f"TensorRT needs a CUDA GPU: {found[1]}",
            hint=f"run on an NVIDIA GPU machine, {fallback}",
        )
    return trt


def _profile_shapes(spec) -> tuple[Shape, Shape, Shape]:
    """``(1, 3, 224, 224)`` -> min = opt = max; ``(min, opt, max)`` tuples pass through."""
    if len(spec) == 3 and all(isinstance(s, (tuple, list)) for s in spec):
        return tuple(tuple(int(d) for d in s) for s in spec)  # type: ignore[return-value]
    shape = tuple(int(d) for d in spec)
    return shape, shape, shape


def _parser_error(err) -> str:
    def call(name: str, default=""):
        fn = getattr(err, name, None)
        return fn() if callable(fn) else default

    where = call("node_name") or (f"#{call('node', -1)}" if call("node", -1) != -1 else "")
    op = call("node_operator")
    head = f"node {where}{f' ({op})' if op else ''}: " if where else ""
    return f"{head}{call('desc') or err}"


def build_engine(
    onnx_path: str,
    engine_path: str,
    *,
    workspace_mib: int = 4096,
    strongly_typed: bool = True,
    shapes: dict[str, Shape | tuple[Shape, Shape, Shape]] | None = None,
) -> EngineInfo:
    """Build a TensorRT engine with SPARSE_WEIGHTS and report which layers went sparse.

    ``shapes`` gives each dynamic input one shape or (min, opt, max). The plan is written to a
    temp file beside ``engine_path`` and moved into place, so a failed build leaves nothing half
    written. Raises MissingDependencyError without ``tensorrt`` or a CUDA GPU, SparsecError on
    parse or build errors.
    """
    if not os.path.isfile(onnx_path):
        raise SparsecError(f"ONNX file not found: {onnx_path}")
    trt = _import_tensorrt(onnx_path)
    messages: list[tuple[int, str]] = []
    logger = _capture_logger(trt, messages)
    builder = trt.Builder(logger)
    network, typed = _parse_network(trt, builder, logger, onnx_path, strongly_typed)
    config = _sparse_config(trt, builder, network, typed, workspace_mib, dict(shapes or {}))
    layers = tuple(network.get_layer(i).name for i in range(network.num_layers))
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        errors = [m for s, m in messages if s <= int(trt.ILogger.Severity.ERROR)]
        raise SparsecError(f"TensorRT build failed: {errors[-1] if errors else 'no error logged'}")
    _write_atomically(plan, engine_path)
    inspector_sparse = _inspector_sparse(trt, logger, plan, messages)
    lines = [m for _, m in messages]
    eligible, picked = parse_sparsity_log(lines)
    source = "log" if picked else ("inspector" if inspector_sparse else "none")
    return EngineInfo(
        trt_version=str(trt.__version__),
        engine_path=engine_path,
        build_seconds=round(seconds, 3),
        layers=layers,
        eligible_sparse=tuple(eligible),
        sparse_layers=tuple(picked or inspector_sparse),
        sparse_source=source,
        inspector_sparse=tuple(inspector_sparse),
        log_lines=tuple(m for m in lines if "sparsit" in m.lower() or "sparse" in m.lower()),
    )


def _capture_logger(trt, messages: list[tuple[int, str]]):
    """A TensorRT logger that keeps INFO and above, plus the verbose lines that mention sparsity."""

    class _Capture(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, msg) -> None:
            if int(severity) <= int(trt.ILogger.Severity.INFO) or _SPARSE_TACTIC.search(msg):
                messages.append((int(severity), str(msg)))

    return _Capture()


def _parse_network(trt, builder, logger, onnx_path: str, strongly_typed: bool):
    """(network, typed): the parsed ONNX, strongly typed when this TensorRT has the flag."""
    flag_enum = trt.NetworkDefinitionCreationFlag
    major = int(trt.__version__.split(".")[0])
    flags = 1 << int(flag_enum.EXPLICIT_BATCH) if major < 10 else 0
    typed = strongly_typed and hasattr(flag_enum, "STRONGLY_TYPED")
    if typed:
        flags |= 1 << int(flag_enum.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise SparsecError(
            f"TensorRT could not parse {onnx_path}: {errors[0] if errors else 'unknown error'}",
            hint=f"{len(errors)} parser error(s); TensorRT {trt.__version__}",
        )
    return network, typed


def _sparse_config(trt, builder, network, typed: bool, workspace_mib: int, shapes: dict):
    """Builder config: SPARSE_WEIGHTS, detailed profiling, and one profile for the dynamic inputs."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if not typed:  # weak typing (TensorRT <= 10): allow the fp16 tactics sparsity needs
        for name in ("FP16", "BF16"):
            if hasattr(trt.BuilderFlag, name):
                config.set_flag(getattr(trt.BuilderFlag, name))
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    if unknown := sorted(set(shapes) - {i.name for i in inputs}):
        raise SparsecError(f"shapes given for unknown input {unknown[0]!r}")
    for inp in inputs:
        if any(d < 0 for d in inp.shape) and inp.name not in shapes:
            raise SparsecError(
                f"input {inp.name!r} has dynamic shape {tuple(inp.shape)}",
                hint=f"pass shapes={{{inp.name!r}: (...)}} with one shape or (min, opt, max)",
            )
    if shapes:
        profile = builder.create_optimization_profile()
        for name, spec in shapes.items():
            profile.set_shape(name, *_profile_shapes(spec))
        config.add_optimization_profile(profile)
    return config


def _write_atomically(plan, engine_path: str) -> None:
    """Temp file beside the target, then a rename: a failed write leaves nothing half written."""
    folder = os.path.dirname(os.path.abspath(engine_path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".sparsec-", suffix=".engine.tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(plan)
        os.replace(tmp, engine_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _inspector_sparse(trt, logger, plan, messages: list[tuple[int, str]]) -> list[str]:
    """Engine layers whose tactic is sparse, per the inspector (a best-effort cross-check)."""
    try:
        engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        info = engine.create_engine_inspector().get_engine_information(
            trt.LayerInformationFormat.JSON
        )
        return parse_inspector_layers(info)[1]
    except Exception as exc:  # noqa: BLE001 - the inspector is a best-effort cross-check
        messages.append((int(trt.ILogger.Severity.WARNING), f"sparsec: inspector failed: {exc}"))
        return []
