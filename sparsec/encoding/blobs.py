"""Encoded weight blobs of a compile: the container, the skeleton, and the way back.

`weights.sparsec` holds every pruned weight in its smallest encoding; `skeleton.onnx` is
`model.onnx` with those weights' bytes left out. `restore` puts them back, and the result
serialises to exactly the bytes of `model.onnx`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from sparsec.core.graph_index import GraphIndex, stored_axis
from sparsec.core.output import CONTAINER, SKELETON
from sparsec.core.tensors import TensorStore
from sparsec.encoding.codec import FORMATS, candidate_sizes, choose, formula_estimates
from sparsec.encoding.container import read_container, write_container
from sparsec.errors import SparsecError

CONSTANT_PREFIX = "constant:"  # Constant-node tensors are keyed by the node's output name


def encode_weights(model: onnx.ModelProto, store: TensorStore, layers: list, nm, force: str,
                   rle_bits: int) -> tuple[dict, list[dict]]:
    """Choose and build the encoding of each pruned weight; report every candidate's size."""
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
        try:
            enc = choose(values, nm=pattern, rle_bits=rle_bits, force=None if force == "auto" else force)
        except ValueError as exc:
            raise SparsecError(f"--encode {force} does not apply to {layer.weight}: {exc}") from None
        blobs[key] = enc
        rows.append({"tensor": key, "format": enc.format, "bytes": enc.nbytes, "dense_bytes": values.nbytes,
                     "candidates": candidate_sizes(values, nm=pattern, rle_bits=rle_bits),
                     "formula": formula_estimates(values, FORMATS, nm=pattern, rle_bits=rle_bits)})
    return blobs, rows


def write_outputs(model: onnx.ModelProto, blobs: dict, outdir: Path) -> None:
    """The container, and the skeleton: the model without the encoded tensors' bytes."""
    write_container(outdir / CONTAINER, blobs)
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    for key, tensor in _named_tensors(skeleton).items():
        if key in blobs:
            tensor.ClearField("raw_data")
    with open(outdir / SKELETON, "wb") as f:
        f.write(skeleton.SerializeToString())


def restore(outdir: str | Path) -> onnx.ModelProto:
    """Rebuild `model.onnx` from the skeleton and the container."""
    outdir = Path(outdir)
    if not (outdir / SKELETON).is_file() or not (outdir / CONTAINER).is_file():
        raise SparsecError(f"{outdir} has no {SKELETON} and {CONTAINER}",
                           "compile with --encode auto (the default) first")
    model = onnx.load(str(outdir / SKELETON), load_external_data=False)
    values = read_container(outdir / CONTAINER)
    tensors = _named_tensors(model)
    for key, array in values.items():
        if key not in tensors:
            raise SparsecError(f"{CONTAINER} holds {key!r}, which {SKELETON} does not have")
        tensors[key].raw_data = np.ascontiguousarray(array).tobytes()
    return model


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
