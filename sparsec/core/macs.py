"""Multiply-accumulate counts with the field's formulas, from inferred activation shapes.

Conv: M·(C/g)·R·S·E·F per sample (= batch·E·F·|W|); ConvTranspose: batch·H_in·W_in·|W|;
Gemm/MatMul: rows·K·N. Non-zero MACs scale with the kept fraction of the weight.
"""

from __future__ import annotations

import math

import onnx

from sparsec.core.layers import Layer


def layer_tensors(layer: Layer, node: onnx.NodeProto) -> str:
    """The activation whose shape `layer_macs` needs."""
    return node.input[0] if layer.op == "ConvTranspose" else node.output[0]


def layer_macs(layer: Layer, node: onnx.NodeProto, shapes: dict[str, tuple]) -> int | None:
    """Dense MACs of one layer, or None when its activation shape is unknown."""
    weight = layer.params
    if layer.op == "Conv":  # batch·E·F·|W|, |W| = M·(C/g)·R·S
        out = shapes.get(node.output[0])
        return None if out is None else out[0] * math.prod(out[2:]) * weight
    if layer.op == "ConvTranspose":
        inp = shapes.get(node.input[0])
        return None if inp is None else inp[0] * math.prod(inp[2:]) * weight
    out = shapes.get(node.output[0])
    if out is None:
        return None
    if layer.op == "Gemm":
        return out[0] * weight
    if layer.input_index == 1:  # activation @ W[K, N]: every output row costs K·N
        return math.prod(out[:-1]) * weight
    return math.prod(out[:-2]) * out[-1] * weight  # W[M, K] @ activation[..., K, N]


def all_layer_macs(model: onnx.ModelProto, layers, shapes: dict[str, tuple]) -> dict:
    """Layer name -> dense MACs (None where the shape stays unknown); `sparsec.runtime.observe.layer_shapes`
    gives the shapes."""
    nodes = model.graph.node
    return {la.name: layer_macs(la, nodes[la.node_index], shapes) for la in layers}
