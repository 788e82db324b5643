"""What a removed channel still carries: read from the dense model with those filters zeroed.

A zeroed filter still emits a constant (its bias, then BatchNorm's β, then the activation).
Running the masked model once tells that constant at every consumer input exactly, whatever
the chain of per-channel ops in between; a value that varies over positions cannot be folded
into a bias and is reported instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sparsec.channels.channel_state import ChannelAnalysis, ConsumerCut, ProducerCut
from sparsec.core.graph_index import GraphIndex
from sparsec.core.names import FreshNames, node_ids
from sparsec.core.tensors import TensorStore
from sparsec.core.twins import ZeroingStore, masked_twin
from sparsec.runtime.session import random_feeds, run_checked, session_on_store


@dataclass(frozen=True)
class Compensation:
    constants: dict[tuple[str, int], float]  # (consumer node id, position) -> carried value
    varying: dict[str, float]  # consumer -> largest deviation of a removed channel from its constant
    masked: onnx.ModelProto  # the oracle: dense model with the removed filters zeroed
    store: ZeroingStore  # the masked model's values: the zeroed ones made at each read, the rest on disk


def masked_model(model: onnx.ModelProto, store: TensorStore, analysis: ChannelAnalysis,
                 removed: frozenset[int]) -> tuple[onnx.ModelProto, ZeroingStore]:
    """The dense model with every removed producer filter set to zero (biases and BN kept): a twin
    whose store zeroes the filters when a session reads them; no weight is copied before that."""
    masked, masked_store = masked_twin(model, store)
    index = GraphIndex(masked.graph)
    nodes = dict(zip(node_ids(masked.graph), masked.graph.node, strict=True))
    fresh = FreshNames(masked.graph)
    for a in analysis.actions:
        if not isinstance(a, ProducerCut):
            continue
        gone = [p for p, e in enumerate(a.layout) if e in removed]
        if not gone:
            continue
        node = nodes[a.node]
        source = index.resolve(node.input[a.input])
        tensor = index.constant(source)
        if _output_maskable(node, a, source, index) and masked_store.on_disk(tensor):
            _mask_output(masked.graph, node, tensor, gone, fresh)
        else:
            masked_store.zero(tensor, a.axis, gone)
    return masked, masked_store


def _output_maskable(node: onnx.NodeProto, cut: ProducerCut, source, index: GraphIndex) -> bool:
    """A MatMul reading its own 2-D weight directly: zeroing weight columns equals zeroing those
    channels of its output, which needs no copy of a weight that lives in the data file."""
    return (node.op_type == "MatMul" and cut.input == 1 and source.storage == "initializer"
            and not source.steps and len(source.stored_shape) == 2 and cut.axis == 1
            and len(index.consumers[source.key]) == 1 and source.key not in index.graph_inputs)


def _mask_output(graph: onnx.GraphProto, node: onnx.NodeProto, weight: onnx.TensorProto, gone: list[int],
                 fresh: FreshNames) -> None:
    """node's output -> Mul by a 0/1 vector along the last axis (appended: node ids stay as they are;
    onnxruntime orders the nodes itself)."""
    out, raw = node.output[0], fresh(f"{node.output[0]}__unmasked")
    keep = np.ones(weight.dims[1], helper.tensor_dtype_to_np_dtype(weight.data_type))
    keep[gone] = 0
    name = fresh(f"{node.output[0]}__mask")
    graph.initializer.append(numpy_helper.from_array(keep, name))
    node.output[0] = raw
    graph.node.append(helper.make_node("Mul", [raw, name], [out], name=fresh(f"{out}__masked")))


def compute_compensation(model: onnx.ModelProto, store: TensorStore, analysis: ChannelAnalysis,
                         removed: frozenset[int], fixed: dict, seed: int = 0,
                         ranges: dict[str, tuple[float, float]] | None = None) -> Compensation:
    """Run the masked model once and read each removed channel at each consumer's input."""
    masked, masked_store = masked_model(model, store, analysis, removed)
    nodes = dict(zip(node_ids(masked.graph), masked.graph.node, strict=True))
    wanted = {}  # consumer node id -> the activation it reads the removed channels from
    for a in analysis.actions:
        if isinstance(a, ConsumerCut) and any(e in removed for e in a.layout):
            wanted[a.node] = next(n for k, n in enumerate(nodes[a.node].input) if k != a.input)
    if not wanted:  # nothing removed reaches a consumer: no run, nothing to fold
        return Compensation({}, {}, masked, masked_store)
    session = session_on_store(masked, masked_store, wanted.values())
    names = [o.name for o in session.get_outputs()]
    feeds = random_feeds(session, fixed, seed, ranges=ranges)  # --calib-range: valid integer inputs
    values = dict(zip(names, run_checked(session, names, feeds, "the masked model"), strict=True))
    del session  # one session alive at a time
    constants: dict[tuple[str, int], float] = {}
    varying: dict[str, float] = {}
    for a in analysis.actions:
        if a.node not in wanted or not isinstance(a, ConsumerCut):
            continue
        x = values[wanted[a.node]]
        axis = analysis.layouts[wanted[a.node]].axis
        for p, e in enumerate(a.layout):
            if e not in removed:
                continue
            channel = np.take(x, p, axis=axis).astype(np.float64).ravel()
            if not channel.size:
                continue
            value = float(np.median(channel))  # a zero-padded border is the minority
            off = np.abs(channel - value) > 1e-6 * (1.0 + abs(value))
            if off.mean() <= 0.5:
                constants[(a.node, p)] = value
            if off.any():
                varying[a.node] = max(varying.get(a.node, 0.0), float(np.abs(channel - value).max()))
    return Compensation(constants, varying, masked, masked_store)
