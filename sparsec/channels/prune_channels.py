"""Remove channels physically: slice every producer, consumer and per-channel constant.

The analysis (`sparsec.channels.channel_analysis`) says which edits a removal needs; this pass makes them,
then folds the constant that each removed channel still carried into its consumers' biases
(bias compensation), so the smaller model equals the dense one with those filters zeroed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sparsec.channels.border_correction import add_border_correction, border_kernel, needs_border_correction
from sparsec.channels.channel_state import Action, ChannelAnalysis
from sparsec.core.graph_index import GraphIndex, to_effective
from sparsec.core.names import FreshNames
from sparsec.core.pipeline import PassContext, PassResult


@dataclass
class PruneChannelsPass:
    analysis: ChannelAnalysis
    removed: frozenset[int]
    compensation: dict[tuple[int, int], float] = field(default_factory=dict)  # (node, pos) -> value
    recovery: dict[int, dict] = field(default_factory=dict)  # consumer node -> refit weights
    name: str = "prune-channels"
    requires: frozenset[str] = frozenset()

    def run(self, ctx: PassContext) -> PassResult:
        if not self.removed:
            return PassResult(self.name, False, {"removed": 0})
        editor = _Editor(ctx)
        editor.out_keep = {a.node: np.array([e not in self.removed for e in a.layout])
                           for a in self.analysis.actions if a.kind == "producer"}
        for action in self.analysis.actions:
            keep = np.array([e not in self.removed for e in action.layout], dtype=bool)
            if keep.all():
                continue
            if action.kind == "consumer" and action.node in self.recovery:
                editor.refit(action, self.recovery[action.node])
            elif action.kind == "consumer":
                editor.compensate(action, keep, self.compensation)
            getattr(editor, action.kind)(action, keep)
        editor.finish()
        changed = {n for n, lay in self.analysis.layouts.items()
                   if any(e in self.removed for e in lay.elems.tolist())}
        changed |= {t.name for t in ctx.model.graph.initializer}  # sliced constants too
        keep_vi = [vi for vi in ctx.model.graph.value_info if vi.name not in changed]
        del ctx.model.graph.value_info[:]
        ctx.model.graph.value_info.extend(keep_vi)
        return PassResult(self.name, True, {"removed": len(self.removed),
                                            "recovered": len(self.recovery)})


class _Editor:
    """Slices tensors through the store; clones constants that other nodes also read."""

    def __init__(self, ctx: PassContext) -> None:
        self.ctx = ctx
        self.index = GraphIndex(ctx.model.graph)
        self.nodes = ctx.model.graph.node
        self.inserts: list[tuple[int, onnx.NodeProto]] = []
        self.out_keep: dict[int, np.ndarray] = {}
        self.names = FreshNames(ctx.model.graph)

    def _add_initializer(self, node: onnx.NodeProto, k: int, array: np.ndarray, name: str) -> None:
        """A new constant read by `node` alone, known to the index from now on."""
        name = self.names(name)
        self.ctx.model.graph.initializer.append(numpy_helper.from_array(array, name))
        self.index.initializers[name] = self.ctx.model.graph.initializer[-1]
        self.index.consumers[name] = [node]
        while len(node.input) <= k:
            node.input.append("")
        node.input[k] = name

    def _tensor(self, node: onnx.NodeProto, k: int) -> onnx.TensorProto:
        name = node.input[k]
        if self.index.resolve(name) is None and len(self.index.consumers.get(name, [])) == 1:
            plain = self.index.initializers.get(name)  # integer shapes, sizes and bounds
            if plain is not None:
                return plain
            if name in self.index.constant_nodes:
                return self.index.constant_nodes[name].attribute[0].t
        src = self.index.resolve(name)
        shared = len(self.index.consumers.get(name, [])) > 1 or (src is not None and src.steps)
        if src is None or shared:  # give this node its own copy
            values = np.array(self.ctx.store.read(self.index.constant(src))) if src else None
            if values is None:
                plain = self.index.initializers.get(name)
                node_const = self.index.constant_nodes.get(name)
                tensor = plain if plain is not None else (node_const.attribute[0].t if node_const else None)
                if tensor is None:
                    raise ValueError(f"input {name} of {node.name} is not a constant")
                values = np.array(self.ctx.store.read(tensor))
            else:
                values = np.ascontiguousarray(to_effective(values, src.steps))
                casts = [s for s in src.steps if s.op == "Cast"]  # the copy bypasses the path
                if casts:
                    to = next(a.i for a in self.nodes[casts[-1].node_index].attribute if a.name == "to")
                    values = values.astype(helper.tensor_dtype_to_np_dtype(to))
            self._add_initializer(node, k, values, f"{name}__{node.name or node.op_type}_pruned")
            return self.ctx.model.graph.initializer[-1]
        return self.index.constant(src)

    def _slice(self, node, k: int, axis: int, keep: np.ndarray) -> None:
        tensor = self._tensor(node, k)
        values = self.ctx.store.read(tensor)
        if values.shape[axis] != len(keep):
            return  # broadcast dimension: nothing to cut
        self.ctx.store.resize(tensor, np.compress(keep, values, axis=axis))

    def producer(self, a: Action, keep) -> None:
        node = self.nodes[a.node]
        self._slice(node, a.detail["input"], a.detail["axis"], keep)
        b = a.detail.get("bias")
        if b is not None and len(node.input) > b and node.input[b]:
            bias = self.ctx.store.read(self._tensor(node, b))
            if bias.ndim and bias.shape[-1] == len(keep):
                self._slice(node, b, bias.ndim - 1, keep)

    def consumer(self, a: Action, keep) -> None:
        self._slice(self.nodes[a.node], a.detail["input"], a.detail["axis"], keep)

    def depthwise(self, a: Action, keep) -> None:
        node = self.nodes[a.node]
        self._slice(node, 1, 0, keep)
        if len(node.input) > 2 and node.input[2]:
            self._slice(node, 2, 0, keep)
        for attr in node.attribute:
            if attr.name == "group":
                attr.i = int(keep.sum()) // a.detail["mult"]

    def param(self, a: Action, keep) -> None:
        self._slice(self.nodes[a.node], a.detail["input"], a.detail["axis"], keep)

    def split(self, a: Action, keep) -> None:
        node = self.nodes[a.node]
        b = a.detail["bounds"]
        sizes = np.array([int(keep[lo:hi].sum()) for lo, hi in zip(b[:-1], b[1:], strict=True)],
                         dtype=np.int64)
        if len(node.input) > 1 and node.input[1]:
            tensor = self._tensor(node, 1)
            self.ctx.store.resize(tensor, sizes)
            return
        for attr in node.attribute:
            if attr.name == "split":
                del attr.ints[:]
                attr.ints.extend(sizes.tolist())
                return
        for attr in list(node.attribute):
            if attr.name == "num_outputs":
                node.attribute.remove(attr)
        self._add_initializer(node, 1, sizes, f"{node.name or 'split'}__sizes")

    def slice(self, a: Action, keep) -> None:
        node = self.nodes[a.node]
        lo, hi, pos = a.detail["start"], a.detail["end"], a.detail["pos"]
        start = int(keep[:lo].sum())
        for k, value in ((1, start), (2, start + int(keep[lo:hi].sum()))):
            tensor = self._tensor(node, k)
            values = np.array(self.ctx.store.read(tensor))
            values[pos] = value
            self.ctx.store.write(tensor, values)

    def reshape(self, a: Action, keep) -> None:
        node = self.nodes[a.node]
        k = a.detail.get("input", 1)
        tensor = self._tensor(node, k)
        values = np.array(self.ctx.store.read(tensor))
        entry = a.detail["entry"]
        if values[entry] > 0:
            values[entry] = int(keep.sum())
            self.ctx.store.write(tensor, values)

    def refit(self, a: Action, plan: dict) -> None:
        """Least-squares recovery: the refit dense weight, and the intercept into the bias."""
        node = self.nodes[a.node]
        tensor = self._tensor(node, a.detail["input"])
        dtype = self.ctx.store.read(tensor).dtype
        self.ctx.store.write(tensor, plan["weight"].astype(dtype))
        bias = plan["bias_by_position"]
        self._add_bias(a.node, node, bias.reshape(bias.shape[0], -1).sum(1))

    def compensate(self, a: Action, keep, constants: dict[tuple[int, int], float]) -> None:
        """Fold Σ_c W[:, c]·a_c of the removed channels into the consumer's bias."""
        node = self.nodes[a.node]
        gone = [int(p) for p in np.flatnonzero(~keep) if (a.node, int(p)) in constants]
        if not gone:
            return
        value = np.array([constants[(a.node, p)] for p in gone])
        w = np.asarray(self.ctx.store.read(self._tensor(node, a.detail["input"])), dtype=np.float64)
        if needs_border_correction(node, w.shape):  # padded k×k Conv, ConvTranspose: exact map
            dtype = self.ctx.store.read(self._tensor(node, a.detail["input"])).dtype
            kernel = border_kernel(node, w, gone, value).astype(dtype)
            if a.node in self.out_keep:  # this consumer's own outputs are cut too
                out_axis = 1 if node.op_type == "ConvTranspose" else 0
                kernel = np.compress(self.out_keep[a.node], kernel, axis=out_axis)
            opset = next((o.version for o in self.ctx.model.opset_import if o.domain in ("", "ai.onnx")), 17)
            for new in add_border_correction(self.ctx.model.graph, node, kernel, self.names, opset):
                self.inserts.append((a.node, new))
            return
        if node.op_type == "Conv":  # W[M, C, kh, kw]
            delta = w[:, gone].reshape(w.shape[0], len(gone), -1).sum(-1) @ value
        elif node.op_type == "ConvTranspose":  # W[C, M, 1, 1], stride 1: a bias is exact
            delta = value @ w[gone].reshape(len(gone), w.shape[1], -1).sum(-1)
        elif a.detail["axis"] == 1:  # Gemm transB: W[N, K]
            delta = w[:, gone] @ value
        else:  # W[K, N]
            delta = value @ w[gone]
        if node.op_type == "Gemm":
            alpha = next((at.f for at in node.attribute if at.name == "alpha"), 1.0)
            beta = next((at.f for at in node.attribute if at.name == "beta"), 1.0)
            delta = delta * alpha / beta
        self._add_bias(a.node, node, delta)

    def _add_bias(self, position: int, node: onnx.NodeProto, delta: np.ndarray) -> None:
        k = 2 if node.op_type in ("Conv", "ConvTranspose", "Gemm") else None
        if k is not None and len(node.input) > k and node.input[k]:
            tensor = self._tensor(node, k)
            bias = np.array(self.ctx.store.read(tensor))
            self.ctx.store.write(tensor, bias + np.broadcast_to(delta, bias.shape).astype(bias.dtype))
            return
        dtype = onnx.helper.tensor_dtype_to_np_dtype(
            self.index.constant(self.index.resolve(node.input[1])).data_type)
        base = f"{node.name or node.op_type}__compensation"
        if k is not None:
            self._add_initializer(node, k, delta.astype(dtype), base)
            return
        name = self.names(base)
        self.ctx.model.graph.initializer.append(numpy_helper.from_array(delta.astype(dtype), name))
        if position in self.out_keep:  # the new Add sits after this node's own pruned outputs
            delta = delta[self.out_keep[position]]
            self.ctx.model.graph.initializer[-1].CopyFrom(numpy_helper.from_array(delta.astype(dtype), name))
        out = node.output[0]  # MatMul: an Add after it, keeping the output name downstream
        node.output[0] = self.names(f"{out}__before_compensation")
        self.inserts.append((position, helper.make_node(
            "Add", [node.output[0], name], [out], name=self.names(base))))

    def finish(self) -> None:
        """Insert new nodes after their producers (indices stay valid until now)."""
        if not self.inserts:
            return
        after: dict[int, list[onnx.NodeProto]] = {}
        for position, node in self.inserts:
            after.setdefault(position, []).append(node)
        nodes = []
        for i, node in enumerate(self.nodes):
            nodes.append(node)
            nodes.extend(after.get(i, []))
        del self.ctx.model.graph.node[:]
        self.ctx.model.graph.node.extend(nodes)
