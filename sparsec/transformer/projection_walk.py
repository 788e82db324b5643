"""Walk from an attention activation to the constant-weight MatMul that projects it.

Back from Q, K or V through Transpose/Reshape, scale Mul/Div, the bias Add (and, for a fused QKV
weight, the part selection and its [.., 3, H, D] Reshape) to the projection; forward from the context
through Transpose/Reshape to the output projection. `Shape` readers and scalars computed from shapes
(TorchScript's `context.size()`, `c // heads`) are not activations. Pure analysis.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from sparsec.core.graph_index import GraphIndex
from sparsec.core.layers import node_display_name
from sparsec.transformer.qkv_parts import attr_value, fused_parts, select_part

PASS_BACK = ("Transpose", "Reshape", "Cast", "Identity", "Mul", "Div", "Expand", "Tile", "Unsqueeze")
FIRST_INPUT = ("Transpose", "Reshape", "Cast", "Identity", "Expand", "Tile", "Unsqueeze")
SELECT = ("Squeeze", "Slice", "Gather", "Split")


@dataclass(frozen=True)
class Projection:
    matmul: int  # node index
    weight: str  # initializer feeding input 1
    bias_add: int | None  # node index of the Add with a constant bias
    bias: str | None
    reshape: int | None  # the Reshape that splits (or merges) heads, next to the projection
    repeats: tuple[int, ...] = ()  # Reshapes after a K/V head repeat (grouped-query attention)
    part: tuple[int, int] | None = None  # (third, parts) of a fused QKV weight laid out part-major


def part_columns(proj: Projection, total: int) -> tuple[int, int]:
    """The [start, stop) columns of the weight (and bias) this projection reads."""
    if proj.part is None:
        return 0, total
    width = total // proj.part[1]
    return proj.part[0] * width, (proj.part[0] + 1) * width


def producer(index: GraphIndex, pos: dict[int, int], name: str):
    """(node, its index) producing ``name``, or (None, None)."""
    node = index.producer.get(name)
    return (None, None) if node is None else (node, pos[id(node)])


def dynamic_input(index: GraphIndex, node: onnx.NodeProto) -> str | None:
    """The one input of a binary op that is not a constant (nor computed from shapes only)."""
    live = [n for n in node.input if n and index.resolve(n) is None and n not in index.constant_nodes
            and n not in index.initializers and not _from_shapes(index, n)]
    return live[0] if len(live) == 1 else None


def _from_shapes(index: GraphIndex, name: str, depth: int = 8) -> bool:
    """True for a tensor computed only from `Shape`s and constants (a scale `head_dim ** -0.5`)."""
    if name in index.initializers or name in index.constant_nodes:
        return True
    node = index.producer.get(name)
    if node is None or depth == 0:
        return False
    if node.op_type in ("Shape", "Size"):
        return True
    return all(_from_shapes(index, x, depth - 1) for x in node.input if x)


def projection(index: GraphIndex, nodes: list, pos: dict[int, int], name: str) -> Projection | str:
    """The projection ``name`` comes from, or why there is none."""
    reshapes: list[int] = []
    select = None  # [third, parts or None, axis]: a third of a fused QKV tensor, walking back to its Reshape
    part = None  # (third, parts) once that Reshape is found
    for _ in range(16):
        node, i = producer(index, pos, name)
        if node is None:
            return f"{name} does not come from a projection"
        label = node_display_name(node, i)
        if node.op_type in SELECT:
            if select is not None or part is not None:
                return f"{label}: two selections of a fused QKV tensor"
            select = select_part(index, node, name)
            if isinstance(select, str):
                return f"{label}: {select}"
            name = select.pop()
            continue
        if select is not None:
            parts = _toward_split(index, node, label, select)
            if isinstance(parts, str):
                return parts
            if parts is not None:  # the Reshape that splits the fused projection
                part, select = (select[0], parts), None
                reshapes.append(i)
            name = node.input[0]
            continue
        if node.op_type == "Reshape":
            reshapes.append(i)
        if node.op_type in PASS_BACK:
            nxt = node.input[0] if node.op_type in FIRST_INPUT else dynamic_input(index, node)
            if nxt is None:
                return f"{label} mixes two activations"
            name = nxt
            continue
        return _at_projection(index, pos, node, i, reshapes, part)
    return f"{name}: projection too far back"


def _toward_split(index: GraphIndex, node: onnx.NodeProto, label: str, select: list) -> int | str | None:
    """One step back from a fused QKV selection: None to walk on (Identity, Cast, a Transpose moving the
    part axis), the part count at the splitting Reshape, or why the walk stops."""
    if node.op_type in ("Identity", "Cast"):
        return None
    if node.op_type == "Transpose":
        perm = list(attr_value(node, "perm") or [])
        axis = select[2] + len(perm) if select[2] < 0 else select[2]
        if not 0 <= axis < len(perm):
            return f"{label}: fused QKV axis not followed"
        select[2] = perm[axis]
        return None
    if node.op_type != "Reshape":
        return f"{label} ({node.op_type}) between fused QKV and its split"
    parts = fused_parts(index, node, select)
    return f"{label}: {parts}" if isinstance(parts, str) else parts


def _at_projection(index: GraphIndex, pos: dict[int, int], node: onnx.NodeProto, i: int,
                   reshapes: list[int], part: tuple[int, int] | None) -> Projection | str:
    """The end of the walk back: [bias Add ->] MatMul with a plain initializer weight."""
    bias_add, bias = None, None
    if node.op_type == "Add":
        live = dynamic_input(index, node)
        if live is None:
            return f"{node_display_name(node, i)} is not a bias Add"
        bias_add, bias = i, next(n for n in node.input if n != live)
        node, i = producer(index, pos, live)
        if node is None:
            return "bias Add without a projection"
    if node.op_type == "MatMul" and index.resolve(node.input[1]) is not None:
        src = index.resolve(node.input[1])
        if src.steps or src.storage != "initializer":
            return f"{node_display_name(node, i)}: weight is not a plain initializer"
        split = reshapes[-1] if reshapes else None  # the one right after the projection
        return Projection(i, src.key, bias_add, bias, split, tuple(reshapes[:-1]), part)
    return f"{node_display_name(node, i)} ({node.op_type}) is not a constant-weight MatMul"


def forward_matmul(index: GraphIndex, nodes: list, pos: dict[int, int], name: str) -> int | None:
    """The MatMul that multiplies the probabilities ``name`` with V (through Where/Cast/Identity/Dropout)."""
    for _ in range(4):
        users = index.consumers.get(name, [])
        mm = [u for u in users if u.op_type == "MatMul" and u.input[0] == name]
        if mm:
            return pos[id(mm[0])]
        nxt = [u for u in users if u.op_type in ("Where", "Cast", "Identity", "Dropout")]
        if len(nxt) != 1:
            return None
        name = nxt[0].output[0]
    return None


def output_projection(index: GraphIndex, nodes: list, pos: dict[int, int], name: str) -> Projection | str:
    """The output projection reading the context ``name`` (through Transpose/Reshape/Cast/Identity)."""
    reshape = None
    for _ in range(4):
        users = [u for u in index.consumers.get(name, []) if u.op_type != "Shape"]  # size() is no real use
        if len(users) != 1:
            return "context has several users"
        user = users[0]
        if user.op_type == "Reshape":
            reshape = pos[id(user)]
        if user.op_type in ("Transpose", "Reshape", "Cast", "Identity"):
            name = user.output[0]
            continue
        src = index.resolve(user.input[1]) if user.op_type == "MatMul" else None
        if src is None or src.steps or user.input[0] != name:
            return f"{user.op_type} after the context is not the output projection"
        after = index.consumers.get(user.output[0], [])
        bias_add = next((pos[id(a)] for a in after if a.op_type == "Add" and len(after) == 1
                         and dynamic_input(index, a) == user.output[0]), None)
        bias = None if bias_add is None else next(n for n in nodes[bias_add].input if n != user.output[0])
        return Projection(pos[id(user)], src.key, bias_add, bias, reshape)
    return "no output projection"
