"""Loading, indexing and saving ONNX models without touching the input file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from sparsec.errors import SparsecError

TWO_GB = 2**31
EXTERNAL_DATA_NAME = "model.onnx.data"


@dataclass(frozen=True)
class LoadedModel:
    """A model in memory plus the facts about its file that saving must respect."""

    model: onnx.ModelProto
    path: Path
    external: bool
    file_bytes: int


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Load an ONNX file (external data included) or raise a one-line SparsecError."""
    p = Path(path)
    if not p.exists():
        raise SparsecError(f"model file not found: {p}", "check the path")
    if not p.is_file():
        raise SparsecError(f"model path is not a file: {p}", "give the .onnx file itself")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise SparsecError(
            f"{p} is not a readable ONNX model: {_first_line(exc)}",
            "is the file truncated or not an .onnx file?",
        ) from None
    if not model.graph.node and not model.graph.output:
        raise SparsecError(f"{p} is not an ONNX model: it has no graph", "give an .onnx file")
    external = any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(model.graph)
    )
    if external:
        try:
            onnx.load_external_data_for_model(model, str(p.parent))
        except (OSError, ValueError, RuntimeError) as exc:
            raise SparsecError(
                f"cannot read the external data of {p}: {_first_line(exc)}",
                "keep the .data file next to the model",
            ) from None
    size = p.stat().st_size + sum(f.stat().st_size for f in _external_files(model, p.parent))
    return LoadedModel(model=model, path=p, external=external, file_bytes=size)


def save_model(model: onnx.ModelProto, path: Path, *, external: bool) -> None:
    """Write a model, with external data when asked or when it would pass 2 GB."""
    if not external and model.ByteSize() < TWO_GB:
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
        return
    data = path.parent / EXTERNAL_DATA_NAME
    if data.exists():
        data.unlink()
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=EXTERNAL_DATA_NAME,
        size_threshold=1024,
    )


def tensor_to_array(tensor: onnx.TensorProto) -> np.ndarray:
    """A writable numpy copy of a tensor."""
    return np.array(numpy_helper.to_array(tensor), copy=True)


def write_array(tensor: onnx.TensorProto, array: np.ndarray) -> None:
    """Replace a tensor's values in place, keeping its name, dtype and dims."""
    new = numpy_helper.from_array(array.astype(array.dtype, copy=False), tensor.name)
    tensor.ClearField("float_data")
    tensor.ClearField("int32_data")
    tensor.ClearField("double_data")
    tensor.ClearField("int64_data")
    tensor.ClearField("uint64_data")
    tensor.raw_data = new.raw_data


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)


def _external_files(model: onnx.ModelProto, base: Path) -> set[Path]:
    files = set()
    for t in _all_tensors(model.graph):
        for entry in t.external_data:
            if entry.key == "location":
                files.add(base / entry.value)
    return {f for f in files if f.exists()}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
