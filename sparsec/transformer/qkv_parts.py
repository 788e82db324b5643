"""Which third of a fused QKV projection one side of an attention block reads.

A fused [E, 3E] projection is reshaped to [.., 3, H, D] and split into parts by Slice, Gather, Split or
Squeeze(Slice|Split); this reads the constant indices, axes and Reshape targets that say which part, and
refuses head-major layouts. Pure analysis.
"""

from __future__ import annotations

import numpy as np
import onnx

from sparsec.core.graph_index import GraphIndex


def attr_value(node: onnx.NodeProto, name: str):
    """The value of attribute ``name``, or None."""
    found = next((a for a in node.attribute if a.name == name), None)
    return None if found is None else onnx.helper.get_attribute_value(found)


def const_value(index: GraphIndex, name: str) -> np.ndarray | None:
    """The constant behind ``name`` (an initializer or Constant node, through Identity), or None."""
    node = index.producer.get(name)
    while node is not None and node.op_type == "Identity":  # Paddle exports route constants through Identity
        name, node = node.input[0], index.producer.get(node.input[0])
    if name in index.initializers:
        return onnx.numpy_helper.to_array(index.initializers[name])
    if name in index.constant_nodes:
        return onnx.numpy_helper.to_array(index.constant_nodes[name].attribute[0].t)
    return None


def _ints(index: GraphIndex, node: onnx.NodeProto, k: int, attr: str) -> list[int] | None:
    """A constant integer list from input k (newer opsets) or attribute `attr` (older ones)."""
    if len(node.input) > k and node.input[k]:
        value = const_value(index, node.input[k])
        return None if value is None else [int(v) for v in np.ravel(value)]
    value = attr_value(node, attr)
    return None if value is None else [int(v) for v in np.ravel(value)]


def select_part(index: GraphIndex, node: onnx.NodeProto, name: str) -> list | str:
    """[third, parts (None until the Reshape says), axis, input to walk on] of a Slice, Gather, Split or
    Squeeze(Slice|Split) picking one part of a fused QKV tensor."""
    if node.op_type == "Squeeze":  # unbind: the Slice or Split before it picks the part
        axes = _ints(index, node, 1, "axes")
        if not axes or len(axes) != 1:
            return "Squeeze without one constant axis"
        inner = index.producer.get(node.input[0])
        if inner is None or inner.op_type not in ("Slice", "Split"):
            return "Squeeze without a Slice or Split"
        found = select_part(index, inner, node.input[0])
        return found if isinstance(found, str) or found[2] == axes[0] else "Squeeze on another axis"
    if node.op_type == "Gather":
        value = const_value(index, node.input[1])
        if value is None or np.ndim(value) != 0:
            return "Gather without one constant index"
        return [int(value), None, int(attr_value(node, "axis") or 0), node.input[0]]
    if node.op_type == "Split":
        sizes = _ints(index, node, 1, "split")
        if sizes and len(set(sizes)) != 1 or sizes and sizes[0] != 1:
            return "Split into unequal parts"
        axis = int(attr_value(node, "axis") or 0)
        return [list(node.output).index(name), len(node.output), axis, node.input[0]]
    starts, ends = _ints(index, node, 1, "starts"), _ints(index, node, 2, "ends")
    axes, steps = _ints(index, node, 3, "axes"), _ints(index, node, 4, "steps")
    if not starts or not ends or len(starts) != 1 or (axes is not None and len(axes) != 1) \
            or steps not in (None, [1]) or starts[0] < 0:
        return "Slice is not one constant part"
    return [starts[0], ("end", ends[0]), (axes or [0])[0], node.input[0]]


def fused_parts(index: GraphIndex, reshape: onnx.NodeProto, select: list) -> int | str:
    """How many parts the Reshape splits the projection into, with the part axis right before [H, D]."""
    target = const_value(index, reshape.input[1])
    if target is None:
        concat = index.producer.get(reshape.input[1])
        if concat is None or concat.op_type != "Concat":
            return "fused QKV Reshape target is not known"
        pieces = [const_value(index, x) for x in concat.input]
        if any(p is not None and np.size(p) != 1 for p in pieces):
            return "fused QKV Reshape target is not known"
        target = [None if p is None else int(np.ravel(p)[0]) for p in pieces]
    target = list(np.ravel(target)) if not isinstance(target, list) else target
    axis = select[2] + len(target) if select[2] < 0 else select[2]
    if axis != len(target) - 3 or target[axis] is None or target[axis] <= 1:
        return "fused QKV layout is not [.., parts, heads, head_dim] (head-major layouts are not supported)"
    parts = int(target[axis])
    if isinstance(select[1], tuple):  # a Slice: [p, p + 1), the last one may end anywhere past it
        end = select[1][1]
        if not (end == select[0] + 1 or select[0] == parts - 1 and end >= parts):
            return "Slice is not one part"
    elif select[1] is not None and select[1] != parts:
        return "Split count differs from the Reshape's part count"
    return parts if 0 <= select[0] < parts else "part index out of range"
