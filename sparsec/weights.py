"""Where a node's weight really lives: follow Identity/Transpose/Cast back to a constant.

Pure analysis: nothing here edits the graph.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx

# Ops a constant may pass through on its way to a layer, and still be a constant weight.
PASS_THROUGH_OPS = ("Identity", "Transpose", "Cast")
FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}


@dataclass(frozen=True)
class Step:
    """One op between the stored constant and the layer input."""

    op: str
    node_index: int
    perm: tuple[int, ...] = ()


@dataclass(frozen=True)
class WeightSource:
    """A stored constant and the path from it to the tensor a layer consumes."""

    storage: str  # "initializer" or "constant"
    key: str  # initializer name, or the Constant node's output name
    stored_shape: tuple[int, ...]
    steps: tuple[Step, ...]  # in order from the stored tensor to the layer input
    tensors: tuple[str, ...]  # every tensor name on the path, stored one first


class GraphIndex:
    """Producers, consumers and constants of the main graph, built once per analysis."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.constant_nodes: dict[str, onnx.NodeProto] = {}
        self.graph_inputs = {i.name for i in graph.input}
        self.graph_outputs = {o.name for o in graph.output}
        self.subgraph_uses: dict[str, str] = {}
        self.position: dict[int, int] = {}
        for i, node in enumerate(graph.node):
            self.position[id(node)] = i
            for out in node.output:
                self.producer[out] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
            if node.op_type == "Constant" and _constant_tensor(node) is not None:
                self.constant_nodes[node.output[0]] = node
            for attr in node.attribute:
                for sub in _subgraphs(attr):
                    for name in _names_used(sub):
                        self.subgraph_uses.setdefault(name, node.name)

    def constant(self, source: WeightSource) -> onnx.TensorProto:
        """The TensorProto that stores a weight."""
        if source.storage == "initializer":
            return self.initializers[source.key]
        tensor = _constant_tensor(self.constant_nodes[source.key])
        assert tensor is not None
        return tensor

    def resolve(self, name: str) -> WeightSource | None:
        """The constant behind `name`, or None when it is computed from graph inputs."""
        steps: list[Step] = []
        tensors = [name]
        while True:
            if name in self.initializers and name not in self.graph_inputs:
                tensor = self.initializers[name]
                storage = "initializer"
                break
            if name in self.constant_nodes:
                tensor = _constant_tensor(self.constant_nodes[name])
                storage = "constant"
                break
            node = self.producer.get(name)
            if node is None or node.op_type not in PASS_THROUGH_OPS:
                return None
            if node.op_type == "Cast" and _attr(node, "to") not in FLOAT_TYPES:
                return None
            perm = tuple(_attr(node, "perm") or ()) if node.op_type == "Transpose" else ()
            steps.append(Step(node.op_type, self.position[id(node)], perm))
            name = node.input[0]
            tensors.append(name)
        if tensor is None or tensor.data_type not in FLOAT_TYPES:
            return None
        steps.reverse()
        tensors.reverse()
        shape = tuple(int(d) for d in tensor.dims)
        return WeightSource(storage, name, shape, tuple(steps), tuple(tensors))


def to_effective(stored: np.ndarray, steps: tuple[Step, ...]) -> np.ndarray:
    """The weight as the layer sees it (a view where possible)."""
    out = stored
    for step in steps:
        if step.op == "Transpose":
            out = out.transpose(step.perm or tuple(reversed(range(out.ndim))))
    return out


def to_stored(effective: np.ndarray, steps: tuple[Step, ...]) -> np.ndarray:
    """Map an array laid out like the effective weight back to the stored layout."""
    out = effective
    for step in reversed(steps):
        if step.op == "Transpose":
            perm = step.perm or tuple(reversed(range(out.ndim)))
            out = out.transpose(np.argsort(perm))
    return out


def effective_shape(source: WeightSource) -> tuple[int, ...]:
    """The shape of the weight as the layer sees it."""
    shape = source.stored_shape
    for step in source.steps:
        if step.op == "Transpose":
            perm = step.perm or tuple(reversed(range(len(shape))))
            shape = tuple(shape[p] for p in perm)
    return shape


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return attr.t
    return None


def _attr(node: onnx.NodeProto, name: str):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return None


def _subgraphs(attr: onnx.AttributeProto):
    if attr.type == onnx.AttributeProto.GRAPH:
        yield attr.g
    elif attr.type == onnx.AttributeProto.GRAPHS:
        yield from attr.graphs


def _names_used(graph: onnx.GraphProto):
    for node in graph.node:
        yield from (n for n in node.input if n)
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                yield from _names_used(sub)
