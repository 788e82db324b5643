"""What a Reshape's target shape does to its input's last axis, for the channel rule of a Reshape that
only regroups leading dims (GPT-2's Conv1D: `view(-1, nx)` → Gemm → `view(size_out)`).

A row-major reshape whose last dim has the same size before and after keeps every element's last index
(flat index = leading index · C + c), so channels on the last axis pass through. Removing some then needs
the target's last entry to follow the new width: a constant sparsec can rewrite (the target itself, or
the constant last piece of the Concat that builds it), or a read of the data's own last dim
(`Shape(x)[-1]`, or a 0 copying it) that follows by itself. Anything else blocks, with the reason.
Pure analysis: never edits the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from sparsec.channels.channel_state import State
from sparsec.core.graph_index import _attr

_CARRY = ("Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape")  # carry one dim value unchanged
_FOLLOWS = "follows"  # a target entry that reads the data's own last dim


@dataclass(frozen=True)
class LastEntry:
    """How the target's last entry follows a cut. `concat` is the id of the Concat holding the constant
    last piece on input `input` (None: the Reshape's own constant target, input 1); `follows`: the entry
    reads the data's last dim and needs no rewrite."""

    out_rank: int
    concat: str | None = None
    input: int = 1
    follows: bool = False


def dim_read(state: State, name: str) -> tuple[str, int] | None:
    """(tensor, axis) when the one-element value `name` is a dim of `tensor` read by a Shape (whole,
    Gather-ed or Slice-d to one entry, through Unsqueeze/Squeeze/Cast); else None."""
    node = state.index.producer.get(name)
    while node is not None and node.op_type in _CARRY:
        node = state.index.producer.get(node.input[0])
    if node is not None and node.op_type == "Shape":
        return _shape_entry(state, node, 0) if _shape_length(state, node) == 1 else None
    src = state.index.producer.get(node.input[0]) if node is not None and node.input else None
    if src is None or src.op_type != "Shape":
        return None
    if node.op_type == "Gather":
        idx = state.constant(node.input[1])
        return None if idx is None or idx.size != 1 else _shape_entry(state, src, int(idx.reshape(-1)[0]))
    if node.op_type == "Slice" and len(node.input) >= 3:
        starts, ends = state.constant(node.input[1]), state.constant(node.input[2])
        steps = state.constant(node.input[4]) if len(node.input) > 4 and node.input[4] else None
        if starts is None or ends is None or starts.size != 1 or steps is not None and int(steps[0]) != 1:
            return None
        n = _shape_length(state, src)
        if n is None:
            return None
        lo, hi, _ = slice(int(starts[0]), int(ends[0])).indices(n)
        return _shape_entry(state, src, lo) if hi - lo == 1 else None
    return None


def _shape_length(state: State, shape: onnx.NodeProto) -> int | None:
    span = _shape_span(state, shape)
    return None if span is None else span[1] - span[0]


def _shape_span(state: State, shape: onnx.NodeProto) -> tuple[int, int] | None:
    """The input axes [lo, hi) a Shape reads (its start/end attributes, opset 15)."""
    rank = state.rank(shape.input[0])
    if rank is None:
        return None
    end = _attr(shape, "end")
    lo, hi, _ = slice(int(_attr(shape, "start") or 0), None if end is None else int(end)).indices(rank)
    return lo, max(hi, lo)


def _shape_entry(state: State, shape: onnx.NodeProto, k: int) -> tuple[str, int] | None:
    """Entry `k` (negative: from the end) of a Shape's output as (tensor, axis)."""
    span = _shape_span(state, shape)
    if span is None or not -(span[1] - span[0]) <= k < span[1] - span[0]:
        return None
    return shape.input[0], span[0] + k % (span[1] - span[0])


def last_entry(state: State, node: onnx.NodeProto, width: int, in_rank: int) -> LastEntry | str:
    """How the last entry of a Reshape's target keeps the `width` channels on its input's last axis
    through a cut, or why it cannot."""
    target = state.constant(node.input[1])
    if target is not None:
        return _check(state, node, target.reshape(-1).tolist(), width, in_rank, LastEntry(target.size))
    concat = state.index.producer.get(node.input[1])
    if concat is None or concat.op_type != "Concat":
        return "its target shape is computed"
    pieces: list = []
    for k, name in enumerate(concat.input):
        value = state.constant(name)
        if value is not None:
            pieces += [int(v) for v in value.reshape(-1)]
            continue
        read = dim_read(state, name)
        if read is None:
            return f"its target's piece {name} is computed"
        layout = state.layouts.get(read[0])
        if layout is not None and layout.axis == read[1]:  # a channel dim: only the last may read it
            if k != len(concat.input) - 1 or read[0] != node.input[0]:
                return f"its target's piece {name} reads a channel dim"
            pieces.append(_FOLLOWS)
        else:
            pieces.append(None)  # a leading dim read off another axis or tensor
    last = concat.input[-1]
    value = state.constant(last)
    if pieces[-1] != _FOLLOWS and (value is None or value.size == 0):
        return "the last piece of its target is neither a constant nor the data's last dim"
    cid = state.ids[state.index.position[id(concat)]]
    return _check(state, node, pieces, width, in_rank, LastEntry(len(pieces), cid, len(concat.input) - 1))


def _check(state: State, node: onnx.NodeProto, values: list, width: int, in_rank: int,
           entry: LastEntry) -> LastEntry | str:
    """The last entry must be `width` or follow the data; no leading 0 may copy the channel dim."""
    allowzero = bool(_attr(node, "allowzero") or 0)
    copies = values[-1] == 0 and not allowzero and len(values) == in_rank
    if values[-1] == -1:  # inferred: follows when the leading dims are kept (dense output's last is C)
        out = state.shapes.get(node.output[0]) or state.dims.get(node.output[0])
        if out is None or out[-1] != width:
            return "its last dim is inferred (-1) and not known to equal the channel count"
        values = [*values[:-1], _FOLLOWS]
    if values[-1] != width and values[-1] != _FOLLOWS and not copies:
        return f"its last dim changes ({width} → {values[-1]})"
    if not allowzero and in_rank - 1 < len(values) - 1 and values[in_rank - 1] == 0:
        return "a 0 in its target copies the channel dim"
    follows = copies or values[-1] == _FOLLOWS
    return LastEntry(entry.out_rank, entry.concat, entry.input, follows)
