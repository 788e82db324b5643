"""Which layers carry a prunable constant weight, and along which axes it reduces.

Pure analysis: returns frozen data, never edits the graph.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import onnx

from sparsec.core.graph_index import GraphIndex, WeightSource, effective_shape, stored_axis
from sparsec.core.names import node_ids
from sparsec.core.op_table import WEIGHT_OPS, weight_op

INTEGER_REASON = ("integer op {op}: sparsec prunes float weights and QDQ weights (DequantizeLinear "
                  "before Conv/Gemm/MatMul); prune the float model before quantizing, or quantize "
                  "with QuantFormat.QDQ")


@dataclass(frozen=True)
class Layer:
    """One node with a constant weight, described in the weight's own layout."""

    name: str  # the node's id (`core.names.node_ids`): its name, or a unique one for an unnamed node
    op: str
    node_index: int  # position in the analysed graph: valid only for that graph, read it there
    source: WeightSource
    input_index: int
    shape: tuple[int, ...]  # the weight as the node sees it
    reduction_axis: int  # axis summed over (TensorRT's sparsity axis)
    output_axis: int  # axis of the output channels
    groups: int = 1

    @property
    def weight(self) -> str:
        return self.source.key

    @property
    def params(self) -> int:
        return math.prod(self.shape)

    @property
    def reduction_dim(self) -> int:
        return self.shape[self.reduction_axis]


@dataclass(frozen=True)
class Skipped:
    """A layer left untouched, and why."""

    name: str
    op: str
    weight: str
    reason: str
    kind: str = "other"  # short class of the reason, for the one-line summary


@dataclass(frozen=True)
class LayerAnalysis:
    layers: tuple[Layer, ...]
    skipped: tuple[Skipped, ...]

    def by_weight(self) -> dict[str, list[Layer]]:
        """Layers grouped by the stored weight they share (one entry per weight)."""
        groups: dict[str, list[Layer]] = defaultdict(list)
        for layer in self.layers:
            groups[layer.weight].append(layer)
        return dict(groups)


def node_display_name(node: onnx.NodeProto, index: int) -> str:
    """Exporters may leave names empty; reports still need one."""
    return node.name or f"{node.op_type}_{index}"


def find_layers(model: onnx.ModelProto) -> LayerAnalysis:
    """Find every node of a weight op (`core.op_table.WEIGHT_OPS`) whose weight is a constant."""
    index = GraphIndex(model.graph)
    ids = node_ids(model.graph)
    found: list[Layer] = []
    skipped: list[Skipped] = []
    for i, node in enumerate(model.graph.node):
        if node.op_type in ("If", "Loop", "Scan"):
            skipped += _subgraph_layers(node, ids[i], set(index.initializers))
        entry = WEIGHT_OPS.get(node.op_type)
        if entry is not None and entry.integer:
            weight = next((n for n in node.input[1:] if n in index.initializers), "")
            skipped.append(Skipped(ids[i], node.op_type, weight,
                                   INTEGER_REASON.format(op=node.op_type), "integer op"))
        spec = weight_op(node.op_type)
        if spec is None:
            continue
        if spec.kernel and _reads_constant_map(index, node):
            skipped.append(Skipped(ids[i], node.op_type, node.input[1],
                                   "reads a constant map (a border correction): nothing to prune",
                                   "constant input"))
            continue
        overridable = [node.input[k] for k in sorted(spec.inputs) if k < len(node.input)
                       and node.input[k] in index.initializers and node.input[k] in index.graph_inputs]
        if overridable:
            skipped.append(Skipped(ids[i], node.op_type, overridable[0],
                                   f"weight {overridable[0]} is also a graph input: a caller may feed "
                                   "another value, so its initializer is only a default", "graph input"))
            continue
        layer, reason = _describe(node, i, ids[i], index)
        if layer is not None:
            found.append(layer)
        elif reason is not None:
            skipped.append(Skipped(ids[i], node.op_type, "", reason, "not prunable"))
    layers, shared_skips = _check_sharing(found, index)
    return LayerAnalysis(tuple(layers), tuple(skipped + shared_skips))


def _reads_constant_map(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """A Conv over ConstantOfShape: the border correction channel compensation adds."""
    producer = index.producer.get(node.input[0])
    return producer is not None and producer.op_type == "ConstantOfShape"


def _subgraph_layers(node: onnx.NodeProto, where: str, outer: set[str]) -> list[Skipped]:
    """Every weight layer inside an If/Loop/Scan body (nested ones included), listed as left dense:
    the tensor store and the passes rewrite the main graph only."""
    found: list[Skipped] = []
    for attr in node.attribute:
        for body in [attr.g] * (attr.type == onnx.AttributeProto.GRAPH) + list(attr.graphs):
            consts = outer | {t.name for t in body.initializer}
            consts |= {n.output[0] for n in body.node if n.op_type == "Constant"}
            for j, inner in enumerate(body.node):
                name = f"{where}/{node_display_name(inner, j)}"
                spec = weight_op(inner.op_type)
                if spec is not None:
                    weight = next((inner.input[k] for k in sorted(spec.inputs)
                                   if k < len(inner.input) and inner.input[k] in consts), "")
                    found.append(Skipped(name, inner.op_type, weight, f"inside {node.op_type} {where}'s "
                                         "subgraph: layers in If/Loop/Scan subgraphs stay dense", "subgraph"))
                if inner.op_type in ("If", "Loop", "Scan"):
                    found += _subgraph_layers(inner, name, consts)
    return found


def _describe(node: onnx.NodeProto, i: int, name: str, index: GraphIndex):
    """The layer `node` is, read from its op table entry: the first weight input holding a constant."""
    spec = weight_op(node.op_type)
    assert spec is not None and spec.axes is not None
    found = [(k, index.resolve(node.input[k], quantized=True)) for k in spec.inputs if k < len(node.input)]
    found = [(k, src) for k, src in found if src is not None]
    if not found:
        return None, "weight is not a constant" if spec.kernel else None  # activation x activation
    if spec.both_constant and len(found) > 1:
        return None, spec.both_constant
    k, src = found[0]
    axes = spec.axes(node, k)
    shape = effective_shape(src)
    if spec.kernel and len(shape) < 3:
        return None, f"weight rank {len(shape)} is not a convolution kernel"
    if not spec.kernel and len(shape) != 2:
        return None, f"{node.op_type} weight has rank {len(shape)}; only 2-D weights are pruned"
    return Layer(name, node.op_type, i, src, k, shape, axes.reduction, axes.output, axes.groups), None


def _check_sharing(layers: list[Layer], index: GraphIndex):
    """A weight is pruned once for all its users, or left alone if they disagree."""
    by_weight: dict[str, list[Layer]] = defaultdict(list)
    for layer in layers:
        by_weight[layer.weight].append(layer)
    kept: list[Layer] = []
    skipped: list[Skipped] = []
    for key, users in by_weight.items():
        reason = _sharing_problem(key, users, index)
        if reason is None:
            kept.extend(users)
        else:
            skipped.extend(Skipped(u.name, u.op, key, reason, "shared") for u in users)
    return kept, skipped


def _layout(u: Layer) -> tuple:
    """What pruning a shared weight once depends on: the stored axes each user reduces and
    outputs along, and how it is dequantized. Identity and Cast steps do not change it."""
    src = u.source
    return (u.shape, stored_axis(src, u.reduction_axis), stored_axis(src, u.output_axis), u.groups,
            src.dequant)


def _sharing_problem(key: str, users: list[Layer], index: GraphIndex) -> str | None:
    layouts = {_layout(u) for u in users}
    if len(layouts) > 1:
        names = ", ".join(f"{u.name} ({u.op})" for u in users)
        return f"weight {key} is shared by {names} with different layouts"
    allowed = {u.node_index for u in users} | {s.node_index for u in users for s in u.source.steps}
    for u in users:
        for tensor in u.source.tensors:
            if tensor in index.graph_outputs:
                return f"weight {key} is also a graph output ({tensor})"
            if tensor in index.subgraph_uses:
                return f"weight {key} is also used inside {index.subgraph_uses[tensor]}'s subgraph"
            for consumer in index.consumers.get(tensor, []):
                if index.position[id(consumer)] not in allowed:
                    cname = consumer.name or consumer.op_type
                    return f"weight {key} also feeds {cname} ({consumer.op_type}), which is not pruned"
    return None
