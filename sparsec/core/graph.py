"""Loading, indexing and saving ONNX models without touching the input file."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from sparsec.core.tensors import TensorStore, external_info, external_path, iter_tensors
from sparsec.errors import SparsecError

TWO_GB = 2**31
EXTERNAL_DATA_NAME = "model.onnx.data"


@dataclass(frozen=True)
class LoadedModel:
    """A model in memory, the store of its values, and the facts saving must respect."""

    model: onnx.ModelProto
    store: TensorStore
    path: Path
    external: bool
    file_bytes: int
    data_files: tuple[Path, ...] = ()


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Load an ONNX file or raise a one-line SparsecError; external data stays on disk."""
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
    files = _external_files(model, p.parent)  # locations first: nothing outside the folder is opened
    external = bool(files)
    size = p.stat().st_size
    for f, needed in files.items():
        if not f.is_file() or f.stat().st_size < needed:
            raise SparsecError(f"external data file {f} of {p} is missing or truncated",
                               "keep the .data file next to the model")
        size += f.stat().st_size
    _check_structure(p)
    store = TensorStore(p.parent)
    store.inline_small(model)  # shape constants where shape inference and onnxruntime read them
    return LoadedModel(model=model, store=store, path=p, external=external,
                       file_bytes=size, data_files=tuple(files))


def save_model(model: onnx.ModelProto, path: Path, store: TensorStore, *, external: bool) -> None:
    """Write a model; with external data when the input had it or it would pass 2 GB."""
    if not external and not store.has_external(model) and model.ByteSize() < TWO_GB:
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
        return
    store.write_external(model, path, EXTERNAL_DATA_NAME)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


def _check_structure(path: Path) -> None:
    """onnx's checker on the graph (cycles, duplicate producers, missing opsets...), whatever
    --no-verify says: a model onnxruntime would reject is refused before any work."""
    try:
        # by path, so that external data is looked up beside the model, not in the cwd
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise SparsecError(f"{path} is not a valid ONNX model: {_first_line(exc)}",
                           "fix the exporter's output (onnx.checker.check_model shows the details)"
                           ) from None


def _external_files(model: onnx.ModelProto, base: Path) -> dict[Path, int]:
    """Each external data file with the number of bytes the model needs from it.

    Locations are checked before any file is opened; each tensor's declared byte range must
    match its shape, so a corrupt header cannot make sparsec read gigabytes it never needs."""
    needed: dict[Path, int] = {}
    for t in iter_tensors(model.graph):
        info = external_info(t)
        if info is None:
            continue
        f = external_path(base, t)
        nbytes = _tensor_bytes(t)
        try:
            offset = int(info.get("offset", 0))
            length = int(info.get("length", nbytes))
        except ValueError:
            raise SparsecError(f"tensor {t.name!r}: external data offset/length are not integers",
                               "the model file is corrupt") from None
        if offset < 0 or length != nbytes:
            raise SparsecError(f"tensor {t.name!r}: external data declares {length} bytes at offset "
                               f"{offset}, its shape {list(t.dims)} needs {nbytes}",
                               "the model file is corrupt")
        needed[f] = max(needed.get(f, 0), offset + length)
    return needed


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of the tensor's values from its dims and dtype (sub-byte types rounded up)."""
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except (KeyError, ValueError):
        raise SparsecError(f"tensor {tensor.name!r} has an unknown data type {tensor.data_type}",
                           "the model file is corrupt") from None
    if any(d < 0 for d in tensor.dims):
        raise SparsecError(f"tensor {tensor.name!r} has negative dims {list(tensor.dims)}",
                           "the model file is corrupt")
    bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(tensor.data_type)
    count = math.prod(tensor.dims)
    return (count * bits + 7) // 8 if bits else count * np.dtype(dtype).itemsize


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_written(path: Path, full: bool = True) -> None:
    """onnx's checker on a model sparsec wrote, whatever --no-verify says: an invalid output is a
    sparsec bug, and it must stop the compile before anything is moved into place."""
    try:
        onnx.checker.check_model(str(path), full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        raise SparsecError(f"sparsec wrote an invalid model: {_first_line(exc)}",
                           "this is a sparsec bug, please report it with the input model") from None
