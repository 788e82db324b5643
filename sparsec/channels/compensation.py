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
from onnx import numpy_helper

from sparsec.channels.channel_state import ChannelAnalysis, ConsumerCut, ProducerCut
from sparsec.core.graph_index import GraphIndex
from sparsec.core.names import node_ids
from sparsec.core.tensors import TensorStore, inline_copy
from sparsec.runtime.session import make_session_from_proto, random_feeds, run_checked


@dataclass(frozen=True)
class Compensation:
    constants: dict[tuple[str, int], float]  # (consumer node id, position) -> carried value
    varying: dict[str, float]  # consumer -> largest deviation of a removed channel from its constant
    masked: onnx.ModelProto  # the oracle: dense model with the removed filters zeroed


def masked_model(model: onnx.ModelProto, store: TensorStore, analysis: ChannelAnalysis,
                 removed: frozenset[int]) -> onnx.ModelProto:
    """The dense model with every removed producer filter set to zero (biases and BN kept)."""
    masked = inline_copy(model, store)
    index = GraphIndex(masked.graph)
    nodes = dict(zip(node_ids(masked.graph), masked.graph.node, strict=True))
    for a in analysis.actions:
        if not isinstance(a, ProducerCut):
            continue
        gone = [p for p, e in enumerate(a.layout) if e in removed]
        if not gone:
            continue
        tensor = index.constant(index.resolve(nodes[a.node].input[a.input]))
        w = np.array(numpy_helper.to_array(tensor))
        index_tuple = [slice(None)] * w.ndim
        index_tuple[a.axis] = gone
        w[tuple(index_tuple)] = 0
        tensor.CopyFrom(numpy_helper.from_array(w, tensor.name))
    return masked


def compute_compensation(model: onnx.ModelProto, store: TensorStore, analysis: ChannelAnalysis,
                         removed: frozenset[int], fixed: dict, seed: int = 0,
                         ranges: dict[str, tuple[float, float]] | None = None) -> Compensation:
    """Run the masked model once and read each removed channel at each consumer's input."""
    masked = masked_model(model, store, analysis, removed)
    nodes = dict(zip(node_ids(masked.graph), masked.graph.node, strict=True))
    wanted = {}  # consumer node id -> the activation it reads the removed channels from
    for a in analysis.actions:
        if isinstance(a, ConsumerCut) and any(e in removed for e in a.layout):
            wanted[a.node] = next(n for k, n in enumerate(nodes[a.node].input) if k != a.input)
    if not wanted:  # nothing removed reaches a consumer: no run, nothing to fold
        return Compensation({}, {}, masked)
    probe = onnx.ModelProto()
    probe.CopyFrom(masked)
    have = {o.name for o in probe.graph.output}
    for name in dict.fromkeys(wanted.values()):
        if name not in have:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    session = make_session_from_proto(probe)
    names = [o.name for o in session.get_outputs()]
    feeds = random_feeds(session, fixed, seed, ranges=ranges)  # --calib-range: valid integer inputs
    values = dict(zip(names, run_checked(session, names, feeds, "the masked model"), strict=True))
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
    return Compensation(constants, varying, masked)
