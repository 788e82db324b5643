"""fp16/bf16 conversion of a model whose weights live in external data, one weight at a time.

onnxconverter-common converts weights inside the protobuf, so a 4 GB model would be copied whole
two or three times. Instead the graph is converted with each external tensor replaced by a
placeholder that keeps its name, shape and dtype (the converter inserts the same Casts and blocks
the same ops, and retypes the placeholders it lowers), then each lowered weight is read through the
TensorStore, rounded exactly as the converter would, and spilled to a temporary file that the store
streams from when the model is saved. Peak memory: the graph plus about one weight.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx

from sparsec.core.tensors import TensorStore, external_info, iter_tensors
from sparsec.runtime.converter_fixes import PLACEHOLDER
from sparsec.runtime.precision import check_converted, convert_precision


def convert_external(model: onnx.ModelProto, store: TensorStore, precision: str) -> onnx.ModelProto:
    """The fp16/bf16 conversion of ``model`` (equal to ``convert_precision`` of its inlined copy);
    external tensors of the result are rewritten in ``store`` and ``model``'s pending rewrites dropped."""
    light = onnx.ModelProto()
    light.CopyFrom(model)  # external tensors carry no values: this copies the graph only
    originals = []
    for original, tensor in zip(iter_tensors(model.graph), iter_tensors(light.graph), strict=True):
        if external_info(original) is not None:
            del tensor.external_data[:]
            for key, value in (("location", PLACEHOLDER), ("offset", str(len(originals)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            originals.append(original)
    out = convert_precision(light, precision, check=False)
    _check(out, precision)
    spill = _Spill()
    for tensor in iter_tensors(out.graph):
        info = external_info(tensor)
        if info is None or info.get("location") != PLACEHOLDER:
            continue
        original = originals[int(info["offset"])]
        del tensor.external_data[:]
        tensor.external_data.extend(original.external_data)
        if tensor.data_type != original.data_type:  # lowered by the converter
            store.write(tensor, spill.put(_lower(store.read(original), precision)))
        elif not store.on_disk(original):
            store.write(tensor, store.read(original))
    for original in originals:
        store.forget(original)
    return out


def _check(out: onnx.ModelProto, precision: str) -> None:
    """The checker on the converted graph: it wants each external file to exist, so the graph is
    checked from a temporary folder holding an empty placeholder file (values are not checked)."""
    with tempfile.TemporaryDirectory(prefix="sparsec-check-") as tmp:
        (Path(tmp) / PLACEHOLDER).touch()
        onnx.save(out, Path(tmp) / "model.onnx")
        check_converted(str(Path(tmp) / "model.onnx"), precision)


def _lower(values: np.ndarray, precision: str) -> np.ndarray:
    """fp16: onnxconverter-common's clamp to [1e-7, 1e4] in magnitude (zeros stay zero); bf16: ml_dtypes
    round-to-nearest-even from the fp32 values, as convert_precision does."""
    if precision == "fp16":  # convert_np_to_float16(values, 1e-7, 1e4) without its eight np.where passes
        out = np.array(values, dtype=np.float32)
        mag = np.abs(out)
        np.copyto(out, np.copysign(np.float32(1e-7), out), where=(mag > 0) & (mag < np.float32(1e-7)))
        np.copyto(out, np.copysign(np.float32(1e4), out), where=(mag > np.float32(1e4)) & np.isfinite(mag))
        return out.astype(np.float16)
    return np.asarray(values, dtype=np.float32).astype(ml_dtypes.bfloat16)


class _Spill:
    """An unlinked temporary file holding converted weights; each comes back as a read-only memmap,
    so they wait for the save on disk rather than in memory."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="sparsec-precision-")
        self._end = 0

    def put(self, values: np.ndarray) -> np.ndarray:
        if values.size == 0:
            return values
        values = np.ascontiguousarray(values)
        self._file.seek(self._end)
        self._file.write(values.reshape(-1).view(np.uint8).data)  # bfloat16 has no buffer format
        self._file.flush()
        mapped = np.memmap(self._file, dtype=values.dtype, mode="r", offset=self._end, shape=values.shape)
        self._end += -(-values.nbytes // 64) * 64
        return mapped

