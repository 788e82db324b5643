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
from sparsec.channels.channel_state import (
    ChannelAnalysis,
    ConsumerCut,
    DepthwiseCut,
    Edit,
    ParamCut,
    ProducerCut,
    ReshapeCut,
    SliceCut,
    SplitCut,
    TargetCut,
)
from sparsec.channels.target_edit import cut_target
from sparsec.core.graph_index import GraphIndex, to_effective
from sparsec.core.names import FreshNames, node_ids
from sparsec.core.op_table import weight_axes
from sparsec.core.pipeline import PassContext, PassResult


@dataclass
class PruneChannelsPass:
    analysis: ChannelAnalysis
    removed: frozenset[int]
    compensation: dict[tuple[str, int], float] = field(default_factory=dict)  # (node id, pos) -> value
    recovery: dict[str, dict] = field(default_factory=dict)  # consumer node id -> refit weights
    name: str = "prune-channels"
    requires: frozenset[str] = frozenset()

    def run(self, ctx: PassContext) -> PassResult:
        if not self.removed:
            return PassResult(self.name, False, {"removed": 0})
        editor = _Editor(ctx)
        editor.out_keep = {a.node: np.array([e not in self.removed for e in a.layout])
                           for a in self.analysis.actions if isinstance(a, ProducerCut)}
        for edit in self.analysis.actions:
            keep = np.array([e not in self.removed for e in edit.layout], dtype=bool)
            if keep.all():
                continue
            if isinstance(edit, ConsumerCut) and edit.node in self.recovery:
                editor.refit(edit, self.recovery[edit.node])
            elif isinstance(edit, ConsumerCut):
                editor.compensate(edit, keep, self.compensation)
            editor.apply(edit, keep)
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
    """Slices tensors through the store; clones constants that other nodes also read.

    Edits name their node by id (`core.names.node_ids`), resolved once against the graph as the
    pass finds it; nodes the edits add are inserted after their anchor only at `finish`."""

    def __init__(self, ctx: PassContext) -> None:
        self.ctx = ctx
        self.index = GraphIndex(ctx.model.graph)
        self.nodes = ctx.model.graph.node
        self.ids = node_ids(ctx.model.graph)
        self.by_id = dict(zip(self.ids, self.nodes, strict=True))
        self.inserts: list[tuple[str, onnx.NodeProto]] = []
        self.out_keep: dict[str, np.ndarray] = {}
        self.names = FreshNames(ctx.model.graph)

    def node(self, edit: Edit) -> onnx.NodeProto:
        node = self.by_id.get(edit.node)
        if node is None:
            raise ValueError(f"channel edit for node {edit.node}, which the graph no longer has")
        return node

    def apply(self, edit: Edit, keep: np.ndarray) -> None:
        """Make one typed edit (an explicit dispatch: a new Edit type must be added here)."""
        match edit:
            case ProducerCut():
                self.producer(edit, keep)
            case ConsumerCut() | ParamCut():
                self._slice(self.node(edit), edit.input, edit.axis, keep)
            case DepthwiseCut():
                self.depthwise(edit, keep)
            case SplitCut():
                self.split(edit, keep)
            case SliceCut():
                self.slice(edit, keep)
            case ReshapeCut():
                self.reshape(edit, keep)
            case TargetCut():
                cut_target(self, edit, keep)
            case _:
                raise TypeError(f"no rewrite for channel edit {type(edit).__name__}")

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

    def producer(self, a: ProducerCut, keep) -> None:
        node = self.node(a)
        self._slice(node, a.input, a.axis, keep)
        b = a.bias
        if b is not None and len(node.input) > b and node.input[b]:
            bias = self.ctx.store.read(self._tensor(node, b))
            if bias.ndim and bias.shape[-1] == len(keep):
                self._slice(node, b, bias.ndim - 1, keep)

    def reorder(self, edit: Edit, order: np.ndarray) -> None:
        """The same typed edits as `apply`, permuting instead of cutting: position k of the cut axis
        takes old position order[k] (N:M channel permutation, `permute_channels`)."""
        node = self.node(edit)
        match edit:
            case ProducerCut():
                self._take(node, edit.input, edit.axis, order)
                self._take_bias(node, edit.bias, order)
            case DepthwiseCut():
                axes = weight_axes(node)
                self._take(node, axes.input, axes.output, order)
                self._take_bias(node, axes.bias, order)
            case ConsumerCut() | ParamCut():
                self._take(node, edit.input, edit.axis, order)
            case ReshapeCut() | TargetCut():
                pass  # a permutation keeps every count
            case _:
                raise TypeError(f"no permutation for channel edit {type(edit).__name__}")

    def _take_bias(self, node, b: int | None, order: np.ndarray) -> None:
        if b is not None and len(node.input) > b and node.input[b]:
            self._take(node, b, -1, order)

    def _take(self, node, k: int, axis: int, order: np.ndarray) -> None:
        tensor = self._tensor(node, k)
        values = self.ctx.store.read(tensor)
        if values.ndim and values.shape[axis] == len(order):  # else a broadcast dimension
            self.ctx.store.write(tensor, np.ascontiguousarray(np.take(values, order, axis=axis)))

    def depthwise(self, a: DepthwiseCut, keep) -> None:
        node = self.node(a)
        axes = weight_axes(node)
        self._slice(node, axes.input, axes.output, keep)
        if axes.bias is not None and len(node.input) > axes.bias and node.input[axes.bias]:
            self._slice(node, axes.bias, 0, keep)
        for attr in node.attribute:
            if attr.name == "group":
                attr.i = int(keep.sum()) // a.mult

    def split(self, a: SplitCut, keep) -> None:
        node = self.node(a)
        b = a.bounds
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

    def slice(self, a: SliceCut, keep) -> None:
        node = self.node(a)
        start = int(keep[:a.start].sum())
        for k, value in ((1, start), (2, start + int(keep[a.start:a.end].sum()))):
            tensor = self._tensor(node, k)
            values = np.array(self.ctx.store.read(tensor))
            values[a.pos] = value
            self.ctx.store.write(tensor, values)

    def reshape(self, a: ReshapeCut, keep) -> None:
        tensor = self._tensor(self.node(a), a.input)
        values = np.array(self.ctx.store.read(tensor))
        if values[a.entry] > 0:
            values[a.entry] = int(keep.sum())
            self.ctx.store.write(tensor, values)

    def refit(self, a: ConsumerCut, plan: dict) -> None:
        """Least-squares recovery: the refit dense weight, and the intercept into the bias."""
        node = self.node(a)
        tensor = self._tensor(node, a.input)
        dtype = self.ctx.store.read(tensor).dtype
        self.ctx.store.write(tensor, plan["weight"].astype(dtype))
        bias = plan["bias_by_position"]
        self._add_bias(a.node, node, bias.reshape(bias.shape[0], -1).sum(1))

    def compensate(self, a: ConsumerCut, keep, constants: dict[tuple[str, int], float]) -> None:
        """Fold Σ_c W[:, c]·a_c of the removed channels into the consumer's bias."""
        node = self.node(a)
        gone = [int(p) for p in np.flatnonzero(~keep) if (a.node, int(p)) in constants]
        if not gone:
            return
        value = np.array([constants[(a.node, p)] for p in gone])
        stored = self.ctx.store.read(self._tensor(node, a.input))
        w = np.asarray(stored, dtype=np.float64)
        axes = weight_axes(node, a.input)
        if needs_border_correction(node, w.shape):  # padded k×k Conv, ConvTranspose: exact map
            kernel = border_kernel(node, w, gone, value).astype(stored.dtype)
            if a.node in self.out_keep:  # this consumer's own outputs are cut too
                kernel = np.compress(self.out_keep[a.node], kernel, axis=axes.output)
            opset = next((o.version for o in self.ctx.model.opset_import if o.domain in ("", "ai.onnx")), 17)
            for new in add_border_correction(self.ctx.model.graph, node, kernel, self.names, opset):
                self.inserts.append((a.node, new))
            return
        # Σ over the removed inputs c and every other axis (a 1×1 kernel, ...) of W[c, out, ...]·a_c
        moved = np.moveaxis(np.take(w, gone, axis=axes.reduction), (axes.reduction, axes.output), (0, 1))
        delta = value @ moved.reshape(len(gone), moved.shape[1], -1).sum(-1)
        self._add_bias(a.node, node, delta * axes.alpha / axes.beta)

    def _add_bias(self, node_id: str, node: onnx.NodeProto, delta: np.ndarray) -> None:
        """Add `delta` (one value per output channel) to the node's output: into its bias input when
        the op table gives it one, else through a new Add after it."""
        k = weight_axes(node).bias
        if k is not None and len(node.input) > k and node.input[k]:
            tensor = self._tensor(node, k)
            bias = np.array(self.ctx.store.read(tensor))
            self.ctx.store.write(tensor, bias + np.broadcast_to(delta, bias.shape).astype(bias.dtype))
            return
        dtype = onnx.helper.tensor_dtype_to_np_dtype(
            self.index.constant(self.index.resolve(node.input[weight_axes(node).input])).data_type)
        base = f"{node.name or node.op_type}__compensation"
        if k is not None:
            self._add_initializer(node, k, delta.astype(dtype), base)
            return
        name = self.names(base)
        self.ctx.model.graph.initializer.append(numpy_helper.from_array(delta.astype(dtype), name))
        if node_id in self.out_keep:  # the new Add sits after this node's own pruned outputs
            delta = delta[self.out_keep[node_id]]
            self.ctx.model.graph.initializer[-1].CopyFrom(numpy_helper.from_array(delta.astype(dtype), name))
        out = node.output[0]  # MatMul: an Add after it, keeping the output name downstream
        node.output[0] = self.names(f"{out}__before_compensation")
        self.inserts.append((node_id, helper.make_node(
            "Add", [node.output[0], name], [out], name=self.names(base))))

    def finish(self) -> None:
        """Insert new nodes after the node they belong to (the graph's node list is stable until now)."""
        if not self.inserts:
            return
        after: dict[str, list[onnx.NodeProto]] = {}
        for node_id, node in self.inserts:
            after.setdefault(node_id, []).append(node)
        nodes = []
        for node_id, node in zip(self.ids, self.nodes, strict=True):
            nodes.append(node)
            nodes.extend(after.get(node_id, []))
        del self.ctx.model.graph.node[:]
        self.ctx.model.graph.node.extend(nodes)
