"""Find multi-head attention blocks by structure (exporters leave weights anonymous).

From each Softmax: back through mask Add, scale Mul/Div and Where/Cast to the QKᵀ MatMul,
from its two inputs back through Transpose/Reshape and the bias Add to the constant Q and K
projections; forward from the Softmax to the MatMul with V, back from its other input to the
V projection, and on through Transpose/Reshape to the output projection. Q, K and V may come
from one fused [E, 3E] projection reshaped to [.., 3, H, D] and split into thirds (Slice, Gather,
Split, Squeeze): each side then records its third. The walks to the projections are in
projection_walk.py, the fused-QKV part reading in qkv_parts.py; this module matches whole blocks
(Softmax patterns and fused Attention/MultiHeadAttention ops) and finds their head counts. Pure analysis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from sparsec.core.graph_index import GraphIndex
from sparsec.core.layers import node_display_name
from sparsec.transformer.projection_walk import (
    Projection,
    forward_matmul,
    output_projection,
    part_columns,
    producer,
    projection,
)
from sparsec.transformer.qkv_parts import const_value

SCORE_WRAP = ("Add", "Mul", "Div", "Where", "Cast", "Identity", "Sub")
FUSED = ("Attention", "MultiHeadAttention", "GroupQueryAttention")


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
    o = output_projection(index, nodes, pos, node.output[0])
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
    parts = [projection(index, nodes, pos, node.input[j]) for j in range(3)]
    o = output_projection(index, nodes, pos, node.output[0])
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


def _match(index, nodes, pos, s) -> AttentionBlock | str:
    name = nodes[s].input[0]
    for _ in range(6):  # back through mask Add and scale to the scores MatMul
        node, i = producer(index, pos, name)
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
    q, k = (projection(index, nodes, pos, qk.input[j]) for j in (0, 1))
    av = forward_matmul(index, nodes, pos, nodes[s].output[0])
    if av is None:
        return "no MatMul with V after the Softmax"
    v = projection(index, nodes, pos, nodes[av].input[1])
    o = output_projection(index, nodes, pos, nodes[av].output[0])
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


def _head_dim(index, nodes, reshape, width: int) -> int | None:
    """The last entry of the Q Reshape's target: a constant, or a constant piece of a Concat; when
    that piece is computed (TorchScript's `c // heads`), the width over the constant head count before it."""
    if reshape is None:
        return None
    target = nodes[reshape].input[1]
    value = const_value(index, target)
    if value is None:
        node = index.producer.get(target)
        if node is None or node.op_type != "Concat":
            return None
        value = const_value(index, node.input[-1])
        if value is None and len(node.input) >= 2:
            heads = const_value(index, node.input[-2])
            if heads is not None and np.size(heads) == 1 and int(np.ravel(heads)[0]) > 0 \
                    and width % int(np.ravel(heads)[0]) == 0:
                return width // int(np.ravel(heads)[0])
    return None if value is None or int(np.ravel(value)[-1]) <= 0 else int(np.ravel(value)[-1])
