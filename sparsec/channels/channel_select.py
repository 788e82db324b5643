"""Score removable channels and choose which go: global ranking under per-layer limits.

Pure analysis over a ChannelAnalysis and the weights (read through the store).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from sparsec.channels.channel_state import ChannelAnalysis, Source
from sparsec.core.graph_index import GraphIndex
from sparsec.core.op_table import weight_axes
from sparsec.core.tensors import TensorStore

SCORES = ("l1", "l2", "bn", "act")


@dataclass(frozen=True)
class ChannelChoice:
    """Removed elements and the bookkeeping the report needs."""

    removed: frozenset[int]
    kept_per_source: dict[str, int]
    scores: dict[str, list[float]]  # source -> normalised score per channel


def filter_scores(model: onnx.ModelProto, store: TensorStore, analysis: ChannelAnalysis,
                  method: str, act_energy: dict[int, float] | None = None
                  ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Per source, one importance per output channel, normalised to mean 1 within the source."""
    index = GraphIndex(model.graph)
    bn_scale, bn_gain = _bn_scales(model, store, analysis, index)
    scores, notes = {}, {}
    for s in analysis.sources:
        if s.op == "fixed":
            continue
        raw = None
        if method == "bn":
            raw = bn_scale.get(s.name)
            if raw is None:
                notes[s.name] = "no BatchNormalization after it: scored by l1"
        elif method == "act":
            if act_energy is None:
                raise ValueError("act scores need calibration statistics")
            raw = np.array([act_energy.get(e, 0.0) for e in range(s.first, s.first + s.channels)])
        if raw is None:
            raw = _filter_norms(_weight(model, store, index, s), _out_axis(model, s), s.channels, method)
            if s.name in bn_gain:  # score the filter as it acts after BatchNorm (γ/σ folded in)
                raw = raw * bn_gain[s.name]
        mean = float(np.mean(raw))
        scores[s.name] = raw / mean if mean > 0 else np.ones(s.channels)
    return scores, notes


def choose_channels(analysis: ChannelAnalysis, scores: dict[str, np.ndarray], ratio: float,
                    per_layer_max: float = 1.0, round_to: int = 1, ops: tuple[str, ...] | None = None
                    ) -> ChannelChoice:
    """Remove the lowest-scored removable channels until `ratio` of them are gone.

    `ops` limits the choice to channels whose every source is one of these ops (--ffn: the
    MatMul/Gemm hidden dimensions, which in a transformer are the FFN neurons).
    """
    classes = {c: m for c, m in analysis.classes().items() if c not in analysis.untouchable}
    src_of = {e: analysis.source_of(e) for members in classes.values() for e in members}
    if ops is not None:
        classes = {c: m for c, m in classes.items() if all(src_of[e].op in ops for e in m)}
    unit_score = {c: float(np.mean([scores[src_of[e].name][e - src_of[e].first] for e in m]))
                  for c, m in classes.items()}
    kept = {s.name: s.channels for s in analysis.sources}
    floor = {s.name: max(1, round_to) if round_to > 1 else 1 for s in analysis.sources}
    limit = {s.name: int(per_layer_max * s.channels) for s in analysis.sources}
    removed_from = dict.fromkeys(kept, 0)
    segments = _Segments(analysis, max(1, round_to))
    target = int(round(ratio * len(classes)))
    removed: list[int] = []
    for c in sorted(classes, key=lambda c: (unit_score[c], c)):
        if len(removed) >= target:
            break
        count = _per_source(classes[c], src_of)
        if all(kept[n] - k >= floor[n] and removed_from[n] + k <= limit[n] for n, k in count.items()) \
                and segments.can_remove(classes[c]):
            removed.append(c)
            segments.remove(classes[c])
            for n, k in count.items():
                kept[n] -= k
                removed_from[n] += k
    if round_to > 1:
        removed = _round(removed, classes, src_of, kept, unit_score, round_to)
    elems = frozenset(e for c in removed for e in classes[c])
    return ChannelChoice(elems, kept, {n: s.tolist() for n, s in scores.items()})


class _Segments:
    """Every tensor that carries channels (a Split branch, a Concat input, a depthwise conv's
    input) keeps at least `floor` of them, or all it has when it has fewer: an emptied branch
    would leave zero-size weights that TensorRT refuses."""

    def __init__(self, analysis: ChannelAnalysis, floor: int) -> None:
        unique = {frozenset(int(e) for e in lay.elems) for lay in analysis.layouts.values()}
        self.kept = [len(seg) for seg in unique]
        self.floor = [min(floor, len(seg)) for seg in unique]
        self.of: dict[int, list[int]] = {}
        for i, seg in enumerate(unique):
            for e in seg:
                self.of.setdefault(e, []).append(i)

    def _count(self, members: list[int]) -> dict[int, int]:
        out: dict[int, int] = {}
        for e in members:
            for i in self.of.get(e, ()):
                out[i] = out.get(i, 0) + 1
        return out

    def can_remove(self, members: list[int]) -> bool:
        return all(self.kept[i] - k >= self.floor[i] for i, k in self._count(members).items())

    def remove(self, members: list[int]) -> None:
        for i, k in self._count(members).items():
            self.kept[i] -= k


def _round(removed, classes, src_of, kept, unit_score, k):
    """Give back the best removed channels until every source keeps a multiple of k."""
    removed = sorted(removed, key=lambda c: -unit_score[c])
    changed = True
    while changed:
        changed = False
        for c in list(removed):
            count = _per_source(classes[c], src_of)
            if any(kept[n] % k for n in count):
                removed.remove(c)
                for n, m in count.items():
                    kept[n] += m
                changed = True
    return removed


def _per_source(members: list[int], src_of: dict[int, Source]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in members:
        out[src_of[e].name] = out.get(src_of[e].name, 0) + 1
    return out


def _filter_norms(w: np.ndarray, axis: int, channels: int, method: str) -> np.ndarray:
    """Per output channel mean |w| (l1) or RMS (l2), in float64 a block of channels at a time: a float64
    copy of a large weight (an LM head, memory-mapped from the data file) would cost twice its size."""
    moved = np.moveaxis(w, axis, 0).reshape(channels, -1)
    step = max(1, 2**24 // max(moved.shape[1], 1))  # about 128 MB of float64 per block
    out = np.empty(channels)
    for i in range(0, channels, step):
        block = moved[i:i + step].astype(np.float64)
        out[i:i + step] = np.sqrt((block**2).mean(1)) if method == "l2" else np.abs(block).mean(1)
    return out


def _weight(model, store, index, s: Source) -> np.ndarray:
    node = model.graph.node[s.node]
    return store.read(index.constant(index.resolve(node.input[weight_axes(node).input])))


def _out_axis(model, s: Source) -> int:
    """The stored weight's output-channel axis, from the op table (channel sources read it unmoved)."""
    return weight_axes(model.graph.node[s.node]).output


def _bn_scales(model, store, analysis: ChannelAnalysis, index: GraphIndex):
    """Per source with a BatchNormalization right after it: |γ| (network slimming) and |γ|/σ,
    the factor folding would multiply its filters by."""
    out, gain = {}, {}
    for s in analysis.sources:
        produced = model.graph.node[s.node].output[0]
        for consumer in index.consumers.get(produced, []):
            if consumer.op_type == "BatchNormalization":
                gamma = store.read(index.initializers[consumer.input[1]]) \
                    if consumer.input[1] in index.initializers else None
                if gamma is not None:
                    out[s.name] = np.abs(gamma.astype(np.float64))
                    var = _const_of(store, index, consumer.input[4])
                    eps = next((a.f for a in consumer.attribute if a.name == "epsilon"), 1e-5)
                    if var is not None:
                        gain[s.name] = out[s.name] / np.sqrt(var.astype(np.float64) + eps)
    return out, gain


def _const_of(store, index: GraphIndex, name: str):
    tensor = index.initializers.get(name)
    return None if tensor is None else store.read(tensor)
