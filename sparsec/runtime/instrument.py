"""Append reducers to a copy of the graph so onnxruntime returns statistics, not activations.

For each prunable layer input X with channel axis c (the axis its weight reduces over):
  sum of squares per channel  ReduceSumSquare(X, all axes but c)       -> [K]   (Wanda)
  element count               Size(X)                                  -> K·rows
  Gram matrix                 Xᵀ·X with X reshaped to [rows, K]        -> [K, K] (SparseGPT)
Memory on the host is O(K) or O(K²) per layer, never O(activations).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from sparsec.core.layers import Layer

PREFIX = "sparsec_stat"


@dataclass(frozen=True)
class StatSpec:
    """Which statistics one activation needs, and the names of the graph outputs carrying them."""

    tensor: str
    axis: int  # channel axis of the activation, negative counts from the end
    channels: int
    gram: bool
    sumsq_output: str
    sum_output: str
    size_output: str
    gram_output: str | None
    unfold: tuple | None = None  # (C, R, S, conv attributes): statistics of im2col patches


def activation_of(layer: Layer, node: onnx.NodeProto, gemm_trans: tuple[int, int]) -> tuple[str, int]:
    """The activation a layer multiplies with its weight, and that activation's channel axis."""
    if layer.op in ("Conv", "ConvTranspose"):
        return node.input[0], 1
    if layer.op == "MatMul":
        return (node.input[0], -1) if layer.input_index == 1 else (node.input[1], -2)
    trans_a, trans_b = gemm_trans
    if layer.input_index == 1:  # activation is A: [M, K], or [K, M] with transA
        return node.input[0], 0 if trans_a else 1
    return node.input[1], 1 if trans_b else 0  # activation is B: [K, N], or [N, K] with transB


def plan_stats(layers: list[Layer], nodes, gram_for: set[str], ranks: dict[str, int]
               ) -> tuple[dict[str, StatSpec], dict[str, str], list[str]]:
    """One StatSpec per distinct (activation, axis), the spec key of each layer, and the
    layers whose activation rank is unknown (they cannot be instrumented)."""
    specs: dict[str, StatSpec] = {}
    by_layer: dict[str, str] = {}
    unknown: list[str] = []
    for layer in layers:
        node = nodes[layer.node_index]
        trans = (_int_attr(node, "transA"), _int_attr(node, "transB"))
        tensor, axis = activation_of(layer, node, trans)
        if tensor not in ranks:
            unknown.append(layer.name)
            continue
        axis = axis % ranks[tensor]
        key = f"{tensor}|{axis}"
        want_gram = layer.name in gram_for
        old = specs.get(key)
        if old is None or (want_gram and not old.gram):
            i = len(specs) if old is None else int(old.sumsq_output.split("/")[1])
            specs[key] = StatSpec(
                tensor, axis, _channels(layer), want_gram or (old is not None and old.gram),
                f"{PREFIX}/{i}/sumsq", f"{PREFIX}/{i}/sum", f"{PREFIX}/{i}/size",
                f"{PREFIX}/{i}/gram" if want_gram or (old is not None and old.gram) else None)
        by_layer[layer.name] = key
    return specs, by_layer, unknown


def plan_patches(layers: list[Layer], nodes, gram_for: set[str], first: int) -> dict[str, StatSpec]:
    """For k×k Convs (group 1) that SparseGPT prunes: the Gram matrix of their im2col patches,
    ordered (r, s, c) so that N:M groups along C stay consecutive."""
    out = {}
    for layer in layers:
        node = nodes[layer.node_index]
        if layer.name not in gram_for or layer.op != "Conv" or layer.groups != 1 or len(layer.shape) != 4:
            continue
        c, r, s = layer.shape[1], layer.shape[2], layer.shape[3]
        if r * s == 1:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute
                 if a.name in ("strides", "pads", "dilations", "auto_pad")}
        i = first + len(out)
        out[layer.name] = StatSpec(node.input[0], 1, c * r * s, True, f"{PREFIX}/{i}/sumsq",
                                   f"{PREFIX}/{i}/sum", f"{PREFIX}/{i}/size", f"{PREFIX}/{i}/gram",
                                   (c, r, s, attrs))
    return out


def _unfold_nodes(spec: StatSpec, x: str, base: str) -> list[onnx.NodeProto]:
    """A Conv with one-hot kernels: output channel (r·S + s)·C + c is input channel c at (r, s)."""
    c, r, s, attrs = spec.unfold
    kernel = np.zeros((r * s * c, c, r, s), dtype=np.float32)
    for rr in range(r):
        for ss in range(s):
            for cc in range(c):
                kernel[(rr * s + ss) * c + cc, cc, rr, ss] = 1.0
    attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
    return [helper.make_node("Constant", [], [f"{base}/onehot"], name=f"{base}/onehot_const",
                             value=onnx.numpy_helper.from_array(kernel, f"{base}/onehot")),
            helper.make_node("Conv", [x, f"{base}/onehot"], [f"{base}/patches"], name=f"{base}/unfold",
                             **attrs)]


def _channels(layer: Layer) -> int:
    if layer.op == "Conv":
        return layer.shape[1] * layer.groups
    return layer.reduction_dim


def stat_nodes(spec: StatSpec, rank: int, elem_type: int, opset: int) -> list[onnx.NodeProto]:
    """The reducer nodes for one activation (float32 arithmetic whatever the model's type)."""
    base = spec.sumsq_output.rsplit("/", 1)[0]
    x = spec.tensor
    nodes = []
    if elem_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [x], [f"{base}/x32"], to=TensorProto.FLOAT,
                                      name=f"{base}/cast"))
        x = f"{base}/x32"
    if spec.unfold is not None:
        nodes += _unfold_nodes(spec, x, base)
        x = f"{base}/patches"
    axes = [a for a in range(rank) if a != spec.axis]
    # x·x then ReduceSum: onnxruntime's ReduceSumSquare has no fast path over several axes
    # (about 6× slower at K=1536); the square is freed at once since reducers run early
    nodes.append(helper.make_node("Mul", [x, x], [f"{base}/x2sq"], name=f"{base}/square"))
    if opset >= 13:
        axes_value = helper.make_tensor("axes", TensorProto.INT64, [len(axes)], axes)
        nodes.append(helper.make_node("Constant", [], [f"{base}/axes"], name=f"{base}/axes_const",
                                      value=axes_value))
    for source, out in ((f"{base}/x2sq", spec.sumsq_output), (x, spec.sum_output)):
        if opset >= 13:  # ReduceSum took axes as an input from opset 13
            nodes.append(helper.make_node("ReduceSum", [source, f"{base}/axes"], [out], keepdims=0,
                                          name=f"{out}_node"))
        else:
            nodes.append(helper.make_node("ReduceSum", [source], [out], axes=axes, keepdims=0,
                                          name=f"{out}_node"))
    nodes.append(helper.make_node("Size", [x], [spec.size_output], name=f"{base}/size_node"))
    if spec.gram_output is not None:
        rows = x
        if spec.axis != rank - 1:
            perm = [a for a in range(rank) if a != spec.axis] + [spec.axis]
            nodes.append(helper.make_node("Transpose", [x], [f"{base}/xt"], perm=perm,
                                          name=f"{base}/to_last"))
            rows = f"{base}/xt"
        nodes.append(helper.make_node("Constant", [], [f"{base}/shape"], name=f"{base}/shape_const",
                                      value=helper.make_tensor("s", TensorProto.INT64, [2],
                                                               [-1, spec.channels])))
        nodes.append(helper.make_node("Reshape", [rows, f"{base}/shape"], [f"{base}/x2"],
                                      name=f"{base}/rows"))
        nodes.append(helper.make_node("Transpose", [f"{base}/x2"], [f"{base}/x2t"], perm=[1, 0],
                                      name=f"{base}/x2t_node"))
        nodes.append(helper.make_node("MatMul", [f"{base}/x2t", f"{base}/x2"], [spec.gram_output],
                                      name=f"{base}/gram_node"))
    return nodes


def instrumented_graph(model: onnx.ModelProto, specs: list[StatSpec], ranks: dict[str, int],
                       types: dict[str, int]) -> onnx.ModelProto:
    """A new model computing only what the statistics need; initializers are left to the caller."""
    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    # later layers' reducers first: onnxruntime's default order walks back from the last leaf,
    # so each reducer then runs as soon as its activation exists and the activation can be freed
    extra = [n for s in reversed(specs)
             for n in stat_nodes(s, ranks[s.tensor], types.get(s.tensor, 1), opset)]
    outputs = [o for s in specs for o in (s.sumsq_output, s.sum_output, s.size_output, s.gram_output) if o]
    every = list(g.node) + extra
    needed = _ancestors(every, outputs)
    nodes = [n for i, n in enumerate(every) if i in needed]
    used = {x for n in nodes for x in [*n.input, *subgraph_reads(n)]}
    defaults = {t.name for t in g.initializer}  # initializers that are also inputs: only if still read
    inputs = [i for i in g.input if i.name not in defaults or i.name in used]
    graph = helper.make_graph(nodes, f"{g.name}_stats", inputs,
                              [onnx.ValueInfoProto(name=o) for o in outputs])
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def _ancestors(nodes: list[onnx.NodeProto], outputs: list[str]) -> set[int]:
    """Positions of the nodes the outputs depend on (protobuf wrappers have no stable id())."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    keep: set[int] = set()
    stack = list(outputs)
    while stack:
        i = producer.get(stack.pop())
        if i is None or i in keep:
            continue
        keep.add(i)
        node = nodes[i]
        stack.extend(i for i in node.input if i)
        stack.extend(subgraph_reads(node))  # subgraphs may read outer-scope tensors
    return keep


def subgraph_reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor name read anywhere inside the node's bodies (If, Loop, Scan; nested too)."""
    reads: list[str] = []
    for attr in node.attribute:
        for body in [attr.g] * (attr.type == onnx.AttributeProto.GRAPH) + list(attr.graphs):
            for sub in body.node:
                reads += [i for i in sub.input if i] + subgraph_reads(sub)
    return reads


def _int_attr(node: onnx.NodeProto, name: str) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return 0
