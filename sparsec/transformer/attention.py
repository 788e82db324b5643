"""Find multi-head attention blocks by structure (exporters leave weights anonymous).

From each Softmax: back through mask Add, scale Mul/Div and Where/Cast to the QKᵀ MatMul,
from its two inputs back through Transpose/Reshape and the bias Add to the constant Q and K
projections; forward from the Softmax to the MatMul with V, back from its other input to the
V projection, and on through Transpose/Reshape to the output projection. Q, K and V may come
from one fused [E, 3E] projection reshaped to [.., 3, H, D] and split into thirds (Slice, Gather,
Split, Squeeze): each side then records its third. `Shape` readers and scalars computed from
shapes (TorchScript's `context.size()`, `c // heads`) are not activations. Pure analysis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from sparsec.core.graph_index import GraphIndex
from sparsec.core.layers import node_display_name

PASS_BACK = ("Transpose", "Reshape", "Cast", "Identity", "Mul", "Div", "Expand", "Tile", "Unsqueeze")
FIRST_INPUT = ("Transpose", "Reshape", "Cast", "Identity", "Expand", "Tile", "Unsqueeze")
SCORE_WRAP = ("Add", "Mul", "Div", "Where", "Cast", "Identity", "Sub")
FUSED = ("Attention", "MultiHeadAttention", "GroupQueryAttention")
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


@dataclass(frozen=True)
class AttentionBlock:
    softmax: int
    name: str
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    heads: int
    kv_heads: int
    head_dim: int
    head_attrs: tuple[str, ...] = ()  # attributes of the attention op that carry head counts


@dataclass(frozen=True)
class FusedAttention:
    """A com.microsoft Attention node: Q, K and V in one [E, 3·hidden] weight, heads in an attribute."""

    softmax: int  # the fused node's index (blocks sort by it)
    name: str
    q: Projection  # the fused weight and bias (q.weight dims[0] is the model width)
    o: Projection
    heads: int
    kv_heads: int
    head_dim: int
    fused: bool = True


@dataclass(frozen=True)
class AttentionAnalysis:
    blocks: tuple[AttentionBlock, ...]
    unexplained: tuple[tuple[str, str], ...]  # (node, reason): Softmaxes and fused ops left alone


def find_attention(model: onnx.ModelProto) -> AttentionAnalysis:
    index = GraphIndex(model.graph)
    nodes = list(model.graph.node)
    pos = {id(n): i for i, n in enumerate(nodes)}
    blocks, unexplained = [], []
    for i, node in enumerate(nodes):
        if node.op_type in FUSED:
            fused = _fused(index, nodes, pos, i)
            if isinstance(fused, str):
                unexplained.append((node_display_name(node, i), fused))
            else:
                blocks.append(fused)
        if node.op_type != "Softmax":
            continue
        block = _match(index, nodes, pos, i)
        if isinstance(block, str):
            unexplained.append((node_display_name(node, i), block))
        else:
            blocks.append(block)
    return AttentionAnalysis(tuple(blocks), tuple(unexplained))


def _fused(index, nodes, pos, i) -> FusedAttention | str:
    node = nodes[i]
    what = f"fused {node.domain or 'ai.onnx'}.{node.op_type}"
    attrs = {a.name: a for a in node.attribute}
    onnx_attention = node.op_type == "Attention" and node.domain in ("", "ai.onnx")
    if node.op_type == "MultiHeadAttention" or onnx_attention:
        return _separate(index, nodes, pos, i, what, attrs)
    if node.op_type != "Attention" or node.domain != "com.microsoft":
        return f"{what}: not supported for head pruning"
    if "qkv_hidden_sizes" in attrs or "past_present_share_buffer" in attrs or len(node.output) > 1 \
            and any(node.output[1:]):
        return f"{what}: unequal Q/K/V sizes or a KV cache are not supported"
    weight = index.initializers.get(node.input[1])
    bias = node.input[2] if len(node.input) > 2 and node.input[2] in index.initializers else None
    heads = int(attrs["num_heads"].i) if "num_heads" in attrs else 0
    if weight is None or len(weight.dims) != 2 or heads <= 0 or weight.dims[1] % (3 * heads):
        return f"{what}: weights are not a constant [E, 3·hidden] matrix"
    o = _output_projection(index, nodes, pos, node.output[0])
    if isinstance(o, str):
        return f"{what}: {o}"
    dim = weight.dims[1] // 3 // heads
    qkv = Projection(i, node.input[1], None, bias, None)
    return FusedAttention(i, node_display_name(node, i), qkv, o, heads, heads, dim)


def _separate(index, nodes, pos, i, what: str, attrs) -> AttentionBlock | str:
    """MultiHeadAttention / ONNX Attention: Q, K and V come from their own projections."""
    node = nodes[i]
    if len(node.input) < 3 or not all(node.input[:3]) or len(node.output) > 1 and any(node.output[1:]):
        return f"{what}: needs separate Q, K and V inputs and no KV cache"
    parts = [_projection(index, nodes, pos, node.input[j]) for j in range(3)]
    o = _output_projection(index, nodes, pos, node.output[0])
    for label, part in zip(("Q", "K", "V", "output"), (*parts, o), strict=True):
        if isinstance(part, str):
            return f"{what}: {label} side: {part}"
    names = ("q_num_heads", "kv_num_heads") if "q_num_heads" in attrs else ("num_heads",)
    heads = int(attrs[names[0]].i) if names[0] in attrs else 0
    kv = int(attrs[names[-1]].i) if names[-1] in attrs else heads
    q_out = index.initializers[parts[0].weight].dims[1]
    kv_out = index.initializers[parts[1].weight].dims[1]
    if heads <= 0 or kv <= 0 or q_out % heads or kv_out % kv or q_out // heads != kv_out // kv:
        return f"{what}: head counts do not match the projection widths"
    return AttentionBlock(i, node_display_name(node, i), *parts, o, heads, kv, q_out // heads, names)


def _producer(index, pos, name):
    node = index.producer.get(name)
    return (None, None) if node is None else (node, pos[id(node)])


def _dynamic_input(index, node) -> str | None:
    """The one input of a binary op that is not a constant (nor computed from shapes only)."""
    live = [n for n in node.input if n and index.resolve(n) is None and n not in index.constant_nodes
            and n not in index.initializers and not _from_shapes(index, n)]
    return live[0] if len(live) == 1 else None


def _from_shapes(index, name: str, depth: int = 8) -> bool:
    """True for a tensor computed only from `Shape`s and constants (a scale `head_dim ** -0.5`)."""
    if name in index.initializers or name in index.constant_nodes:
        return True
    node = index.producer.get(name)
    if node is None or depth == 0:
        return False
    if node.op_type in ("Shape", "Size"):
        return True
    return all(_from_shapes(index, x, depth - 1) for x in node.input if x)


def _projection(index, nodes, pos, name) -> Projection | str:
    reshapes: list[int] = []
    select = None  # [third, parts or None, axis]: a third of a fused QKV tensor, walking back to its Reshape
    part = None  # (third, parts) once that Reshape is found
    for _ in range(16):
        node, i = _producer(index, pos, name)
        if node is None:
            return f"{name} does not come from a projection"
        if node.op_type in SELECT:
            if select is not None or part is not None:
                return f"{node_display_name(node, i)}: two selections of a fused QKV tensor"
            select = _select(index, node, name)
            if isinstance(select, str):
                return f"{node_display_name(node, i)}: {select}"
            name = select.pop()
            continue
        if select is not None:
            if node.op_type in ("Identity", "Cast"):
                name = node.input[0]
                continue
            if node.op_type == "Transpose":
                perm = list(_attr(node, "perm") or [])
                axis = select[2] + len(perm) if select[2] < 0 else select[2]
                if not 0 <= axis < len(perm):
                    return f"{node_display_name(node, i)}: fused QKV axis not followed"
                select[2] = perm[axis]
                name = node.input[0]
                continue
            if node.op_type != "Reshape":
                return f"{node_display_name(node, i)} ({node.op_type}) between fused QKV and its split"
            parts = _fused_parts(index, node, select)
            if isinstance(parts, str):
                return f"{node_display_name(node, i)}: {parts}"
            part, select = (select[0], parts), None
            reshapes.append(i)
            name = node.input[0]
            continue
        if node.op_type == "Reshape":
            reshapes.append(i)
        if node.op_type in PASS_BACK:
            nxt = node.input[0] if node.op_type in FIRST_INPUT else _dynamic_input(index, node)
            if nxt is None:
                return f"{node_display_name(node, i)} mixes two activations"
            name = nxt
            continue
        bias_add, bias = None, None
        if node.op_type == "Add":
            live = _dynamic_input(index, node)
            if live is None:
                return f"{node_display_name(node, i)} is not a bias Add"
            bias_add, bias = i, next(n for n in node.input if n != live)
            node, i = _producer(index, pos, live)
            if node is None:
                return "bias Add without a projection"
        if node.op_type == "MatMul" and index.resolve(node.input[1]) is not None:
            src = index.resolve(node.input[1])
            if src.steps or src.storage != "initializer":
                return f"{node_display_name(node, i)}: weight is not a plain initializer"
            split = reshapes[-1] if reshapes else None  # the one right after the projection
            return Projection(i, src.key, bias_add, bias, split, tuple(reshapes[:-1]), part)
        if select is not None:
            return f"{node_display_name(node, i)}: fused QKV split without its head Reshape"
        return f"{node_display_name(node, i)} ({node.op_type}) is not a constant-weight MatMul"
    return f"{name}: projection too far back"


def _attr(node, name: str):
    found = next((a for a in node.attribute if a.name == name), None)
    return None if found is None else onnx.helper.get_attribute_value(found)


def _ints(index, node, k: int, attr: str) -> list[int] | None:
    """A constant integer list from input k (newer opsets) or attribute `attr` (older ones)."""
    if len(node.input) > k and node.input[k]:
        value = _const(index, node.input[k])
        return None if value is None else [int(v) for v in np.ravel(value)]
    value = _attr(node, attr)
    return None if value is None else [int(v) for v in np.ravel(value)]


def _select(index, node, name: str) -> list | str:
    """[third, parts (None until the Reshape says), axis, input to walk on] of a Slice, Gather, Split or
    Squeeze(Slice|Split) picking one part of a fused QKV tensor."""
    if node.op_type == "Squeeze":  # unbind: the Slice or Split before it picks the part
        axes = _ints(index, node, 1, "axes")
        if not axes or len(axes) != 1:
            return "Squeeze without one constant axis"
        inner = index.producer.get(node.input[0])
        if inner is None or inner.op_type not in ("Slice", "Split"):
            return "Squeeze without a Slice or Split"
        found = _select(index, inner, node.input[0])
        return found if isinstance(found, str) or found[2] == axes[0] else "Squeeze on another axis"
    if node.op_type == "Gather":
        value = _const(index, node.input[1])
        if value is None or np.ndim(value) != 0:
            return "Gather without one constant index"
        return [int(value), None, int(_attr(node, "axis") or 0), node.input[0]]
    if node.op_type == "Split":
        sizes = _ints(index, node, 1, "split")
        if sizes and len(set(sizes)) != 1 or sizes and sizes[0] != 1:
            return "Split into unequal parts"
        return [list(node.output).index(name), len(node.output), int(_attr(node, "axis") or 0), node.input[0]]
    starts, ends = _ints(index, node, 1, "starts"), _ints(index, node, 2, "ends")
    axes, steps = _ints(index, node, 3, "axes"), _ints(index, node, 4, "steps")
    if not starts or not ends or len(starts) != 1 or (axes is not None and len(axes) != 1) \
            or steps not in (None, [1]) or starts[0] < 0:
        return "Slice is not one constant part"
    return [starts[0], ("end", ends[0]), (axes or [0])[0], node.input[0]]


def _fused_parts(index, reshape, select: list) -> int | str:
    """How many parts the Reshape splits the projection into, with the part axis right before [H, D]."""
    target = _const(index, reshape.input[1])
    if target is None:
        concat = index.producer.get(reshape.input[1])
        if concat is None or concat.op_type != "Concat":
            return "fused QKV Reshape target is not known"
        pieces = [_const(index, x) for x in concat.input]
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


def _match(index, nodes, pos, s) -> AttentionBlock | str:
    name = nodes[s].input[0]
    for _ in range(6):  # back through mask Add and scale to the scores MatMul
        node, i = _producer(index, pos, name)
        if node is None:
            return "no QKᵀ MatMul before the Softmax"
        if node.op_type == "MatMul":
            break
        if node.op_type not in SCORE_WRAP:
            return f"{node_display_name(node, i)} ({node.op_type}) between QKᵀ and Softmax"
        name = node.input[0] if node.op_type != "Where" else node.input[2]
    else:
        return "no QKᵀ MatMul before the Softmax"
    qk = node
    q, k = (_projection(index, nodes, pos, qk.input[j]) for j in (0, 1))
    av = _forward_matmul(index, nodes, pos, nodes[s].output[0])
    if av is None:
        return "no MatMul with V after the Softmax"
    v = _projection(index, nodes, pos, nodes[av].input[1])
    o = _output_projection(index, nodes, pos, nodes[av].output[0])
    for label, part in (("Q", q), ("K", k), ("V", v), ("output", o)):
        if isinstance(part, str):
            return f"{label} side: {part}"
    weights = {p.weight: index.initializers[p.weight] for p in (q, k, v, o)}
    q_out, kv_out = (_width(p, weights[p.weight]) for p in (q, k))
    fused = _fused_consistent(q, k, v)
    if fused is not None:
        return fused
    dim = _head_dim(index, nodes, q.reshape, q_out)
    if dim is None or q_out % dim or kv_out % dim or weights[o.weight].dims[0] != q_out:
        return "head size not found in the Q Reshape"
    return AttentionBlock(s, node_display_name(nodes[s], s), q, k, v, o, q_out // dim, kv_out // dim, dim)


def _width(proj: Projection, weight: onnx.TensorProto) -> int:
    start, stop = part_columns(proj, int(weight.dims[1]))
    return stop - start


def _fused_consistent(q: Projection, k: Projection, v: Projection) -> str | None:
    """Q, K and V from one fused weight must be its three distinct parts, split by one Reshape."""
    fused = [p.part is not None for p in (q, k, v)]
    if not any(fused):
        return None
    if not all(fused) or len({p.weight for p in (q, k, v)}) != 1 or len({p.reshape for p in (q, k, v)}) != 1 \
            or sorted(p.part[0] for p in (q, k, v)) != [0, 1, 2] or q.part[1] != 3:
        return "fused QKV: Q, K and V are not the three parts of one projection"
    return None


def _forward_matmul(index, nodes, pos, name) -> int | None:
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


def _output_projection(index, nodes, pos, name) -> Projection | str:
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
                         and _dynamic_input(index, a) == user.output[0]), None)
        bias = None if bias_add is None else next(n for n in nodes[bias_add].input if n != user.output[0])
        return Projection(pos[id(user)], src.key, bias_add, bias, reshape)
    return "no output projection"


def _head_dim(index, nodes, reshape, width: int) -> int | None:
    """The last entry of the Q Reshape's target: a constant, or a constant piece of a Concat; when
    that piece is computed (TorchScript's `c // heads`), the width over the constant head count before it."""
    if reshape is None:
        return None
    target = nodes[reshape].input[1]
    value = _const(index, target)
    if value is None:
        node = index.producer.get(target)
        if node is None or node.op_type != "Concat":
            return None
        value = _const(index, node.input[-1])
        if value is None and len(node.input) >= 2:
            heads = _const(index, node.input[-2])
            if heads is not None and np.size(heads) == 1 and int(np.ravel(heads)[0]) > 0 \
                    and width % int(np.ravel(heads)[0]) == 0:
                return width // int(np.ravel(heads)[0])
    return None if value is None or int(np.ravel(value)[-1]) <= 0 else int(np.ravel(value)[-1])


def _const(index, name):
    node = index.producer.get(name)
    while node is not None and node.op_type == "Identity":  # Paddle exports route constants through Identity
        name, node = node.input[0], index.producer.get(node.input[0])
    if name in index.initializers:
        return onnx.numpy_helper.to_array(index.initializers[name])
    if name in index.constant_nodes:
        return onnx.numpy_helper.to_array(index.constant_nodes[name].attribute[0].t)
    return None
