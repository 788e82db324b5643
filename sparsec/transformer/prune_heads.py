"""Remove attention heads: Q/K/V columns and biases, output-projection rows, head counts.

The attention analysis is recomputed on the model as it is when the pass runs (earlier
passes may have inserted nodes); blocks are matched by their Softmax's name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sparsec.core.graph_index import GraphIndex
from sparsec.core.pipeline import PassContext, PassResult
from sparsec.errors import SparsecError
from sparsec.transformer.attention import AttentionBlock, find_attention


@dataclass
class PruneHeadsPass:
    removed: dict[str, tuple[int, ...]]  # Softmax name -> query heads to remove
    name: str = "prune-heads"
    requires: frozenset[str] = frozenset()

    def run(self, ctx: PassContext) -> PassResult:
        if not any(self.removed.values()):
            return PassResult(self.name, False, {"blocks": {}})
        analysis = find_attention(ctx.model)
        index = GraphIndex(ctx.model.graph)
        inserts: list[tuple[int, onnx.NodeProto]] = []
        done = {}
        for block in analysis.blocks:
            heads = self.removed.get(block.name, ())
            if heads:
                done[block.name] = _prune_block(ctx, index, block, set(heads), inserts)
        _insert(ctx.model, inserts)
        if done:  # head counts change many intermediate shapes: let consumers re-infer them
            del ctx.model.graph.value_info[:]
        return PassResult(self.name, bool(done), {"blocks": done})


def kept_masks(block: AttentionBlock, removed: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-column keep masks of Q (and O rows) and of K/V; a K/V head goes with its whole group."""
    group = block.heads // block.kv_heads
    q_keep = np.array([h not in removed for h in range(block.heads)])
    kv_keep = np.array([not all(h in removed for h in range(j * group, (j + 1) * group))
                        for j in range(block.kv_heads)])
    return np.repeat(q_keep, block.head_dim), np.repeat(kv_keep, block.head_dim)


def _prune_block(ctx, index, block: AttentionBlock, removed: set[int], inserts) -> dict:
    q_cols, kv_cols = kept_masks(block, removed)
    store = ctx.store
    if getattr(block, "fused", False):  # one [E, 3·hidden] weight: cut Q, K and V alike
        cols = np.concatenate([q_cols] * 3)
        _cut(store, index.initializers[block.q.weight], cols, 1)
        if block.q.bias is not None:
            _cut(store, index.initializers[block.q.bias], cols, -1)
        _cut(store, index.initializers[block.o.weight], q_cols, 0)
        heads = int(q_cols.sum()) // block.head_dim
        node = ctx.model.graph.node[block.softmax]
        next(a for a in node.attribute if a.name == "num_heads").i = heads
        if block.o.reshape is not None:
            _set_count(ctx.model, index, block.o.reshape, heads * block.head_dim, block, inserts, True)
        return {"heads_before": block.heads, "heads_after": heads, "kv_heads_after": heads}
    sides = ((block.q, q_cols), (block.k, kv_cols), (block.v, kv_cols))
    if block.q.part is not None:  # one weight, parts laid out part-major: cut the three thirds alike
        by_part = dict((proj.part[0], cols) for proj, cols in sides)
        sides = ((block.q, np.concatenate([by_part[p] for p in range(block.q.part[1])])),)
    for proj, cols in sides:
        _cut(store, index.initializers[proj.weight], cols, 1)
        if proj.bias is not None:
            _cut_bias(ctx, index, proj, cols)
    _cut(store, index.initializers[block.o.weight], q_cols, 0)
    heads, kv = int(q_cols.sum()) // block.head_dim, int(kv_cols.sum()) // block.head_dim
    seen: set[int] = set()
    for proj, count in ((block.q, heads), (block.k, kv), (block.v, kv), (block.o, heads * block.head_dim)):
        if proj.reshape is not None and proj.reshape not in seen:  # a fused QKV Reshape is shared
            seen.add(proj.reshape)
            _set_count(ctx.model, index, proj.reshape, count, block, inserts, proj is block.o)
        for repeat in proj.repeats:  # after a grouped-query repeat the head count is the query one
            _set_count(ctx.model, index, repeat, heads, block, inserts, False)
    if block.head_attrs:  # MultiHeadAttention / ONNX Attention carry the counts as attributes
        node = ctx.model.graph.node[block.softmax]
        for attr in node.attribute:
            if attr.name in block.head_attrs:
                attr.i = kv if attr.name == "kv_num_heads" else heads
    return {"heads_before": block.heads, "heads_after": heads, "kv_heads_after": kv}


def _cut(store, tensor: onnx.TensorProto, keep: np.ndarray, axis: int) -> None:
    values = store.read(tensor)
    if values.shape[axis] == len(keep):
        store.resize(tensor, np.compress(keep, values, axis=axis))


def _cut_bias(ctx, index, proj, keep: np.ndarray) -> None:
    """Cut a projection bias; one that other nodes read too (exporters dedupe equal tensors, such as
    freshly initialised zero biases) or that comes through Identity/Constant gets its own cut copy."""
    name = proj.bias
    readers = index.consumers.get(name, [])
    if name in index.initializers and len(readers) == 1:
        _cut(ctx.store, index.initializers[name], keep, -1)
        return
    tensor = index.initializers.get(name)
    values = ctx.store.read(tensor) if tensor is not None else _value(index, name)
    if values is None or values.shape[-1] != len(keep):
        raise SparsecError(f"prune-heads: bias {name} of {ctx.model.graph.node[proj.bias_add].name} is not a "
                           f"constant of {len(keep)} values", "report this model")
    add = ctx.model.graph.node[proj.bias_add]
    k = list(add.input).index(name)
    add.input[k] = _new_const(ctx.model, f"{add.name}__bias", np.compress(keep, values, axis=-1))


def _set_count(model, index, reshape: int, count: int, block, inserts, merged: bool) -> None:
    """Write the new head count (or width) into the Reshape target, cloning shared constants."""
    node = model.graph.node[reshape]
    target = node.input[1]
    old = block.heads * block.head_dim if merged else None
    direct = _value(index, target)
    if direct is not None:
        values = direct.copy()
        slot = _slot(values, block, merged, old)
        if slot is not None:
            values[slot] = count
            node.input[1] = _new_const(model, f"{node.name}__shape", values)
        return
    concat = index.producer.get(target)
    if concat is None or concat.op_type != "Concat":
        return
    for k, piece in enumerate(concat.input):
        found = _value(index, piece)
        if found is None:
            continue
        values = found.copy().ravel()
        if values.size != 1 or int(values[0]) <= 0:
            continue
        in_slot = k == len(concat.input) - 2
        is_heads = not merged and in_slot and int(values[0]) in (block.heads, block.kv_heads)
        is_width = merged and int(values[0]) == old
        if is_heads or is_width:
            clone = helper.make_node("Concat", list(concat.input), [f"{target}__{node.name}"],
                                     name=f"{concat.name}__{node.name}", axis=0)
            clone.input[k] = _new_const(model, f"{node.name}__piece", np.array([count], dtype=values.dtype))
            node.input[1] = clone.output[0]
            inserts.append((reshape, clone))
            return


def _value(index, name: str) -> np.ndarray | None:
    """A constant from an initializer or a Constant node (exporters use both), also through Identity."""
    node = index.producer.get(name)
    while node is not None and node.op_type == "Identity":
        name, node = node.input[0], index.producer.get(node.input[0])
    if name in index.initializers:
        return numpy_helper.to_array(index.initializers[name])
    if name in index.constant_nodes:
        return numpy_helper.to_array(index.constant_nodes[name].attribute[0].t)
    return None


def _slot(values: np.ndarray, block, merged: bool, old) -> int | None:
    if merged:
        hits = np.flatnonzero(values == old)
        return int(hits[-1]) if len(hits) else None
    if len(values) >= 2 and values[-1] == block.head_dim and values[-2] > 0:
        return len(values) - 2
    return None


def _new_const(model, name: str, values: np.ndarray) -> str:
    existing = {t.name for t in model.graph.initializer}
    base, k = name, 0
    while name in existing:
        k += 1
        name = f"{base}_{k}"
    model.graph.initializer.append(numpy_helper.from_array(values, name))
    return name


def _insert(model, inserts) -> None:
    """Each clone goes right before the Reshape that reads it."""
    if not inserts:
        return
    before: dict[int, list] = {}
    for i, node in inserts:
        before.setdefault(i, []).append(node)
    nodes = []
    for i, node in enumerate(model.graph.node):
        nodes.extend(before.get(i, []))
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
