"""Loading, indexing and saving ONNX models without touching the input file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from sparsec.errors import SparsecError
from sparsec.tensors import TensorStore, external_info, iter_tensors

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
    files = _external_files(model, p.parent)
    external = bool(files)
    size = p.stat().st_size
    for f, needed in files.items():
        if not f.is_file() or f.stat().st_size < needed:
            raise SparsecError(f"external data file {f} of {p} is missing or truncated",
                               "keep the .data file next to the model")
        size += f.stat().st_size
    return LoadedModel(model=model, store=TensorStore(p.parent), path=p, external=external,
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


def _external_files(model: onnx.ModelProto, base: Path) -> dict[Path, int]:
    """Each external data file with the number of bytes the model needs from it."""
    needed: dict[Path, int] = {}
    for t in iter_tensors(model.graph):
        info = external_info(t)
        if info is None:
            continue
        f = base / info.get("location", "")
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        needed[f] = max(needed.get(f, 0), end)
    return needed


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
