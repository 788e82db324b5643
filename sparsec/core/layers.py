"""Which layers carry a prunable constant weight, and along which axes it reduces.

Pure analysis: returns frozen data, never edits the graph.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import onnx

from sparsec.core.graph_index import GraphIndex, WeightSource, _attr, effective_shape, stored_axis

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Ops that multiply integer weights directly: no DequantizeLinear says what "zero" is to them
# in a form sparsec rewrites, so they are listed as skipped.
INTEGER_OPS = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLSTM",
               "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")
INTEGER_REASON = ("integer op {op}: sparsec prunes float weights and QDQ weights (DequantizeLinear "
                  "before Conv/Gemm/MatMul); prune the float model before quantizing, or quantize "
                  "with QuantFormat.QDQ")


@dataclass(frozen=True)
class Layer:
    """One node with a constant weight, described in the weight's own layout."""

    name: str
    op: str
    node_index: int
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
    """Find every Conv/ConvTranspose/Gemm/MatMul whose weight is a constant."""
    index = GraphIndex(model.graph)
    found: list[Layer] = []
    skipped: list[Skipped] = []
    for i, node in enumerate(model.graph.node):
        if node.op_type in ("If", "Loop", "Scan"):
            skipped += _subgraph_layers(node, node_display_name(node, i), set(index.initializers))
        if node.op_type in INTEGER_OPS:
            weight = next((n for n in node.input[1:] if n in index.initializers), "")
            skipped.append(Skipped(node_display_name(node, i), node.op_type, weight,
                                   INTEGER_REASON.format(op=node.op_type), "integer op"))
        if node.op_type not in WEIGHT_OPS:
            continue
        if node.op_type in ("Conv", "ConvTranspose") and _reads_constant_map(index, node):
            skipped.append(Skipped(node_display_name(node, i), node.op_type, node.input[1],
                                   "reads a constant map (a border correction): nothing to prune",
                                   "constant input"))
            continue
        overridable = [x for x in node.input[:2] if x in index.initializers and x in index.graph_inputs]
        if overridable:
            skipped.append(Skipped(node_display_name(node, i), node.op_type, overridable[0],
                                   f"weight {overridable[0]} is also a graph input: a caller may feed "
                                   "another value, so its initializer is only a default", "graph input"))
            continue
        layer, reason = _describe(node, i, index)
        if layer is not None:
            found.append(layer)
        elif reason is not None:
            skipped.append(Skipped(node_display_name(node, i), node.op_type, "", reason, "not prunable"))
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
                if inner.op_type in WEIGHT_OPS:
                    weight = next((x for x in inner.input[:2] if x in consts), "")
                    found.append(Skipped(name, inner.op_type, weight, f"inside {node.op_type} {where}'s "
                                         "subgraph: layers in If/Loop/Scan subgraphs stay dense", "subgraph"))
                if inner.op_type in ("If", "Loop", "Scan"):
                    found += _subgraph_layers(inner, name, consts)
    return found


def _describe(node: onnx.NodeProto, i: int, index: GraphIndex):
    op, name = node.op_type, node_display_name(node, i)
    if op in ("Conv", "ConvTranspose"):
        src = index.resolve(node.input[1], quantized=True) if len(node.input) > 1 else None
        if src is None:
            return None, "weight is not a constant"
        shape = effective_shape(src)
        if len(shape) < 3:
            return None, f"weight rank {len(shape)} is not a convolution kernel"
        groups = int(_attr(node, "group") or 1)
        red, out = (1, 0) if op == "Conv" else (0, 1)
        return Layer(name, op, i, src, 1, shape, red, out, groups), None
    if op == "Gemm":
        b = index.resolve(node.input[1], quantized=True)
        a = index.resolve(node.input[0], quantized=True) if b is None else None
        src, idx = (b, 1) if b is not None else (a, 0)
        if src is None:
            return None, None  # activation x activation: nothing to prune
        trans = int(_attr(node, "transB" if idx == 1 else "transA") or 0)
        red, out = ((1, 0) if trans else (0, 1)) if idx == 1 else ((0, 1) if trans else (1, 0))
        return _two_d(name, i, op, src, idx, red, out)
    b = index.resolve(node.input[1], quantized=True)
    a = index.resolve(node.input[0], quantized=True)
    if a is not None and b is not None:
        return None, "both MatMul operands are constant (fold it first)"
    if b is not None:
        return _two_d(name, i, op, b, 1, 0, 1)
    if a is not None:
        return _two_d(name, i, op, a, 0, 1, 0)
    return None, None


def _two_d(name: str, i: int, op: str, src: WeightSource, idx: int, red: int, out: int):
    shape = effective_shape(src)
    if len(shape) != 2:
        return None, f"{op} weight has rank {len(shape)}; only 2-D weights are pruned"
    return Layer(name, op, i, src, idx, shape, red, out), None


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
