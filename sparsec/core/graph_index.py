"""Where a node's weight really lives: follow Identity/Transpose/Cast back to a constant.

A QDQ weight (an int8/uint8 constant behind a DequantizeLinear) resolves to the integer
constant, with the DequantizeLinear's scale and zero point recorded in `WeightSource.dequant`.

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
QUANT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}


@dataclass(frozen=True)
class Step:
    """One op between the stored constant and the layer input."""

    op: str
    node_index: int
    perm: tuple[int, ...] = ()


@dataclass(frozen=True)
class Dequant:
    """The DequantizeLinear of a QDQ weight: real = (q - zero_point)·scale, per tensor or per
    channel along `axis` of the stored tensor."""

    scale: str
    zero_point: str  # "" when absent (zero point 0)
    axis: int | None  # stored axis of a per-channel scale; None for one scale


@dataclass(frozen=True)
class WeightSource:
    """A stored constant and the path from it to the tensor a layer consumes."""

    storage: str  # "initializer" or "constant"
    key: str  # initializer name, or the Constant node's output name
    stored_shape: tuple[int, ...]
    steps: tuple[Step, ...]  # in order from the stored tensor to the layer input
    tensors: tuple[str, ...]  # every tensor name on the path, stored one first
    dequant: Dequant | None = None  # set for an integer weight behind a DequantizeLinear


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

    def stored_tensor(self, name: str) -> onnx.TensorProto | None:
        """The initializer or Constant-node tensor named `name` (no pass-through ops)."""
        if name in self.initializers and name not in self.graph_inputs:
            return self.initializers[name]
        if name in self.constant_nodes:
            return _constant_tensor(self.constant_nodes[name])
        return None

    def resolve(self, name: str, quantized: bool = False) -> WeightSource | None:
        """The constant behind `name`, or None when it is computed from graph inputs.

        With `quantized`, one DequantizeLinear of an int8/uint8 constant (constant scale and
        zero point, reached only through Identity) is followed too, or one QuantizeLinear →
        DequantizeLinear pair of a float constant (fake quantization: a float weight set to 0
        quantizes to the zero point and dequantizes to exactly 0, so it is pruned as a float).
        """
        steps: list[Step] = []
        tensors = [name]
        dequant: Dequant | None = None
        while True:
            tensor = self.stored_tensor(name)
            if tensor is not None:
                storage = "initializer" if name in self.initializers else "constant"
                break
            node = self.producer.get(name)
            if node is None or node.op_type not in PASS_THROUGH_OPS + ("DequantizeLinear",):
                return None
            if dequant is not None and node.op_type != "Identity":
                return None  # the stored axes of the scale would move
            if node.op_type == "DequantizeLinear" and quantized and self._fake_quant(node):
                q = self.producer[node.input[0]]
                steps += [Step(node.op_type, self.position[id(node)]), Step(q.op_type, self.position[id(q)])]
                tensors += [node.input[0], q.input[0]]
                name, quantized = q.input[0], False
                continue
            if node.op_type == "DequantizeLinear":
                dequant = self._dequant(node) if quantized else None
                if dequant is None:
                    return None
            if node.op_type == "Cast" and _attr(node, "to") not in FLOAT_TYPES:
                return None
            perm = tuple(_attr(node, "perm") or ()) if node.op_type == "Transpose" else ()
            steps.append(Step(node.op_type, self.position[id(node)], perm))
            name = node.input[0]
            tensors.append(name)
        if tensor is None or tensor.data_type not in (QUANT_TYPES if dequant else FLOAT_TYPES):
            return None
        steps.reverse()
        tensors.reverse()
        shape = tuple(int(d) for d in tensor.dims)
        if dequant is not None and dequant.axis is not None:
            if not -len(shape) <= dequant.axis < len(shape):
                return None
            dequant = Dequant(dequant.scale, dequant.zero_point, dequant.axis % len(shape))
        return WeightSource(storage, name, shape, tuple(steps), tuple(tensors), dequant)

    def _fake_quant(self, dq: onnx.NodeProto) -> bool:
        """A DequantizeLinear fed by a QuantizeLinear of a constant scale (pytorch-quantization's
        and ModelOpt's export of a float weight)."""
        q = self.producer.get(dq.input[0])
        return (q is not None and q.op_type == "QuantizeLinear" and len(q.input) > 1
                and self.stored_tensor(q.input[1]) is not None)

    def _dequant(self, node: onnx.NodeProto) -> Dequant | None:
        """A DequantizeLinear with constant per-tensor or per-channel parameters, else None."""
        if _attr(node, "block_size"):
            return None  # blocked quantization: scales vary along the reduction axis
        scale = self.stored_tensor(node.input[1]) if len(node.input) > 1 else None
        zp_name = node.input[2] if len(node.input) > 2 else ""
        if scale is None or (zp_name and self.stored_tensor(zp_name) is None):
            return None
        per_channel = len(scale.dims) == 1 and scale.dims[0] != 1
        if len(scale.dims) > 1:
            return None
        axis = int(_attr(node, "axis") if _attr(node, "axis") is not None else 1)
        return Dequant(node.input[1], zp_name, axis if per_channel else None)


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


def stored_axis(source: WeightSource, axis: int) -> int:
    """The stored tensor's axis that the layer reads as `axis` (through Transpose steps)."""
    for step in reversed(source.steps):
        if step.op == "Transpose":
            perm = step.perm or tuple(reversed(range(len(source.stored_shape))))
            axis = perm[axis]
    return axis


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
