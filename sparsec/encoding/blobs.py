"""Encoded weight blobs of a compile: the container, the skeleton, and the way back.

`weights.sparsec` holds every pruned weight in its smallest encoding; `skeleton.onnx` is
`model.onnx` with those weights' bytes left out (for an external-data model, with its own
skeleton.onnx.data holding the rest). `restore` puts them back, and the result serialises to exactly
the bytes of `model.onnx`; `restore_to` streams a large one tensor by tensor into external data.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from sparsec.core.graph import TWO_GB
from sparsec.core.graph_index import GraphIndex, stored_axis
from sparsec.core.output import CONTAINER, SKELETON, SKELETON_DATA
from sparsec.core.tensors import TensorStore, external_info, iter_tensors, write_aligned
from sparsec.encoding.codec import FORMATS, Encoded, candidate_sizes, choose, formula_estimates
from sparsec.encoding.container import iter_container, read_manifest, stream_container
from sparsec.errors import SparsecError

CONSTANT_PREFIX = "constant:"  # Constant-node tensors are keyed by the node's output name


@dataclass(frozen=True)
class Planned:
    """One weight's chosen encoding, built only when the container is written (one at a time)."""

    tensor: onnx.TensorProto
    format: str
    nm: tuple[int, int, int] | None
    rle_bits: int
    nbytes: int

    def encode(self, store: TensorStore) -> Encoded:
        values = np.asarray(store.read(self.tensor))
        enc = choose(values, nm=self.nm, rle_bits=self.rle_bits, force=self.format)
        if enc.nbytes != self.nbytes:  # the size formulas are part of the format: never let them drift
            raise AssertionError(f"{self.format}: computed size {self.nbytes} but encoded {enc.nbytes} bytes")
        return enc


def encode_weights(model: onnx.ModelProto, store: TensorStore, layers: list, nm, force: str,
                   rle_bits: int) -> tuple[dict[str, Planned], list[dict]]:
    """Choose the encoding of each pruned weight from exact sizes; report every candidate's size."""
    index = GraphIndex(model.graph)
    blobs, rows = {}, []
    seen = set()
    for layer in layers:
        if layer.weight in seen:
            continue
        seen.add(layer.weight)
        tensor = index.constant(layer.source)
        values = np.asarray(store.read(tensor))
        key = layer.weight if layer.source.storage == "initializer" else CONSTANT_PREFIX + layer.weight
        pattern = (nm.n, nm.m, stored_axis(layer.source, layer.reduction_axis)) if nm else None
        sizes = candidate_sizes(values, nm=pattern, rle_bits=rle_bits)
        if force == "auto":
            fmt = min(sizes, key=lambda f: (sizes[f], FORMATS.index(f)))
            nbytes = sizes[fmt]
        else:
            try:  # a forced format that does not apply fails here, before anything is written
                fmt, nbytes = force, choose(values, nm=pattern, rle_bits=rle_bits, force=force).nbytes
            except ValueError as exc:
                raise SparsecError(f"--encode {force} does not apply to {layer.weight}: {exc}") from None
        blobs[key] = Planned(tensor, fmt, pattern, rle_bits, nbytes)
        rows.append({"tensor": key, "format": fmt, "bytes": nbytes, "dense_bytes": values.nbytes,
                     "candidates": sizes,
                     "formula": formula_estimates(values, FORMATS, nm=pattern, rle_bits=rle_bits)})
    return blobs, rows


def write_outputs(model: onnx.ModelProto, store: TensorStore, blobs: dict[str, Planned], outdir: Path,
                  external: bool = False) -> None:
    """The container, streamed, and the skeleton: the model without the encoded tensors' bytes.

    With external data (`external`, or values already on disk, or past 2 GB) the skeleton's other
    tensors go to skeleton.onnx.data, so the skeleton ships without the encoded weights' bytes."""
    stream_container(outdir / CONTAINER, ((k, b.encode(store)) for k, b in blobs.items()))
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    named = _named_tensors(skeleton)
    encoded_ids = {id(named[k]) for k in blobs if k in named}
    skip = frozenset(i for i, t in enumerate(iter_tensors(skeleton.graph)) if id(t) in encoded_ids)
    for key in blobs:
        if key in named:
            _clear_values(named[key])
    if external or store.has_external(model) or model.ByteSize() >= TWO_GB:
        store.write_external_copy(model, skeleton, outdir / SKELETON_DATA, skip)
    with open(outdir / SKELETON, "wb") as f:
        f.write(skeleton.SerializeToString())


def restore(outdir: str | Path) -> onnx.ModelProto:
    """Rebuild `model.onnx` from the skeleton and the container, in memory (under 2 GB)."""
    outdir = Path(outdir)
    model = _skeleton(outdir)
    if any(external_info(t) is not None for t in iter_tensors(model.graph)):
        onnx.external_data_helper.load_external_data_for_model(model, str(outdir))
    tensors = _named_tensors(model)
    for key, array in iter_container(outdir / CONTAINER):
        _check_key(key, tensors)
        tensors[key].raw_data = np.ascontiguousarray(array).tobytes()
    if model.ByteSize() >= TWO_GB:
        raise SparsecError(f"the model rebuilt from {outdir} passes 2 GB",
                           "use sparsec decode OUTDIR -o FILE, which writes external data")
    return model


def restore_to(outdir: str | Path, output: str | Path) -> Path:
    """Write the model rebuilt from OUTDIR to `output`: in one file like `restore`, or, when the
    skeleton has external data or the model passes 2 GB, with `output`.data beside it, streamed
    tensor by tensor (64-byte aligned, the placement model.onnx had)."""
    outdir, out = Path(outdir), Path(output)
    model = _skeleton(outdir)
    store = TensorStore(outdir)
    tensors = _named_tensors(model)
    sizes = {e["name"]: math.prod(e["shape"]) * np.dtype(e["dtype"]).itemsize
             for e in read_manifest(outdir / CONTAINER)}
    for key in sizes:
        _check_key(key, tensors)
    if not store.has_external(model) and model.ByteSize() + sum(sizes.values()) < TWO_GB:
        data = restore(outdir).SerializeToString()
        _atomic(out, lambda tmp: tmp.write_bytes(data))
        return out
    by_id = {id(t): k for k, t in tensors.items()}

    def items() -> Iterator[tuple[onnx.TensorProto, np.ndarray]]:
        for tensor in iter_tensors(model.graph):
            key = by_id.get(id(tensor))
            if key in sizes:
                yield tensor, next(iter(iter_container(outdir / CONTAINER, names=[key])))[1]
            elif external_info(tensor) is not None:
                yield tensor, store.read(tensor)

    data_path = out.with_name(out.name + ".data")
    write_aligned(items(), data_path)
    _atomic(out, lambda tmp: tmp.write_bytes(model.SerializeToString()))
    return out


def _skeleton(outdir: Path) -> onnx.ModelProto:
    if not (outdir / SKELETON).is_file() or not (outdir / CONTAINER).is_file():
        raise SparsecError(f"{outdir} has no {SKELETON} and {CONTAINER}",
                           "compile with --encode auto (the default) first")
    return onnx.load(str(outdir / SKELETON), load_external_data=False)


def _check_key(key: str, tensors: dict) -> None:
    if key not in tensors:
        raise SparsecError(f"{CONTAINER} holds {key!r}, which {SKELETON} does not have")


def _atomic(out: Path, write) -> None:
    tmp = out.with_name(f".{out.name}.tmp")
    write(tmp)
    tmp.replace(out)


def _clear_values(tensor: onnx.TensorProto) -> None:
    tensor.ClearField("raw_data")
    if external_info(tensor) is not None:  # proto2: setting the default would serialise the field
        tensor.ClearField("external_data")
        tensor.ClearField("data_location")


def _named_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    out = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[CONSTANT_PREFIX + node.output[0]] = attr.t
    return out


def to_sparse_initializers(model: onnx.ModelProto, store: TensorStore, names: set[str]) -> list[str]:
    """Move pruned weight initializers into graph.sparse_initializer (COO, flat int64 indices).

    onnxruntime densifies them when it loads the model; TensorRT's parser does not read them.
    A pruned value is +0.0; anything else (-0.0 and NaN included) is stored as a value.
    """
    moved = []
    keep = []
    for tensor in model.graph.initializer:
        if tensor.name not in names:
            keep.append(tensor)
            continue
        values = np.asarray(store.read(tensor))
        bits = values.view(f"u{values.dtype.itemsize}").ravel()
        flat = np.flatnonzero(bits)
        dense_values = values.ravel()[flat]
        value_tensor = onnx.numpy_helper.from_array(dense_values, tensor.name)
        index_tensor = onnx.numpy_helper.from_array(flat.astype(np.int64), f"{tensor.name}__indices")
        model.graph.sparse_initializer.append(helper.make_sparse_tensor(value_tensor, index_tensor,
                                                                        list(values.shape)))
        moved.append(tensor.name)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return moved
