"""Fold inference BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul before it.

Exporters such as Paddle's leave BatchNorm unfused, but pruning must score the weights the deployed
model multiplies by (TensorRT folds BN later, rescaling each channel), and the extra node costs a pass
over every activation. Per channel c (axis 1 of the BN input):

    BN(x) = α·x + (β − α·μ),  α = γ / √(σ² + ε)
    x = W ∗ a + b  ⇒  BN(x) = (α·W) ∗ a + (α·(b − μ) + β)

so scaling the producer's output-channel slice of W by α and rewriting its bias is exact. A weight
reached through Identity or Transpose is scaled in the layer's layout and mapped back to the stored
one; a Cast on the path is refused (the stored precision is not the one the layer computes in).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sparsec.channels.border_correction import split_border_add
from sparsec.core.graph_index import GraphIndex, WeightSource, effective_shape, to_effective, to_stored
from sparsec.core.op_table import WEIGHT_OPS, weight_axes, weight_op
from sparsec.core.pipeline import PassContext, PassResult
from sparsec.core.tensors import TensorStore

log = logging.getLogger(__name__)
DEAD_CHAIN_OPS = ("Constant", "Identity", "Transpose", "Cast")  # what may feed a BN statistic or a bias


@dataclass(frozen=True)
class Channels:
    """Where the producer's output channels live in its (effective) weight."""

    axis: int  # weight axis indexed by the output channel (within a group for ConvTranspose)
    count: int  # output channels
    groups: int = 1  # ConvTranspose W[C, M/g, k...]: channel g·(M/g)+j is column j of row block g


def channels_of(node: onnx.NodeProto, shape: tuple[int, ...], rank: int | None) -> Channels | str:
    """Where `node`'s output channels are in its weight (read from `core.op_table`), or why BatchNorm's
    channel axis 1 is not them."""
    spec = weight_op(node.op_type)
    if spec is None or spec.axes is None:
        return f"{node.op_type} is not a weight op"
    axes = spec.axes(node, spec.weight_input)
    if spec.kernel and len(shape) < 3 or not spec.kernel and len(shape) != 2:
        return f"{node.op_type} weight is rank {len(shape)}"
    if axes.out_axis != 1 and (rank is None or axes.out_axis % rank != 1):
        if rank is None:
            return f"{node.op_type} output rank is unknown (run shape inference first)"
        return f"{node.op_type} output is rank {rank}: BatchNormalization's axis 1 is not its feature axis"
    return Channels(axes.output, shape[axes.output] * axes.out_groups, axes.out_groups)


@dataclass(frozen=True)
class FoldPlan:
    """A BatchNormalization that folds into `producer`, whose weight is `weight`."""

    bn: onnx.NodeProto
    producer: onnx.NodeProto
    weight: WeightSource
    channels: Channels
    border: tuple[onnx.NodeProto, WeightSource, Channels] | None = None  # Add, kernel, its channels


def plan_fold(index: GraphIndex, bn: onnx.NodeProto, ranks: dict[str, int]) -> FoldPlan | str:
    """The fold of `bn`, or the reason it must stay. Pure analysis: edits nothing."""
    reason = _bn_reason(index, bn)
    if reason:
        return reason
    x = bn.input[0]
    producer = index.producer.get(x)
    border = split_border_add(index.producer, producer)
    if border is not None:  # layer -> Add(border correction) -> BN: fold into both
        add, producer, side = border
        kernel = index.resolve(side.input[weight_axes(side).input])
        if kernel is None or kernel.steps or _shared(index, (producer.output[0], side.output[0])) \
                or _shared(index, kernel.tensors):
            return f"input {x} comes from a border correction sparsec cannot fold into"
        side_channels = channels_of(side, effective_shape(kernel), None)
        if isinstance(side_channels, str):
            return f"input {x} comes from a border correction sparsec cannot fold into"
        border = (add, kernel, side_channels)
    if producer is None or weight_op(producer.op_type) is None:
        foldable = "/".join(op for op in WEIGHT_OPS if weight_op(op) is not None)
        return f"input {x} comes from {producer.op_type if producer else 'no node'}, not {foldable}"
    axes = weight_axes(producer)
    if _shared(index, (x,)):
        return f"{x} has another consumer or is a graph output"
    name = _name(producer)
    source = index.resolve(producer.input[axes.input]) if len(producer.input) > axes.input else None
    if source is None:
        return f"weight of {name} is not a constant"
    if any(step.op == "Cast" for step in source.steps):
        return f"weight of {name} reaches it through a Cast"
    if _shared(index, source.tensors):
        return f"weight of {name} is shared with another node"
    data = next((n for k, n in enumerate(producer.input) if k != axes.input), "")
    channels = channels_of(producer, effective_shape(source), ranks.get(x, ranks.get(data)))
    if isinstance(channels, str):
        return channels
    count = effective_shape(index.resolve(bn.input[1]))[0]  # type: ignore[arg-type]
    if channels.count != count:
        return f"BatchNormalization has {count} channels, {name} produces {channels.count}"
    bias = producer.input[axes.bias] if axes.bias is not None and len(producer.input) > axes.bias else ""
    if bias and index.resolve(bias) is None:
        return f"bias {bias} of {name} is not a constant"
    return FoldPlan(bn, producer, source, channels, border)


def _bn_reason(index: GraphIndex, bn: onnx.NodeProto) -> str | None:
    if _attr(bn, "training_mode", 0):
        return "training mode: it normalises by batch statistics, not the running ones"
    if _attr(bn, "spatial", 1) == 0:
        return "per-activation statistics (spatial=0)"
    if any(_shared(index, (out,), allowed=0) for out in bn.output[1:] if out):
        return "its running-statistics outputs are used"
    sources = [index.resolve(name) for name in bn.input[1:5]]
    if len(sources) < 4 or None in sources:
        return f"parameters {list(bn.input[1:5])} are not all constants"
    shapes = {effective_shape(s) for s in sources if s}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        return f"parameters are not vectors of one length: {sorted(shapes)}"
    return None


def _shared(index: GraphIndex, names: tuple[str, ...], allowed: int = 1) -> bool:
    """Whether any tensor has a use besides the `allowed` one(s) we are about to rewrite."""
    return any(len(index.consumers.get(n, ())) != allowed or n in index.graph_outputs
               or n in index.subgraph_uses for n in names)


@dataclass
class FoldBatchNormPass:
    """Fold every foldable BatchNormalization; report the others with the reason they stay.

    Rounds repeat on a fresh analysis until nothing folds, so Conv→BN→BN folds both.
    """

    name: str = "fold-bn"
    requires: frozenset[str] = frozenset()

    def run(self, ctx: PassContext) -> PassResult:
        folded: list[tuple[str, str]] = []
        while True:
            graph = ctx.model.graph
            index = GraphIndex(graph)
            infos = [*graph.input, *graph.value_info, *graph.output]
            ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in infos
                     if v.type.tensor_type.HasField("shape")}
            plans: list[FoldPlan] = []
            kept: list[tuple[str, str]] = []
            for node in (n for n in graph.node if n.op_type == "BatchNormalization"):
                plan = plan_fold(index, node, ranks)
                if isinstance(plan, str):
                    kept.append((_name(node), plan))
                else:
                    plans.append(plan)
            if not plans:
                break
            folded += [(_name(p.bn), _name(p.producer)) for p in plans]
            _apply(ctx.store, graph, index, plans)
        for bn, why in kept:
            log.info("fold-bn: kept %s: %s", bn, why)
        return PassResult(self.name, bool(folded), {"folded": folded, "kept": kept})


def _apply(store: TensorStore, graph: onnx.GraphProto, index: GraphIndex, plans: list[FoldPlan]) -> None:
    """Rewrite the graph for independent plans (disjoint nodes, unshared weights)."""
    taken = {t.name for t in graph.initializer} | index.graph_inputs
    taken |= {s for n in graph.node for s in [n.name, *n.input, *n.output]}
    drop: set[int] = set()
    dead: set[str] = set(n for p in plans for n in p.bn.input[1:5])
    stale: set[str] = set(n for p in plans for n in p.bn.output[1:] if n)
    for plan in plans:
        bn, producer = plan.bn, plan.producer
        x, y, name = bn.input[0], bn.output[0], _name(producer)
        bias, dtype = _fold_values(store, index, plan)
        if weight_axes(producer).bias is None:  # no bias input (MatMul): the BN becomes x + bias
            bias_name = _add_initializer(graph, bias.astype(dtype), f"{name}.bias_folded", taken)
            bn.CopyFrom(helper.make_node("Add", [x, bias_name], [y], _unique(f"{name}_bias", taken)))
            continue
        k = weight_axes(producer).bias
        if len(producer.input) > k and producer.input[k]:
            dead.add(producer.input[k])  # removed only if no longer used
        _set_bias(store, graph, index, producer, bias.astype(dtype), taken)
        (plan.border[0] if plan.border else producer).output[0] = y
        stale.add(x)
        drop.add(index.position[id(bn)])
    _delete(graph.node, lambda i, _: i in drop)
    stale |= _remove_dead(graph, dead)
    _delete(graph.value_info, lambda _, v: v.name in stale)


def _fold_values(store: TensorStore, index: GraphIndex, plan: FoldPlan) -> tuple[np.ndarray, np.dtype]:
    """Scale the weight in place (float64, cast back); return the folded bias and the weight dtype."""
    bn, producer = plan.bn, plan.producer
    gamma, beta, mean, var = (_read(store, index, n) for n in bn.input[1:5])
    alpha = gamma / np.sqrt(var + float(_attr(bn, "epsilon", 1e-5)))
    tensor = index.constant(plan.weight)
    stored = store.read(tensor)
    scaled = _scale(to_effective(stored.astype(np.float64), plan.weight.steps), alpha, plan.channels)
    store.write(tensor, np.ascontiguousarray(to_stored(scaled, plan.weight.steps).astype(stored.dtype)))
    if plan.border is not None:
        _, kernel, channels = plan.border
        k_tensor = index.constant(kernel)
        k = store.read(k_tensor)
        store.write(k_tensor, _scale(k.astype(np.float64), alpha, channels).astype(k.dtype))
    old: np.ndarray | float = 0.0
    axes = weight_axes(producer)
    if axes.bias is not None and len(producer.input) > axes.bias and producer.input[axes.bias]:
        # Gemm adds beta·C: beta goes into the new C and the attribute is dropped (default 1)
        old = _read(store, index, producer.input[axes.bias]) * axes.beta
    return (old - mean) * alpha + beta, stored.dtype


def _scale(w: np.ndarray, alpha: np.ndarray, ch: Channels) -> np.ndarray:
    if ch.groups > 1:  # ConvTranspose: split axis 0 into groups, channel g·(M/g)+j is [g, :, j]
        blocks = w.reshape(ch.groups, w.shape[0] // ch.groups, *w.shape[1:])
        return (blocks * alpha.reshape(ch.groups, 1, -1, *([1] * (w.ndim - 2)))).reshape(w.shape)
    shape = [1] * w.ndim
    shape[ch.axis] = -1
    return w * alpha.reshape(shape)


def _set_bias(store: TensorStore, graph: onnx.GraphProto, index: GraphIndex, producer: onnx.NodeProto,
              values: np.ndarray, taken: set[str]) -> None:
    """Write the bias in place when it is ours alone and keeps its shape, else a new initializer."""
    k = weight_axes(producer).bias
    old = producer.input[k] if len(producer.input) > k else ""
    source = index.resolve(old) if old else None
    if source and not source.steps and not _shared(index, source.tensors) \
            and source.stored_shape == values.shape:
        tensor = index.constant(source)
        store.write(tensor, values.astype(helper.tensor_dtype_to_np_dtype(tensor.data_type)))
    else:
        name = _add_initializer(graph, values, f"{_name(producer)}.bias_folded", taken)
        producer.input.extend([""] * (k + 1 - len(producer.input)))
        producer.input[k] = name
    _delete(producer.attribute, lambda _, a: a.name == "beta")  # Gemm: beta·C is now in C


def _remove_dead(graph: onnx.GraphProto, names: set[str]) -> set[str]:
    """Remove initializers and Constant/Identity/Transpose/Cast chains that nothing uses any more."""
    index = GraphIndex(graph)
    uses = Counter({n: len(c) for n, c in index.consumers.items()})
    pending, nodes, removed = list(names), set(), set()
    while pending:
        name = pending.pop()
        if uses[name] or name in removed or name in index.graph_outputs | index.graph_inputs \
                or name in index.subgraph_uses:
            continue
        node = index.producer.get(name)
        if name in index.initializers:
            removed.add(name)
        elif node is not None and node.op_type in DEAD_CHAIN_OPS and len(node.output) == 1:
            removed.add(name)
            nodes.add(index.position[id(node)])
            for i in (i for i in node.input if i):
                uses[i] -= 1
                pending.append(i)
    _delete(graph.node, lambda i, _: i in nodes)
    _delete(graph.initializer, lambda _, t: t.name in removed)
    return removed


def _delete(items: Any, doomed: Callable[[int, Any], bool]) -> None:
    """Delete from a protobuf repeated field in place (its other elements stay untouched)."""
    for i in reversed(range(len(items))):
        if doomed(i, items[i]):
            del items[i]


def _add_initializer(graph: onnx.GraphProto, values: np.ndarray, base: str, taken: set[str]) -> str:
    name = _unique(base, taken)
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(values), name))
    return name


def _unique(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def _read(store: TensorStore, index: GraphIndex, name: str) -> np.ndarray:
    source = index.resolve(name)  # checked to be a constant by plan_fold
    assert source is not None
    return to_effective(store.read(index.constant(source)), source.steps).astype(np.float64)


def _name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default
