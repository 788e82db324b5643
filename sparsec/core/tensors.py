"""Tensor values in and out of a model, inline or in external data files.

Large models keep their weights in external files. Reading them through protobuf copies
every byte twice, so the store reads external tensors straight from their file, keeps the
rewritten ones aside, and `save_model` streams every tensor into the new data file.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sparsec.errors import SparsecError

INLINE_LIMIT = 1024  # bytes; smaller tensors stay inside the .onnx when writing external data
SPILL_MIN = 1 << 20  # bytes; smaller rewrites stay in memory when spilling (see spill_rewrites)
ALIGN = 64


def external_path(base_dir: Path, tensor: onnx.TensorProto) -> Path:
    """The external data file of `tensor`, refused unless it lies inside `base_dir`.

    onnxruntime rejects absolute locations, `..` and symlinks out of the model's folder; sparsec
    refuses them before opening anything, so a model file can never make it read elsewhere."""
    info = external_info(tensor) or {}
    location = info.get("location", "")
    fix = "external data must be a relative path inside the model's folder"
    if not location or location.startswith(("/", "\\")) or Path(location).is_absolute() \
            or re.match(r"^[A-Za-z]:", location):
        raise SparsecError(f"tensor {tensor.name!r}: external data location {location!r} is not a "
                           "relative path", fix)
    parts = Path(location.replace("\\", "/")).parts
    if any(part == ".." for part in parts):
        raise SparsecError(f"tensor {tensor.name!r}: external data location {location!r} leaves the "
                           "model's folder", fix)
    base = Path(base_dir).resolve()
    path = (base / location).resolve()
    if base != path and base not in path.parents:
        raise SparsecError(f"tensor {tensor.name!r}: external data location {location!r} resolves "
                           f"outside the model's folder (symlink to {path})", fix)
    return path


def external_info(tensor: onnx.TensorProto) -> dict[str, str] | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in tensor.external_data}


class TensorStore:
    """Reads and rewrites tensor values of one in-memory model."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = Path(base_dir)
        self._pending: dict[int, tuple[onnx.TensorProto, np.ndarray]] = {}
        self._scratch = None  # spill_rewrites(): the unlinked file holding rewritten values

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The tensor's values; read-only, never a copy the caller may rely on writing."""
        if id(tensor) in self._pending:
            return self._pending[id(tensor)][1]
        info = external_info(tensor)
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        dims = tuple(tensor.dims)
        if info is not None:
            return self._mapped(tensor, int(info.get("offset", 0)), np.dtype(dtype), dims)
        if tensor.HasField("raw_data"):
            raw = tensor.raw_data
            if len(raw) != math.prod(dims) * np.dtype(dtype).itemsize:
                raise SparsecError(f"tensor {tensor.name!r} holds {len(raw)} bytes but its shape "
                                   f"{list(dims)} needs {math.prod(dims) * np.dtype(dtype).itemsize}",
                                   "the model file is corrupt")
            return np.frombuffer(raw, dtype=dtype).reshape(dims)
        try:
            return numpy_helper.to_array(tensor)
        except ValueError as exc:
            raise SparsecError(f"tensor {tensor.name!r} cannot be read: {exc}",
                               "the model file is corrupt") from None

    def _mapped(self, tensor: onnx.TensorProto, offset: int, dtype: np.dtype, dims: tuple[int, ...]
                ) -> np.ndarray:
        """A read-only view of the values in the data file (memory-mapped: no copy is made until a
        pass changes them, and saving writes untouched tensors straight from the page cache)."""
        path = external_path(self.base_dir, tensor)
        count = math.prod(dims)
        if count == 0:
            return np.zeros(dims, dtype)
        try:
            arr = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))
        except (ValueError, OSError):
            raise SparsecError(f"external data of tensor {tensor.name!r} is truncated",
                               "the .data file does not match the model") from None
        return arr.reshape(dims)

    def prefetch(self, tensor: onnx.TensorProto) -> None:
        """Start reading an on-disk tensor's bytes in the background (posix_fadvise WILLNEED), so a
        pass that reads weights one by one overlaps the next one's disk reads with this one's work."""
        info = external_info(tensor)
        if info is None or id(tensor) in self._pending or not hasattr(os, "posix_fadvise"):
            return
        nbytes = math.prod(tensor.dims) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        try:
            fd = os.open(external_path(self.base_dir, tensor), os.O_RDONLY)
        except OSError:
            return  # read() names the missing file
        try:
            os.posix_fadvise(fd, int(info.get("offset", 0)), nbytes, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def for_copy(self, model: onnx.ModelProto, copy: onnx.ModelProto) -> TensorStore:
        """A store for `copy` (a CopyFrom of `model`) carrying this store's pending rewrites by reference:
        the copy reads the values the original would, and nothing is copied."""
        shared = TensorStore(self.base_dir)
        for original, tensor in zip(iter_tensors(model.graph), iter_tensors(copy.graph), strict=True):
            if id(original) in self._pending:
                shared._pending[id(tensor)] = (tensor, self._pending[id(original)][1])
        return shared

    def spill_rewrites(self) -> None:
        """From now on keep rewritten external tensors in an unlinked scratch file, mapped read-only,
        instead of in memory: a pass that rewrites a large model weight by weight (SparseGPT
        --sequential) then holds one weight at a time, and onnxruntime reads the rest from pages."""
        if self._scratch is None:
            self._scratch = tempfile.TemporaryFile(prefix="sparsec-rewrites-")

    def write(self, tensor: onnx.TensorProto, values: np.ndarray) -> None:
        """Replace a tensor's values (same dtype and shape)."""
        if external_info(tensor) is not None:
            if self._scratch is not None and values.nbytes >= SPILL_MIN:
                values = _spilled(self._scratch, np.ascontiguousarray(values))
            self._pending[id(tensor)] = (tensor, values)
            return
        for field in ("float_data", "int32_data", "double_data", "int64_data", "uint64_data"):
            tensor.ClearField(field)
        tensor.raw_data = np.ascontiguousarray(values).tobytes()

    def resize(self, tensor: onnx.TensorProto, values: np.ndarray) -> None:
        """Replace a tensor's values with an array of another shape (same dtype)."""
        del tensor.dims[:]
        tensor.dims.extend(values.shape)
        if external_info(tensor) is not None:
            self._pending[id(tensor)] = (tensor, np.ascontiguousarray(values))
            return
        self.write(tensor, values)

    def materialize(self, model: onnx.ModelProto) -> None:
        """Bring every value into the protobuf (for tools that need a self-contained model)."""
        _inline_external(model, self)
        self._pending.clear()

    def inline_small(self, model: onnx.ModelProto) -> None:
        """Bring external tensors under INLINE_LIMIT bytes into the protobuf, in place.

        Exporters may put even shape constants in the .data file; ONNX shape inference and
        onnxruntime read shape inputs only from the protobuf, and so does every analysis that
        reads small constants (Reshape targets, Split sizes). Weights stay on disk."""
        for tensor in iter_tensors(model.graph):
            if external_info(tensor) is None or id(tensor) in self._pending or not _has_values(tensor):
                continue
            nbytes = math.prod(tensor.dims) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            if nbytes < INLINE_LIMIT:
                values = self.read(tensor)
                tensor.ClearField("external_data")
                tensor.data_location = onnx.TensorProto.DEFAULT
                tensor.raw_data = np.ascontiguousarray(values).tobytes()

    def on_disk(self, tensor: onnx.TensorProto) -> bool:
        """True when the tensor's current values are the ones in its external data file."""
        return external_info(tensor) is not None and id(tensor) not in self._pending

    def forget(self, tensor: onnx.TensorProto) -> None:
        """Drop the pending rewrite of a tensor that left the model (a replaced model's tensors must
        not keep their values in memory until the save)."""
        self._pending.pop(id(tensor), None)

    def has_external(self, model: onnx.ModelProto) -> bool:
        return any(external_info(t) is not None for t in iter_tensors(model.graph))

    def write_external(self, model: onnx.ModelProto, model_path: Path, data_name: str) -> None:
        """Stream every sizeable tensor into `data_name` beside `model_path`, 64-byte aligned."""
        self.write_external_copy(model, model, model_path.parent / data_name)
        self._pending.clear()
        self.base_dir = model_path.parent

    def write_external_copy(self, model: onnx.ModelProto, copy: onnx.ModelProto, data_path: Path,
                            skip: frozenset[int] = frozenset()) -> None:
        """Write the values of `model`'s sizeable tensors (pending rewrites included) into
        `data_path` and point the matching tensors of `copy` (a CopyFrom of it, or the model
        itself) there; tensors whose position in iter_tensors is in `skip` are left alone."""
        def items() -> Iterator[tuple[onnx.TensorProto, np.ndarray]]:
            pairs = zip(iter_tensors(model.graph), iter_tensors(copy.graph), strict=True)
            for i, (original, tensor) in enumerate(pairs):
                if i in skip or not _has_values(original):
                    continue
                values = self.read(original)
                if values.nbytes >= INLINE_LIMIT or external_info(original) is not None:
                    yield tensor, values

        write_aligned(items(), data_path)


def _spilled(scratch, values: np.ndarray) -> np.ndarray:
    """`values` appended to the scratch file, 64-byte aligned, as a read-only map of it."""
    scratch.seek(0, os.SEEK_END)
    scratch.write(b"\0" * (-scratch.tell() % ALIGN))
    start = scratch.tell()
    scratch.write(values.reshape(-1).view(np.uint8).data)
    scratch.flush()
    return np.memmap(scratch, dtype=values.dtype, mode="r", offset=start, shape=values.shape)


def write_aligned(items: Iterable[tuple[onnx.TensorProto, np.ndarray]], data_path: Path) -> None:
    """Write each array into `data_path`, 64-byte aligned, and point its tensor there (location: the
    file's name, beside the model). A generator of items keeps one array in memory at a time."""
    with open(data_path, "wb") as f:
        for tensor, values in items:
            f.write(b"\0" * (-f.tell() % ALIGN))
            start = f.tell()
            f.write(np.ascontiguousarray(values).reshape(-1).view(np.uint8).data)  # bfloat16: no buffer
            _point_to(tensor, data_path.name, start, values.nbytes)


def inline_copy(model: onnx.ModelProto, store: TensorStore) -> onnx.ModelProto:
    """A self-contained copy of the model: every value inside the protobuf (for onnxruntime
    sessions built from bytes, and for masked twins)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    # values are read through the original tensors: the store's pending rewrites are keyed by them,
    # so a copy taken after a pass has rewritten external weights holds the rewritten values
    for original, tensor in zip(iter_tensors(model.graph), iter_tensors(copy.graph), strict=True):
        if external_info(tensor) is not None:
            values = store.read(original)
            tensor.ClearField("external_data")
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = np.ascontiguousarray(values).tobytes()
    return copy


def _inline_external(model: onnx.ModelProto, store: TensorStore) -> None:
    """Move every external tensor's values into the protobuf, in place.

    Values come from the files (the store's pending rewrites are keyed by the original
    tensors, so call this on a copy only before any pass has rewritten weights)."""
    for tensor in iter_tensors(model.graph):
        if external_info(tensor) is not None:
            values = store.read(tensor)
            tensor.ClearField("external_data")
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = np.ascontiguousarray(values).tobytes()


def iter_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and Constant-node tensors, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_tensors(g)


def values_bytes(graph: onnx.GraphProto) -> int:
    """Bytes of every tensor value in the graph, inline or external, from dims and dtypes (nothing read)."""
    return sum(math.prod(t.dims) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in iter_tensors(graph) if _has_values(t))


def _has_values(tensor: onnx.TensorProto) -> bool:
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return False
    return external_info(tensor) is not None or math.prod(tensor.dims) > 0


def _point_to(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    for field in ("raw_data", "float_data", "int32_data", "double_data", "int64_data",
                  "uint64_data", "external_data"):
        tensor.ClearField(field)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
