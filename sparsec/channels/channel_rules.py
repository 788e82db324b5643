"""What each op does to the channel axis: one explicit table, one function per kind of op.

A rule reads its inputs' layouts, records the edits removal needs (typed `Edit`s), writes its
outputs' layouts, and blocks what it cannot follow. Weight-bearing ops (Conv, Gemm, MatMul, ...)
share one rule that reads their axes from `core.op_table.WEIGHT_OPS`; the pass-through and
coupling ops are in `RULES` here. An op in neither blocks every channel it touches (`unknown_op`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from sparsec.channels.channel_state import (
    ConsumerCut,
    DepthwiseCut,
    Layout,
    ParamCut,
    ProducerCut,
    ReshapeCut,
    SliceCut,
    SplitCut,
    State,
    TargetCut,
)
from sparsec.channels.reshape_target import last_entry
from sparsec.core.graph_index import _attr
from sparsec.core.op_table import Registry, weight_op

Rule = Callable[[State, int, onnx.NodeProto], None]
RULES: Registry[Rule] = Registry("channel rule")

UNARY = ("Relu", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "LeakyRelu", "Elu", "Selu", "Celu",
         "Softplus", "Softsign", "Gelu", "Erf", "Identity", "Dropout", "Clip", "Cast", "Neg", "Abs",
         "Exp", "Log", "Sqrt", "Reciprocal", "Mish", "ThresholdedRelu", "Floor", "Ceil", "Round")
BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu")
POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool")


def register(op_types: tuple[str, ...] | str, rule: Rule) -> None:
    """Add a rule; a second rule for the same op (or a rule for a weight op) is a bug, not an override."""
    for op in (op_types,) if isinstance(op_types, str) else op_types:
        if weight_op(op) is not None:
            raise ValueError(f"{op} is a weight op: its channels come from core.op_table.WEIGHT_OPS")
    RULES.register(op_types, rule)


def rule_for(op_type: str) -> Rule:
    """The rule of an op: its own, the weight rule for a weight op of the op table, else unknown_op."""
    rule = RULES.get(op_type)
    if rule is not None:
        return rule
    return weight_layer if weight_op(op_type) is not None else unknown_op


def _name(state: State, i: int) -> str:
    return state.ids[i]


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


def _block_inputs(state: State, node: onnx.NodeProto, reason: str) -> None:
    for name in node.input:
        if name in state.layouts:
            state.block(state.layouts[name].elems, reason)


def weight_layer(state: State, i: int, node: onnx.NodeProto) -> None:
    """A weight op of the op table with its own constant weight on its preferred input: it reads
    channels along the weight's reduction axis (a ConsumerCut) and makes new ones along its output
    axis (a ProducerCut); a depthwise Conv passes its input channels through (a DepthwiseCut)."""
    spec = weight_op(node.op_type)
    assert spec is not None and spec.axes is not None
    k = spec.weight_input
    axes = spec.axes(node, k)
    w = _own_weight(state, node.input[k]) if k < len(node.input) else None
    if w is None or (w.ndim < 3 if spec.kernel else w.ndim != 2):
        other = [j for j in spec.inputs[1:]
                 if j < len(node.input) and state.constant(node.input[j]) is not None]
        why = (f"reads channels with a constant {spec.input_name(other[0])}" if other and w is None else
               f"has a shared, computed or rank-{w.ndim if w is not None else '?'} weight "
               f"{spec.input_name(k)}")
        _block_inputs(state, node, f"{_name(state, i)}: {node.op_type} {why}")
        return
    data = next(n for j, n in enumerate(node.input) if j != k)  # the activation
    rank = len(w.shape) if spec.kernel else state.rank(data) or state.rank(node.output[0])
    if rank is None:
        _block_inputs(state, node, f"{_name(state, i)}: rank of {data} is unknown")
        return
    for j, name in enumerate(node.input):  # channels on the bias or any other input: not followed
        if name in state.layouts and name != data:
            state.block(state.layouts[name].elems, f"{_name(state, i)}: channels arrive on input {j}")
    x = state.layouts.get(data)
    in_axis, out_axis = axes.data_axis % rank, axes.out_axis % rank
    if x is not None and (x.axis != in_axis or in_axis != out_axis):
        state.block(x.elems, f"{_name(state, i)}: {node.op_type} reads channels on axis {x.axis}, "
                             f"not on axis {out_axis} where it writes them")
    elif x is not None and axes.groups == 1:
        state.actions.append(ConsumerCut(_name(state, i), tuple(x.elems), k, axes.reduction))
    elif x is not None and axes.output == 0 and w.shape[axes.reduction] == 1 and axes.groups == len(x.elems):
        mult = w.shape[axes.output] // axes.groups
        out = np.repeat(x.elems, mult)
        state.actions.append(DepthwiseCut(_name(state, i), tuple(out), mult))
        _set(state, node.output[0], out_axis, x.rank, out)
        return
    elif x is not None:
        state.block(x.elems, f"grouped {_name(state, i)} (group={axes.groups}) would need whole groups")
        return
    if axes.groups != 1:
        return
    elems = state.new_elements(i, node.op_type, w.shape[axes.output])
    state.actions.append(ProducerCut(_name(state, i), tuple(elems), k, axes.output, axes.bias))
    _set(state, node.output[0], out_axis, rank, elems)


def norm(state: State, i: int, node: onnx.NodeProto) -> None:
    """BatchNormalization / InstanceNormalization: per-channel parameters on axis 1."""
    x = state.layouts.get(node.input[0])
    if x is None:
        return
    if x.axis != 1 or len(node.output) > 1 and any(node.output[1:]):
        state.block(x.elems, f"{_name(state, i)} normalises another axis or trains")
        return
    for k in range(1, len(node.input)):
        state.actions.append(ParamCut(_name(state, i), tuple(x.elems), k, 0))
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
        state.actions.append(ParamCut(_name(state, i), tuple(base.elems), k, at))
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
    state.actions.append(SplitCut(_name(state, i), tuple(x.elems), tuple(int(b) for b in bounds)))
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
    state.actions.append(SliceCut(_name(state, i), tuple(x.elems), lo, hi, pos))
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
    """A flatten to [N, C·H·W] (each channel owns H·W consecutive features), or a regrouping of the
    leading dims that keeps the last axis (`reshape_target`)."""
    x = state.layouts.get(node.input[0])
    if x is None:
        return
    target = state.constant(node.input[1])
    shape = state.shapes.get(node.input[0])
    out = state.shapes.get(node.output[0])
    ok = (target is not None and shape is not None and out is not None and x.axis == 1
          and len(out) == 2 and out[1] == int(np.prod(shape[1:])))
    if not ok and x.axis == x.rank - 1 > 0:
        _regroup_leading(state, i, node, x)
        return
    if not ok:
        state.block(x.elems, f"{_name(state, i)} reshapes the channel axis")
        return
    hw = int(np.prod(shape[2:], dtype=np.int64))
    elems = np.repeat(x.elems, hw)
    state.actions.append(ReshapeCut(_name(state, i), tuple(elems), 1, 1))
    _set(state, node.output[0], 1, 2, elems)


def _regroup_leading(state: State, i: int, node: onnx.NodeProto, x: Layout) -> None:
    entry = last_entry(state, node, len(x.elems), x.rank)
    if isinstance(entry, str):
        state.block(x.elems, f"{_name(state, i)} reshapes the channel axis: {entry}")
        return
    if not entry.follows:
        state.actions.append(TargetCut(_name(state, i), tuple(x.elems), entry.concat, entry.input))
    _set(state, node.output[0], entry.out_rank - 1, entry.out_rank, x.elems)


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
        state.actions.append(ReshapeCut(_name(state, i), tuple(x.elems), 3, x.axis))
    unary(state, i, node)


def shape_only(state: State, i: int, node: onnx.NodeProto) -> None:
    """Shape and Size read only dimensions; the pruned graph reports its own."""


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
