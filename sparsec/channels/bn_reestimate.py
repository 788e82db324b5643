"""BatchNorm re-estimation after pruning (adaptive BN): the statistics a BatchNormalization normalises
by were measured on the dense network; the pruned network feeds it another distribution.

An unfused BatchNormalization gets the mean and population variance of its input measured on the
pruned graph (its upstream BatchNorms already re-estimated), which is what a training-mode pass over
the calibration data would store with momentum 0. Where the BatchNorm was folded into its producer,
the equivalent correction is a per-channel affine map of the producer's output, y' = a·y + b, chosen
so that its mean and standard deviation match the dense model's (scale the filter and the bias by a,
then add b). Both rewrite values only: shapes and the N:M pattern (zeros scale to zeros) stay."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from sparsec.core.graph_index import GraphIndex
from sparsec.core.names import FreshNames
from sparsec.core.op_table import attr, weight_axes
from sparsec.core.tensors import TensorStore
from sparsec.runtime.moments import Moments


def unfused_batchnorms(graph: onnx.GraphProto) -> tuple[list[onnx.NodeProto], list[tuple[str, str]]]:
    """BatchNormalizations whose statistics can be re-estimated, and (name, reason) for the others."""
    index = GraphIndex(graph)
    ok, kept = [], []
    for i, node in enumerate(n for n in graph.node if n.op_type == "BatchNormalization"):
        name = node.name or f"BatchNormalization_{i}"
        if int(attr(node, "training_mode", 0)):
            kept.append((name, "training mode: it normalises by batch statistics"))
        elif int(attr(node, "spatial", 1)) == 0:
            kept.append((name, "per-activation statistics (spatial=0)"))
        elif len(node.input) < 5 or any(index.stored_tensor(n) is None for n in node.input[3:5]):
            kept.append((name, "its running mean or variance is not a constant"))
        else:
            ok.append(node)
    return ok, kept


def reestimate(graph: onnx.GraphProto, store: TensorStore, bn: onnx.NodeProto, measured: Moments,
               dense: Moments | None = None) -> dict:
    """Write new running statistics into `bn` (a new initializer where the old one is shared); returns
    the report row: how far they moved. Without `dense`: the input mean and variance measured on the
    pruned graph (adaptive BN). With `dense` (the same input measured on the dense graph): the stored
    statistics moved by what pruning changed, as if the input were first mapped affinely to the dense
    mean m_d and deviation (x − m_p)·ρ⁻¹ + m_d, ρ = sqrt(v_p/v_d): μ' = m_p + (μ − m_d)·ρ and
    σ'² = (σ² + ε)·ρ² − ε. That is the folded case's affine match, and it keeps the model intact where
    the calibration data is not distributed like the training data (few samples, say)."""
    index = GraphIndex(graph)
    names = FreshNames(graph)
    row = {"batchnorm": bn.name, "mode": "measured" if dense is None else "matched"}
    stored = [np.asarray(store.read(index.stored_tensor(bn.input[k])), dtype=np.float64) for k in (3, 4)]
    if dense is None:
        targets = (measured.mean, measured.var)
    else:
        rho = np.sqrt(np.where(dense.var > 1e-12, measured.var / np.maximum(dense.var, 1e-12), 1.0))
        eps = float(attr(bn, "epsilon", 1e-5))
        targets = (measured.mean + (stored[0] - dense.mean) * rho,
                   np.maximum((stored[1] + eps) * rho ** 2 - eps, 0.0))
    for k, key, values, old in ((3, "mean", targets[0], stored[0]), (4, "var", targets[1], stored[1])):
        tensor = index.stored_tensor(bn.input[k])
        row[f"{key}_shift"] = float(np.abs(values - old).max()) if old.shape == values.shape else None
        # an initializer or Constant node read by this BN alone is rewritten in place (no dead copy left)
        private = len(index.consumers.get(bn.input[k], [])) == 1 and bn.input[k] not in index.graph_inputs
        new = values.astype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
        if private and old.shape == values.shape:
            store.write(tensor, new)
        else:
            name = names(f"{bn.name or 'bn'}.{key}_reestimated")
            graph.initializer.append(numpy_helper.from_array(new, name))
            bn.input[k] = name
    return row


def affine_match(dense: Moments, pruned: Moments, floor: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) per channel with a·y + b matching the dense mean and standard deviation; a = 1 where the
    pruned output is (near) constant, where no scale can restore a spread."""
    a = np.where(pruned.var > floor, np.sqrt(dense.var / np.maximum(pruned.var, floor)), 1.0)
    return a, dense.mean - a * pruned.mean


def scale_filters(graph: onnx.GraphProto, store: TensorStore, node: onnx.NodeProto,
                  a: np.ndarray) -> str | None:
    """Scale output channel c of a Conv's filter and bias by a[c]; the reason when it cannot (a weight
    or bias that is shared, reached through other ops, or quantized)."""
    if node.op_type != "Conv":
        return f"{node.op_type} is not a Conv"
    index = GraphIndex(graph)
    inputs = [node.input[1]] + ([node.input[2]] if len(node.input) > 2 and node.input[2] else [])
    tensors = []
    for name in inputs:
        tensor = index.initializers.get(name)
        if tensor is None or len(index.consumers.get(name, [])) != 1 or name in index.graph_inputs:
            return f"{name} is not an initializer read by {node.name} alone"
        if not np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type), np.floating):
            return f"{name} is not a float tensor"
        tensors.append(tensor)
    assert weight_axes(node).output == 0
    for tensor in tensors:
        old = store.read(tensor)
        shape = (-1,) + (1,) * (old.ndim - 1)
        store.write(tensor, (old.astype(np.float64) * a.reshape(shape)).astype(old.dtype))
    return None
