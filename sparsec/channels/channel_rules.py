"""What each op does to the channel axis: one explicit table, one function per kind of op.

A rule reads its inputs' layouts, records the edits removal needs (`Action`s), writes its
outputs' layouts, and blocks what it cannot follow. An op missing from the table blocks every
channel it touches (`unknown_op`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from sparsec.channels.channel_state import Action, Layout, State
from sparsec.core.graph_index import _attr
from sparsec.core.layers import node_display_name

Rule = Callable[[State, int, onnx.NodeProto], None]
RULES: dict[str, Rule] = {}

UNARY = ("Relu", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "LeakyRelu", "Elu", "Selu", "Celu",
         "Softplus", "Softsign", "Gelu", "Erf", "Identity", "Dropout", "Clip", "Cast", "Neg", "Abs",
         "Exp", "Log", "Sqrt", "Reciprocal", "Mish", "ThresholdedRelu", "Floor", "Ceil", "Round")
BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu")
POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool")


def register(op_types: tuple[str, ...] | str, rule: Rule) -> None:
    """Add a rule; a second rule for the same op is a bug, not an override."""
    for op in (op_types,) if isinstance(op_types, str) else op_types:
        if op in RULES:
            raise ValueError(f"a channel rule for {op} is already registered")
        RULES[op] = rule


def _name(state: State, i: int) -> str:
    return node_display_name(state.model.graph.node[i], i)


def unknown_op(state: State, i: int, node: onnx.NodeProto) -> None:
    for name in node.input:
        if name in state.layouts:
            state.block(state.layouts[name].elems,
                        f"{_name(state, i)} ({node.op_type}) is not in the channel table")


def _set(state: State, name: str, axis: int, rank: int, elems: np.ndarray) -> None:
    state.layouts[name] = Layout(axis, rank, np.asarray(elems, dtype=np.int64))


def _own_weight(state: State, name: str) -> np.ndarray | None:
    """A plain constant weight read by this node alone (safe to slice in place)."""
    if len(state.index.consumers.get(name, [])) != 1:
        return None
    src = state.index.resolve(name)
    if src is None or src.steps:
        return None
    return state.store.read(state.index.constant(src))


def conv(state: State, i: int, node: onnx.NodeProto) -> None:
    w = _own_weight(state, node.input[1])
    x = state.layouts.get(node.input[0])
    group = int(_attr(node, "group") or 1)
    transpose = node.op_type == "ConvTranspose"
    if w is None:
        if x is not None:
            state.block(x.elems, f"{_name(state, i)} has a shared or computed weight")
        return
    if x is not None and x.axis != 1:
        state.block(x.elems, f"{_name(state, i)} reads channels on axis {x.axis}")
    elif x is not None and group == 1:
        detail = {"input": 1, "axis": 0 if transpose else 1}
        state.actions.append(Action("consumer", i, tuple(x.elems), detail))
    elif x is not None and not transpose and w.shape[1] == 1 and group == len(x.elems):
        mult = w.shape[0] // group
        out = np.repeat(x.elems, mult)
        state.actions.append(Action("depthwise", i, tuple(out), {"mult": mult}))
        _set(state, node.output[0], 1, x.rank, out)
        return
    elif x is not None:
        state.block(x.elems, f"grouped {_name(state, i)} (group={group}) would need whole groups")
        return
    if group != 1:
        return
    out_axis = 1 if transpose else 0
    elems = state.new_elements(i, node.op_type, w.shape[out_axis])
    state.actions.append(Action("producer", i, tuple(elems), {"input": 1, "axis": out_axis, "bias": 2}))
    _set(state, node.output[0], 1, len(w.shape), elems)


def gemm(state: State, i: int, node: onnx.NodeProto) -> None:
    w = _own_weight(state, node.input[1])
    x = state.layouts.get(node.input[0])
    trans_a, trans_b = int(_attr(node, "transA") or 0), int(_attr(node, "transB") or 0)
    if w is None or trans_a:
        for name in node.input:  # channels may arrive on A, on B (a constant A) or on C
            if name in state.layouts:
                state.block(state.layouts[name].elems,
                            f"{_name(state, i)}: Gemm reads channels with a constant A, transA=1 "
                            "or a weight that is not its own")
        return
    if len(node.input) > 2 and node.input[2] in state.layouts:
        state.block(state.layouts[node.input[2]].elems, f"{_name(state, i)}: channels arrive on C")
    if x is not None:
        state.actions.append(Action("consumer", i, tuple(x.elems), {"input": 1, "axis": 1 if trans_b else 0}))
    elems = state.new_elements(i, "Gemm", w.shape[0 if trans_b else 1])
    state.actions.append(Action("producer", i, tuple(elems), {"input": 1, "axis": 0 if trans_b else 1,
                                                               "bias": 2}))
    _set(state, node.output[0], 1, 2, elems)


def matmul(state: State, i: int, node: onnx.NodeProto) -> None:
    w = _own_weight(state, node.input[1])
    x = state.layouts.get(node.input[0])
    rank = state.rank(node.input[0]) or state.rank(node.output[0])
    if w is None or w.ndim != 2 or rank is None:
        unknown_op(state, i, node)
        return
    if x is not None and x.axis != rank - 1:
        state.block(x.elems, f"{_name(state, i)} reduces an axis other than the channels")
    elif x is not None:
        state.actions.append(Action("consumer", i, tuple(x.elems), {"input": 1, "axis": 0}))
    elems = state.new_elements(i, "MatMul", w.shape[1])
    state.actions.append(Action("producer", i, tuple(elems), {"input": 1, "axis": 1}))
    _set(state, node.output[0], rank - 1, rank, elems)


def norm(state: State, i: int, node: onnx.NodeProto) -> None:
    """BatchNormalization / InstanceNormalization: per-channel parameters on axis 1."""
    x = state.layouts.get(node.input[0])
    if x is None:
        return
    if x.axis != 1 or len(node.output) > 1 and any(node.output[1:]):
        state.block(x.elems, f"{_name(state, i)} normalises another axis or trains")
        return
    for k in range(1, len(node.input)):
        state.actions.append(Action("param", i, tuple(x.elems), {"input": k, "axis": 0}))
    _set(state, node.output[0], 1, x.rank, x.elems)


def unary(state: State, i: int, node: onnx.NodeProto) -> None:
    x = state.layouts.get(node.input[0])
    if x is not None:
        _set(state, node.output[0], x.axis, x.rank, x.elems)


def softmax(state: State, i: int, node: onnx.NodeProto) -> None:
    x = state.layouts.get(node.input[0])
    axis = _attr(node, "axis")
    if x is not None and int(-1 if axis is None else axis) % x.rank == x.axis:
        state.block(x.elems, f"{_name(state, i)} normalises across channels")
        return
    unary(state, i, node)


def pool(state: State, i: int, node: onnx.NodeProto) -> None:
    if len(node.output) > 1 and node.output[1]:
        unknown_op(state, i, node)
        return
    unary(state, i, node)


def elementwise(state: State, i: int, node: onnx.NodeProto) -> None:
    """Broadcasting ops: activations couple position by position, constants get sliced."""
    ins = [(k, name, state.layouts.get(name)) for k, name in enumerate(node.input) if name]
    with_layout = [(k, L) for k, _, L in ins if L is not None]
    if not with_layout:
        return
    out_rank = state.rank(node.output[0]) or max(L.rank for _, L in with_layout)
    base = with_layout[0][1]
    axis = base.axis + out_rank - base.rank
    everything = np.concatenate([L.elems for _, L in with_layout])
    for _, other in with_layout[1:]:
        if other.axis + out_rank - other.rank != axis or len(other.elems) != len(base.elems):
            state.block(everything, f"{_name(state, i)} mixes channel axes")
            return
        state.unite(base.elems, other.elems)
    for k, name, layout in ins:
        if layout is not None:
            continue
        value = state.constant(name)
        shape = value.shape if value is not None else state.shapes.get(name) or state.dims.get(name)
        if shape is None:
            state.block(everything, f"{_name(state, i)}: input {name} has an unknown shape")
            return
        at = axis - (out_rank - len(shape))
        if at < 0 or shape[at] == 1:
            continue
        if shape[at] is None:
            state.block(everything, f"{_name(state, i)}: input {name} has an unknown channel size")
            return
        if value is None or shape[at] != len(base.elems):
            state.block(everything, f"{_name(state, i)}: input {name} carries channels that stay")
            return
        state.actions.append(Action("param", i, tuple(base.elems), {"input": k, "axis": at}))
    _set(state, node.output[0], axis, out_rank, base.elems)


def concat(state: State, i: int, node: onnx.NodeProto) -> None:
    layouts = [state.layouts.get(n) for n in node.input]
    known = [L for L in layouts if L is not None]
    if not known:
        return
    rank = known[0].rank
    axis = int(_attr(node, "axis")) % rank
    if axis != known[0].axis:
        elementwise(state, i, node)
        return
    parts = []
    for name, L in zip(node.input, layouts, strict=True):
        if L is not None and L.axis == axis:
            parts.append(L.elems)
            continue
        shape = state.shapes.get(name) or state.dims.get(name)
        if shape is None or shape[axis] is None:
            state.block(np.concatenate([k.elems for k in known]), f"{_name(state, i)}: unknown input {name}")
            return
        fixed = state.new_elements(i, "fixed", shape[axis])
        state.block(fixed, f"{name} feeds {_name(state, i)} with channels that stay")
        parts.append(fixed)
    _set(state, node.output[0], axis, rank, np.concatenate(parts))


def split(state: State, i: int, node: onnx.NodeProto) -> None:
    x = state.layouts.get(node.input[0])
    if x is None:
        return
    axis = int(_attr(node, "axis") or 0) % x.rank
    if axis != x.axis:
        for out in node.output:
            _set(state, out, x.axis, x.rank, x.elems)
        return
    sizes = state.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else _attr(node, "split")
    if sizes is None:
        sizes = [len(x.elems) // len(node.output)] * len(node.output)
    bounds = np.cumsum([0, *[int(s) for s in sizes]])
    state.actions.append(Action("split", i, tuple(x.elems), {"bounds": bounds.tolist()}))
    for out, lo, hi in zip(node.output, bounds[:-1], bounds[1:], strict=True):
        _set(state, out, axis, x.rank, x.elems[lo:hi])


def slice_(state: State, i: int, node: onnx.NodeProto) -> None:
    x = state.layouts.get(node.input[0])
    if x is None:
        return
    starts, ends = state.constant(node.input[1]), state.constant(node.input[2])
    axes = state.constant(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    steps = state.constant(node.input[4]) if len(node.input) > 4 and node.input[4] else None
    if starts is None or ends is None:
        state.block(x.elems, f"{_name(state, i)} slices with computed bounds")
        return
    axes = list(range(len(starts))) if axes is None else [int(a) % x.rank for a in axes]
    if x.axis not in axes:
        _set(state, node.output[0], x.axis, x.rank, x.elems)
        return
    pos = axes.index(x.axis)
    if steps is not None and int(steps[pos]) != 1:
        state.block(x.elems, f"{_name(state, i)} slices channels with a step")
        return
    lo, hi, _ = slice(int(starts[pos]), int(ends[pos])).indices(len(x.elems))
    state.actions.append(Action("slice", i, tuple(x.elems), {"start": lo, "end": hi, "pos": pos}))
    _set(state, node.output[0], x.axis, x.rank, x.elems[lo:hi])


def flatten(state: State, i: int, node: onnx.NodeProto) -> None:
    x = state.layouts.get(node.input[0])
    if x is None:
        return
    shape = state.shapes.get(node.input[0])
    axis = int(_attr(node, "axis") if _attr(node, "axis") is not None else 1)
    if x.axis != 1 or axis != 1 or shape is None:
        state.block(x.elems, f"{_name(state, i)} flattens channels in a way sparsec does not follow")
        return
    hw = int(np.prod(shape[2:], dtype=np.int64))
    _set(state, node.output[0], 1, 2, np.repeat(x.elems, hw))


def reshape(state: State, i: int, node: onnx.NodeProto) -> None:
    """Only a flatten to [N, C·H·W]: each channel owns H·W consecutive features."""
    x = state.layouts.get(node.input[0])
    if x is None:
        return
    target = state.constant(node.input[1])
    shape = state.shapes.get(node.input[0])
    out = state.shapes.get(node.output[0])
    ok = (target is not None and shape is not None and out is not None and x.axis == 1
          and len(out) == 2 and out[1] == int(np.prod(shape[1:])))
    if not ok:
        state.block(x.elems, f"{_name(state, i)} reshapes the channel axis")
        return
    hw = int(np.prod(shape[2:], dtype=np.int64))
    elems = np.repeat(x.elems, hw)
    state.actions.append(Action("reshape", i, tuple(elems), {"entry": 1}))
    _set(state, node.output[0], 1, 2, elems)


def transpose(state: State, i: int, node: onnx.NodeProto) -> None:
    x = state.layouts.get(node.input[0])
    if x is not None:
        perm = list(_attr(node, "perm") or reversed(range(x.rank)))
        _set(state, node.output[0], perm.index(x.axis), x.rank, x.elems)


def pad(state: State, i: int, node: onnx.NodeProto) -> None:
    x = state.layouts.get(node.input[0])
    if x is None:
        return
    pads = state.constant(node.input[1]) if len(node.input) > 1 else _attr(node, "pads")
    axes = state.constant(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if pads is None or (axes is None and (pads[x.axis] or pads[x.axis + x.rank])):
        state.block(x.elems, f"{_name(state, i)} pads the channel axis or uses computed pads")
        return
    unary(state, i, node)


def resize(state: State, i: int, node: onnx.NodeProto) -> None:
    x = state.layouts.get(node.input[0])
    if x is None:
        return
    sizes = state.constant(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if sizes is not None:
        state.actions.append(Action("reshape", i, tuple(x.elems), {"entry": x.axis, "input": 3}))
    unary(state, i, node)


def shape_only(state: State, i: int, node: onnx.NodeProto) -> None:
    """Shape and Size read only dimensions; the pruned graph reports its own."""


register(("Conv", "ConvTranspose"), conv)
register("Gemm", gemm)
register("MatMul", matmul)
register(("BatchNormalization", "InstanceNormalization"), norm)
register(UNARY, unary)
register(("Softmax", "LogSoftmax"), softmax)
register(POOLS, pool)
register(BINARY, elementwise)
register("Concat", concat)
register("Split", split)
register("Slice", slice_)
register("Flatten", flatten)
register("Reshape", reshape)
register("Transpose", transpose)
register("Pad", pad)
register("Resize", resize)
register(("Shape", "Size"), shape_only)
