"""Fold inference BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul before it.

Exporters such as Paddle's, or torch's in training-friendly mode, leave BatchNorm unfused. Pruning
must score and mask the weights the deployed model really multiplies by: TensorRT folds BN after
the fact, so a mask chosen on the unfused weight is scaled per channel afterwards, and the extra
node costs a pass over every activation. Per channel c (axis 1 of the BN input):

    BN(x) = α·x + (β − α·μ),  α = γ / √(σ² + ε)
    x = W ∗ a + b  ⇒  BN(x) = (α·W) ∗ a + (α·(b − μ) + β)

so scaling the producer's output-channel slice of W by α and rewriting its bias is exact. A weight
reached through Identity or Transpose is scaled in the layer's layout and mapped back to the stored
one; a Cast on the path is refused (the stored precision is not the one the layer computes in).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sparsec.pipeline import PassContext, PassResult
from sparsec.tensors import TensorStore
from sparsec.weights import (
    PASS_THROUGH_OPS,
    GraphIndex,
    WeightSource,
    effective_shape,
    to_effective,
    to_stored,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Channels:
    """Where the producer's output channels live in its (effective) weight."""

    axis: int  # weight axis indexed by the output channel (within a group for ConvTranspose)
    count: int  # output channels
    groups: int = 1  # ConvTranspose: channel g·(M/g)+j is weight[block g of axis 0, j]


def _conv(node: onnx.NodeProto, shape: tuple[int, ...], rank: int | None) -> Channels | str:
    return Channels(0, shape[0])  # W[M, C/g, k...]: groups never split axis 0


def _conv_transpose(node: onnx.NodeProto, shape: tuple[int, ...], rank: int | None) -> Channels | str:
    groups = int(_attr(node, "group", 1))
    if shape[0] % groups:
        return f"ConvTranspose weight has {shape[0]} input channels, not divisible by group={groups}"
    return Channels(1, shape[1] * groups, groups)  # W[C, M/g, k...]


def _gemm(node: onnx.NodeProto, shape: tuple[int, ...], rank: int | None) -> Channels | str:
    axis = 0 if _attr(node, "transB", 0) else 1  # output [M, N]: N is B's axis 1, or axis 0 when transposed
    return Channels(axis, shape[axis]) if len(shape) == 2 else "Gemm weight is not 2-D"


def _matmul(node: onnx.NodeProto, shape: tuple[int, ...], rank: int | None) -> Channels | str:
    if len(shape) != 2:
        return f"MatMul weight is rank {len(shape)}, not 2-D"
    if rank is None:
        return "MatMul output rank is unknown (run shape inference first)"
    if rank != 2:
        return f"MatMul output is rank {rank}: BatchNormalization's axis 1 is not its feature axis"
    return Channels(1, shape[1])


# Per-op knowledge in one table: where each foldable producer keeps its output channels.
CHANNELS = {"Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": _matmul}


@dataclass(frozen=True)
class FoldPlan:
    """A BatchNormalization that folds into `producer`, whose weight is `weight`."""

    bn: onnx.NodeProto
    producer: onnx.NodeProto
    weight: WeightSource
    channels: Channels


def plan_fold(index: GraphIndex, bn: onnx.NodeProto, ranks: dict[str, int]) -> FoldPlan | str:
    """The fold of `bn`, or the reason it must stay. Pure analysis: edits nothing."""
    reason = _bn_reason(index, bn)
    if reason:
        return reason
    x = bn.input[0]
    producer = index.producer.get(x)
    if producer is None or producer.op_type not in CHANNELS:
        return f"input {x} comes from {producer.op_type if producer else 'no node'}, not {'/'.join(CHANNELS)}"
    if _shared(index, (x,)):
        return f"{x} has another consumer or is a graph output"
    source = index.resolve(producer.input[1]) if len(producer.input) > 1 else None
    if source is None:
        return f"weight of {_name(producer)} is not a constant"
    if any(step.op == "Cast" for step in source.steps):
        return f"weight of {_name(producer)} reaches it through a Cast"
    if _shared(index, source.tensors):
        return f"weight of {_name(producer)} is shared with another node"
    rank = ranks.get(x, ranks.get(producer.input[0]))
    channels = CHANNELS[producer.op_type](producer, effective_shape(source), rank)
    if isinstance(channels, str):
        return channels
    count = effective_shape(index.resolve(bn.input[1]))[0]  # type: ignore[arg-type]
    if channels.count != count:
        return f"BatchNormalization has {count} channels, {_name(producer)} produces {channels.count}"
    bias = producer.input[2] if producer.op_type != "MatMul" and len(producer.input) > 2 else ""
    if bias and index.resolve(bias) is None:
        return f"bias {bias} of {_name(producer)} is not a constant"
    return FoldPlan(bn, producer, source, channels)


def _bn_reason(index: GraphIndex, bn: onnx.NodeProto) -> str | None:
    if _attr(bn, "training_mode", 0):
        return "training mode"
    if _attr(bn, "spatial", 1) == 0:
        return "per-activation statistics (spatial=0)"
    if any(_shared(index, (out,), allowed=0) for out in bn.output[1:] if out):
        return "its running-statistics outputs are used"
    if len(bn.input) < 5:
        return "malformed: fewer than 5 inputs"
    shapes = set()
    for name in bn.input[1:5]:
        source = index.resolve(name)
        if source is None:
            return f"parameter {name} is not a constant"
        shapes.add(effective_shape(source))
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
            index, ranks = GraphIndex(graph), _ranks(graph)
            plans: list[FoldPlan] = []
            kept: list[tuple[str, str]] = []
            for node in graph.node:
                if node.op_type == "BatchNormalization":
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
    """Rewrite the graph for independent plans (disjoint nodes, unshared weights and biases)."""
    taken = {t.name for t in graph.initializer} | {n.name for n in graph.node}
    taken |= {o for n in graph.node for o in [*n.input, *n.output]} | index.graph_inputs
    drop: list[int] = []
    dead: set[str] = set()
    stale: set[str] = set()
    for plan in plans:
        bn, producer = plan.bn, plan.producer
        x, y = bn.input[0], bn.output[0]
        dead.update(bn.input[1:5])
        stale.update(n for n in bn.output[1:] if n)
        bias, dtype = _fold_values(store, index, plan)
        if producer.op_type == "MatMul":  # no bias input: the BN becomes x + bias, keeping its output name
            name = _add_initializer(graph, bias.astype(dtype), f"{_name(producer)}.bias_folded", taken)
            bn.CopyFrom(helper.make_node("Add", [x, name], [y], _unique(f"{_name(producer)}_bias", taken)))
            continue
        if len(producer.input) > 2 and producer.input[2]:
            dead.add(producer.input[2])  # cleaned up only if no longer used
        _set_bias(store, graph, index, producer, bias.astype(dtype), taken)
        producer.output[0] = y
        stale.add(x)
        drop.append(index.position[id(bn)])
    for i in sorted(drop, reverse=True):
        del graph.node[i]
    stale |= _remove_dead(graph, dead)
    for i in reversed(range(len(graph.value_info))):
        if graph.value_info[i].name in stale:
            del graph.value_info[i]


def _fold_values(store: TensorStore, index: GraphIndex, plan: FoldPlan) -> tuple[np.ndarray, np.dtype]:
    """Scale the weight in place (float64, cast back); return the folded bias and the weight dtype."""
    bn = plan.bn
    gamma, beta, mean, var = (_read(store, index, n) for n in bn.input[1:5])
    alpha = gamma / np.sqrt(var + float(_attr(bn, "epsilon", 1e-5)))
    tensor = index.constant(plan.weight)
    stored = store.read(tensor)
    scaled = _scale(to_effective(stored.astype(np.float64), plan.weight.steps), alpha, plan.channels)
    store.write(tensor, np.ascontiguousarray(to_stored(scaled, plan.weight.steps).astype(stored.dtype)))
    return (_old_bias(store, index, plan.producer) - mean) * alpha + beta, stored.dtype


def _scale(w: np.ndarray, alpha: np.ndarray, ch: Channels) -> np.ndarray:
    if ch.groups > 1:  # ConvTranspose W[C, M/g, k...]: group g owns rows block g and channels g·(M/g)+j
        blocks = w.reshape(ch.groups, w.shape[0] // ch.groups, *w.shape[1:])
        factor = alpha.reshape(ch.groups, 1, -1, *([1] * (w.ndim - 2)))
        return (blocks * factor).reshape(w.shape)
    shape = [1] * w.ndim
    shape[ch.axis] = -1
    return w * alpha.reshape(shape)


def _old_bias(store: TensorStore, index: GraphIndex, producer: onnx.NodeProto) -> np.ndarray | float:
    if producer.op_type == "MatMul" or len(producer.input) < 3 or not producer.input[2]:
        return 0.0
    scale = float(_attr(producer, "beta", 1.0)) if producer.op_type == "Gemm" else 1.0
    return _read(store, index, producer.input[2]) * scale  # Gemm adds beta·C: fold beta in, set it to 1


def _set_bias(store: TensorStore, graph: onnx.GraphProto, index: GraphIndex, producer: onnx.NodeProto,
              values: np.ndarray, taken: set[str]) -> None:
    """Write the bias in place when it is ours alone and keeps its shape, else a new initializer."""
    old = producer.input[2] if len(producer.input) > 2 else ""
    source = index.resolve(old) if old else None
    if source and not source.steps and not _shared(index, source.tensors) \
            and source.stored_shape == values.shape:
        tensor = index.constant(source)
        store.write(tensor, values.astype(helper.tensor_dtype_to_np_dtype(tensor.data_type)))
    else:
        name = _add_initializer(graph, values, f"{_name(producer)}.bias_folded", taken)
        while len(producer.input) < 3:
            producer.input.append("")
        producer.input[2] = name
    for i, attr in enumerate(producer.attribute):
        if attr.name == "beta":
            del producer.attribute[i]  # default 1.0: beta is now inside C
            break


def _remove_dead(graph: onnx.GraphProto, names: set[str]) -> set[str]:
    """Remove initializers and Constant/Identity/Transpose/Cast chains that nothing uses any more."""
    index = GraphIndex(graph)
    uses = Counter({n: len(c) for n, c in index.consumers.items()})
    pending, nodes, removed = list(names), set(), set()
    while pending:
        name = pending.pop()
        if uses[name] or name in index.graph_outputs or name in index.subgraph_uses \
                or name in index.graph_inputs or name in removed:
            continue
        node = index.producer.get(name)
        if name in index.initializers:
            removed.add(name)
        elif node is not None and node.op_type in ("Constant", *PASS_THROUGH_OPS) and len(node.output) == 1:
            removed.add(name)
            nodes.add(index.position[id(node)])
            for i in (i for i in node.input if i):
                uses[i] -= 1
                pending.append(i)
    for i in sorted(nodes, reverse=True):
        del graph.node[i]
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name in removed:
            del graph.initializer[i]
    return removed


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
    source = index.resolve(name)
    assert source is not None, f"{name} was checked to be a constant"
    return to_effective(store.read(index.constant(source)), source.steps).astype(np.float64)


def _ranks(graph: onnx.GraphProto) -> dict[str, int]:
    infos = [*graph.input, *graph.value_info, *graph.output]
    return {v.name: len(v.type.tensor_type.shape.dim) for v in infos if v.type.tensor_type.HasField("shape")}


def _name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _attr(node: onnx.NodeProto, name: str, default: object = None):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default
