"""Exact compensation for consumers whose zero padding sees the border.

A removed channel that carried a constant a_c adds Σ_c W[:, c]·a_c to every output pixel of a
consumer Conv only where the kernel sits wholly inside the input; at a zero-padded border fewer
taps see it, and a ConvTranspose spreads it over its taps unevenly. Folding a bias is then wrong
at the border. Running the consumer's own geometry over a one-channel map of ones, with the kernel
K = Σ_c a_c·W[:, c] (same strides, pads, dilations, output padding), gives the exact contribution
at every pixel and every input size; it is added to the consumer's output.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sparsec.core.names import FreshNames

_GEOMETRY = ("kernel_shape", "strides", "pads", "dilations", "auto_pad", "output_padding", "output_shape")


def needs_border_correction(node: onnx.NodeProto, weight_shape: tuple[int, ...]) -> bool:
    """True where a folded bias would be wrong at the border (or, for ConvTranspose, anywhere)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "ConvTranspose":
        return bool(np.prod(weight_shape[2:]) > 1 or any(s > 1 for s in attrs.get("strides", [])))
    if node.op_type != "Conv" or np.prod(weight_shape[2:]) <= 1:
        return False
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    return any(attrs.get("pads", [])) or auto_pad in (b"SAME_UPPER", b"SAME_LOWER")


def border_kernel(node: onnx.NodeProto, w: np.ndarray, gone: list[int], value: np.ndarray) -> np.ndarray:
    """K = Σ_c a_c·W[:, c] as a one-input-channel kernel of the consumer's op."""
    if node.op_type == "ConvTranspose":  # W[C, M, ...] -> [1, M, ...]
        return np.tensordot(value, w[gone], axes=(0, 0))[None]
    return np.tensordot(w[:, gone], value, axes=(1, 0))[:, None]  # W[M, C, ...] -> [M, 1, ...]


def add_border_correction(graph: onnx.GraphProto, node: onnx.NodeProto, kernel: np.ndarray,
                          names: FreshNames, opset: int = 17) -> list[onnx.NodeProto]:
    """Nodes computing op(ones[1, 1, *spatial(x)], kernel) and adding it to the node's output.

    The node's output is renamed; the returned nodes (to insert right after it) produce the old
    name, so every reader downstream is unchanged. Below opset 10 Slice takes attributes, and below
    opset 9 (no ConstantOfShape) the ones are a Tile of a constant one (old Paddle exports)."""
    base = node.name or node.op_type
    dtype = kernel.dtype
    k_name, two, big, lead = (names(f"{base}__border_{s}") for s in ("kernel", "start", "end", "lead"))
    end = np.iinfo(np.int64).max
    bounds = [numpy_helper.from_array(np.array([2], np.int64), two),
              numpy_helper.from_array(np.array([end], np.int64), big)] if opset >= 10 else []
    graph.initializer.extend([numpy_helper.from_array(kernel, k_name), *bounds,
                              numpy_helper.from_array(np.array([1, 1], np.int64), lead)])
    shape, spatial, dims, ones, corr = (names(f"{base}__border_{s}")
                                        for s in ("shape", "spatial", "dims", "ones", "correction"))
    geometry = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in _GEOMETRY}
    out = node.output[0]
    node.output[0] = names(f"{out}__before_border")
    one = numpy_helper.from_array(np.ones(1, dtype), "value")
    if opset >= 10:
        slice_ = helper.make_node("Slice", [shape, two, big], [spatial], name=names(f"{base}__border_slice"))
    else:
        slice_ = helper.make_node("Slice", [shape], [spatial], name=names(f"{base}__border_slice"),
                                  axes=[0], starts=[2], ends=[end])
    if opset >= 9:
        fill = helper.make_node("ConstantOfShape", [dims], [ones], name=names(f"{base}__border_ones"),
                                value=one)
    else:
        unit = names(f"{base}__border_unit")
        graph.initializer.append(numpy_helper.from_array(np.ones([1] * kernel.ndim, dtype), unit))
        fill = helper.make_node("Tile", [unit, dims], [ones], name=names(f"{base}__border_ones"))
    return [
        helper.make_node("Shape", [node.input[0]], [shape], name=names(f"{base}__border_shape")),
        slice_,
        helper.make_node("Concat", [lead, spatial], [dims], name=names(f"{base}__border_concat"), axis=0),
        fill,
        helper.make_node(node.op_type, [ones, k_name], [corr], name=names(f"{base}__border_conv"),
                         **geometry),
        helper.make_node("Add", [node.output[0], corr], [out], name=names(f"{base}__border_add")),
    ]


def split_border_add(producer_of: dict[str, onnx.NodeProto], node: onnx.NodeProto | None
                     ) -> tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto] | None:
    """(add, layer, border conv) when `node` is the Add that `add_border_correction` put after a
    layer: BatchNorm folding scales the border kernel with the layer, so the two still fold."""
    if node is None or node.op_type != "Add" or len(node.input) != 2:
        return None
    layer, border = (producer_of.get(name) for name in node.input)
    if layer is None or border is None or border.op_type not in ("Conv", "ConvTranspose"):
        return None
    ones = producer_of.get(border.input[0])
    if ones is None or ones.op_type not in ("ConstantOfShape", "Tile") or border.op_type != layer.op_type:
        return None
    return node, layer, border
