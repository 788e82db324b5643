"""Bias correction: give a pruned layer back the per-channel output mean of the dense model.

Pruning W to Ŵ moves a layer's output mean by (W − Ŵ)·E[X]. Measuring the output mean per channel on
the dense graph and on the pruned graph (upstream layers already corrected) and adding the difference to
the bias is that correction, exact in expectation: for a single linear layer the difference is exactly
(W − Ŵ)·E[X]. For a Conv the output mean is taken over every output position, so zero padding is
accounted for on average (a border pixel's own shift differs; one bias per channel cannot hold that).
Measured after the layers before it were corrected, the shift also absorbs their remaining drift
(empirical bias correction, Nagel et al. 2019). This module only folds a known shift into the graph."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sparsec.core.graph_index import GraphIndex
from sparsec.core.names import FreshNames
from sparsec.core.op_table import attr, weight_axes
from sparsec.core.tensors import TensorStore


def bias_shape(node: onnx.NodeProto, rank: int, channels: int, into_bias: bool = False) -> tuple[int, ...]:
    """The shape that adds one value per output channel to the node's output (trailing broadcast);
    `into_bias`: as the node's own bias input (a Conv's B is [C])."""
    axes = weight_axes(node)
    if into_bias and node.op_type in ("Conv", "ConvTranspose"):
        return (channels,)
    pos = axes.out_axis % rank
    return (channels,) + (1,) * (rank - 1 - pos)


def _exclusive(index: GraphIndex, name: str) -> onnx.TensorProto | None:
    """The plain initializer `name` when only one node reads it and nothing else can see it."""
    tensor = index.initializers.get(name)
    if tensor is None or name in index.graph_inputs | index.graph_outputs or name in index.subgraph_uses:
        return None
    return tensor if len(index.consumers.get(name, [])) == 1 else None


def fold_shift(graph: onnx.GraphProto, store: TensorStore, node: onnx.NodeProto, shift: np.ndarray,
               rank: int, dtype: np.dtype) -> str:
    """Add `shift` (one value per output channel) to the node's output; return where it went:
    `bias` (its own bias input), `new bias` (a bias input created), `add` (the constant of the Add that
    follows a MatMul) or `new add` (an Add inserted after the node, keeping the output name)."""
    index = GraphIndex(graph)
    names = FreshNames(graph)
    axes = weight_axes(node)
    shape = bias_shape(node, rank, shift.size)
    k = axes.bias
    beta = float(attr(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
    if k is not None and beta != 0.0:
        values = (shift / beta).reshape(bias_shape(node, rank, shift.size, into_bias=True))
        if len(node.input) > k and node.input[k]:
            tensor = _exclusive(index, node.input[k])
            if tensor is not None and _add_into(store, tensor, values):
                return "bias"
        else:
            name = names(f"{node.name or node.op_type}.bias_corrected")
            graph.initializer.append(numpy_helper.from_array(values.astype(dtype), name))
            node.input.extend([""] * (k + 1 - len(node.input)))
            node.input[k] = name
            return "new bias"
    out = node.output[0]
    users = index.consumers.get(out, [])
    if len(users) == 1 and users[0].op_type == "Add" and out not in index.graph_outputs:
        other = [i for i in users[0].input if i != out]
        tensor = _exclusive(index, other[0]) if len(other) == 1 else None
        if tensor is not None and _add_into(store, tensor, shift.reshape(shape)):
            return "add"
    _insert_add(graph, node, shift.reshape(shape).astype(dtype), names)
    return "new add"


def _add_into(store: TensorStore, tensor: onnx.TensorProto, values: np.ndarray) -> bool:
    """tensor += values when the sum keeps the tensor's shape (else the caller adds elsewhere)."""
    old = store.read(tensor)
    try:
        new = old.astype(np.float64) + values
    except ValueError:
        return False
    if new.shape != old.shape or not np.issubdtype(old.dtype, np.floating):
        return False
    store.write(tensor, new.astype(old.dtype))
    return True


def _insert_add(graph: onnx.GraphProto, node: onnx.NodeProto, values: np.ndarray, names: FreshNames) -> None:
    """node → Add(shift) under the node's old output name, so every reader sees the corrected value."""
    out = node.output[0]
    const = names(f"{node.name or node.op_type}.bias_corrected")
    graph.initializer.append(numpy_helper.from_array(values, const))
    node.output[0] = names(f"{out}__before_bias_correction")
    add = helper.make_node("Add", [node.output[0], const], [out],
                           name=names(f"{node.name or 'node'}_bias_add"))
    nodes = list(graph.node)
    at = next(i for i, n in enumerate(nodes) if n.output and n.output[0] == node.output[0])
    nodes.insert(at + 1, add)
    del graph.node[:]
    graph.node.extend(nodes)
