"""Find multi-head attention blocks by structure (exporters leave weights anonymous).

From each Softmax: back through mask Add, scale Mul/Div and Where/Cast to the QKᵀ MatMul,
from its two inputs back through Transpose/Reshape and the bias Add to the constant Q and K
projections; forward from the Softmax to the MatMul with V, back from its other input to the
V projection, and on through Transpose/Reshape to the output projection. Pure analysis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from sparsec.layers import node_display_name
from sparsec.weights import GraphIndex

PASS_BACK = ("Transpose", "Reshape", "Cast", "Identity", "Mul", "Div", "Expand", "Tile", "Unsqueeze")
FIRST_INPUT = ("Transpose", "Reshape", "Cast", "Identity", "Expand", "Tile", "Unsqueeze")
SCORE_WRAP = ("Add", "Mul", "Div", "Where", "Cast", "Identity", "Sub")
FUSED = ("Attention", "MultiHeadAttention", "GroupQueryAttention")


@dataclass(frozen=True)
class Projection:
    matmul: int  # node index
    weight: str  # initializer feeding input 1
    bias_add: int | None  # node index of the Add with a constant bias
    bias: str | None
    reshape: int | None  # the Reshape that splits (or merges) heads, next to the projection
    repeats: tuple[int, ...] = ()  # Reshapes after a K/V head repeat (grouped-query attention)


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
    """The one input of a binary op that is not a constant."""
    live = [n for n in node.input if n and index.resolve(n) is None and n not in index.constant_nodes
            and n not in index.initializers]
    return live[0] if len(live) == 1 else None


def _projection(index, nodes, pos, name) -> Projection | str:
    reshapes: list[int] = []
    for _ in range(12):
        node, i = _producer(index, pos, name)
        if node is None:
            return f"{name} does not come from a projection"
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
            return Projection(i, src.key, bias_add, bias, split, tuple(reshapes[:-1]))
        return f"{node_display_name(node, i)} ({node.op_type}) is not a constant-weight MatMul"
    return f"{name}: projection too far back"


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
    q_out, kv_out = weights[q.weight].dims[1], weights[k.weight].dims[1]
    dim = _head_dim(index, nodes, q.reshape)
    if dim is None or q_out % dim or kv_out % dim or weights[o.weight].dims[0] != q_out:
        return "head size not found in the Q Reshape"
    return AttentionBlock(s, node_display_name(nodes[s], s), q, k, v, o, q_out // dim, kv_out // dim, dim)


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
        users = index.consumers.get(name, [])
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


def _head_dim(index, nodes, reshape) -> int | None:
    """The last entry of the Q Reshape's target: a constant, or a constant piece of a Concat."""
    if reshape is None:
        return None
    target = nodes[reshape].input[1]
    value = _const(index, target)
    if value is None:
        node = index.producer.get(target)
        if node is None or node.op_type != "Concat":
            return None
        value = _const(index, node.input[-1])
    return None if value is None or int(np.ravel(value)[-1]) <= 0 else int(np.ravel(value)[-1])


def _const(index, name):
    if name in index.initializers:
        return onnx.numpy_helper.to_array(index.initializers[name])
    if name in index.constant_nodes:
        return onnx.numpy_helper.to_array(index.constant_nodes[name].attribute[0].t)
    return None
