"""The correct stage's pass: bias correction and BatchNorm re-estimation in one sweep, in depth order.

Every correction changes what the layers after it see, so the graph is corrected level by level (as
--sequential calibrates): the points at one depth (no point on a path between them) share one
onnxruntime pass over the calibration data, measured with every shallower point already corrected.
A point is a pruned layer (bias: match the dense output mean; affine: match mean and deviation, for a
producer a BatchNorm was folded into) or an unfused BatchNormalization (re-estimate its statistics)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from sparsec.channels.bn_reestimate import affine_match, reestimate, scale_filters, unfused_batchnorms
from sparsec.core.graph_index import GraphIndex
from sparsec.core.op_table import weight_axes
from sparsec.core.pipeline import PassContext, PassResult
from sparsec.core.shapes import infer_types
from sparsec.core.tensors import TensorStore, inline_copy
from sparsec.runtime.calibrate import CalibrationSettings
from sparsec.runtime.moments import Moments, channel_moments
from sparsec.weights.bias_correction import fold_shift
from sparsec.weights.sensitivity import HeldBack, graph_outputs, similarity


@dataclass(frozen=True)
class Point:
    """One place to correct: `tensor` is what is measured (a layer's output, a BN's input)."""

    kind: str  # bias | affine | bn
    node: str  # the node's name (or its output for an unnamed layer), for the report
    tensor: str
    axis: int


def correction_points(graph: onnx.GraphProto, layer_outputs: dict[str, str], affine: set[str],
                      bn: bool) -> tuple[list[list[Point]], list[tuple[str, str]]]:
    """The points grouped by depth (pure analysis), and the BatchNorms left as they are, with why.

    `layer_outputs`: output tensor -> layer name of the pruned layers to correct; those in `affine`
    get the mean-and-deviation match."""
    bns, kept = unfused_batchnorms(graph) if bn else ([], [])
    bn_ids = {id(n) for n in bns}
    depth: dict[str, int] = {}
    levels: dict[int, list[Point]] = {}
    for node in graph.node:
        before = max((depth.get(x, 0) for x in node.input if x), default=0)
        point = None
        if id(node) in bn_ids:
            point = Point("bn", node.name or node.output[0], node.input[0], 1)
        elif node.output and node.output[0] in layer_outputs:
            name = layer_outputs[node.output[0]]
            point = Point("affine" if name in affine else "bias", name, node.output[0],
                          weight_axes(node).out_axis)
        if point is not None:
            levels.setdefault(before, []).append(point)
            before += 1
        for out in node.output:
            depth[out] = before
    return [levels[k] for k in sorted(levels)], kept


@dataclass
class CorrectPass:
    """Correct the pruned graph towards the dense one on the calibration data.

    `dense` is the graph before the weights stage (self-contained); `layer_outputs` maps each pruned
    layer's output tensor to its name; `affine` names the layers whose BatchNorm was folded into them.
    """

    dense: onnx.ModelProto | None
    layer_outputs: dict[str, str]
    settings: CalibrationSettings
    bn: bool = False
    affine: set[str] = field(default_factory=set)
    match_bn: bool = True  # BatchNorm statistics moved by what pruning changed (else: measured outright)
    samples: int | None = None  # measure on the first N calibration samples only (--correct-samples)
    held: HeldBack | None = None  # guard: keep the correction only if these samples' outputs agree better
    name: str = "correct"
    requires: frozenset[str] = frozenset()

    def run(self, ctx: PassContext) -> PassResult:
        if self.held is None:
            details = self._correct(ctx.model, ctx.store)
            details.pop("_replay")
            return PassResult(self.name, bool(details["layers"] or details["batchnorms"]), details)
        # guarded: correct a copy, compare on the held-back samples, then replay the same shifts here
        trial, trial_store = inline_copy(ctx.model, ctx.store), TensorStore(ctx.store.base_dir)
        details = self._correct(trial, trial_store)
        dense = graph_outputs(self.dense, TensorStore(ctx.store.base_dir), self.held)
        without = similarity(dense, graph_outputs(ctx.model, ctx.store, self.held), self.held.counts)
        with_it = similarity(dense, graph_outputs(trial, trial_store, self.held), self.held.counts)
        kept = with_it >= without
        details["guard"] = {"held_back_samples": self.held.samples, "cosine_without": without,
                            "cosine_with": with_it, "kept": kept}
        replays = details.pop("_replay")
        if kept:
            for tensor, shift, rank, dtype in replays:
                node = next(n for n in ctx.model.graph.node if n.output and n.output[0] == tensor)
                fold_shift(ctx.model.graph, ctx.store, node, shift, rank, dtype)
        return PassResult(self.name, kept and bool(details["layers"]), details)

    def _correct(self, model: onnx.ModelProto, store: TensorStore) -> dict:
        """Correct `model` in place, level by level; the details (and the shifts, to replay)."""
        ctx = PassContext(model, store)
        graph = ctx.model.graph
        if self.dense is None:  # nothing to match against (no weight was pruned): adaptive BN
            self.layer_outputs, self.match_bn = {}, False
        if self.samples is not None and self.samples < self.settings.data.num_samples:
            self.settings = replace(self.settings, data=self.settings.data.head(self.samples))
        levels, kept = correction_points(graph, self.layer_outputs, self.affine, self.bn)
        points = [p for level in levels for p in level]
        wanted = {p.tensor: p.axis for p in points if p.kind != "bn" or self.match_bn}
        dense = channel_moments(self.dense, TensorStore(ctx.store.base_dir), wanted, self.settings) \
            if wanted else {}
        types = infer_types(ctx.model, self.settings.fixed_shapes)
        layers, bns = [], []
        for level in levels:
            now = channel_moments(ctx.model, ctx.store, {p.tensor: p.axis for p in level}, self.settings)
            for p in level:
                if p.kind == "bn":
                    bn = next(n for n in graph.node if n.op_type == "BatchNormalization"
                              and n.input[0] == p.tensor)
                    bns.append(reestimate(graph, ctx.store, bn, now[p.tensor], dense.get(p.tensor)))
                else:
                    layers.append(self._layer(ctx, p, dense[p.tensor], now[p.tensor], types))
        # a shift folded into the Add after a MatMul is not in the measured tensor: add it back
        outside = {row["_tensor"]: np.asarray(row.pop("_outside")) for row in layers if "_outside" in row}
        replay = [(row.pop("_tensor"), *row.pop("_fold")) for row in layers]
        oracle = self._oracle(ctx, points, dense, outside) if points else {}
        return {"layers": layers, "batchnorms": bns, "batchnorms_kept": kept, "levels": len(levels),
                "samples": self.settings.data.num_samples, "oracle": oracle, "_replay": replay}

    def _layer(self, ctx: PassContext, p: Point, dense: Moments, now: Moments, types) -> dict:
        graph = ctx.model.graph
        node = next(n for n in graph.node if n.output and n.output[0] == p.tensor)
        elem, rank = types.get(p.tensor, (onnx.TensorProto.FLOAT, 2))
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
        row = {"layer": p.node, "kind": p.kind, "_tensor": p.tensor}
        shift = dense.mean - now.mean
        if p.kind == "affine":
            a, b = affine_match(dense, now)
            why = scale_filters(graph, ctx.store, node, a)
            if why is None:
                shift = b
                row["scale_range"] = [float(a.min()), float(a.max())]
            else:
                row["note"] = f"mean only: {why}"
        row["where"] = fold_shift(graph, ctx.store, node, shift, rank, dtype)
        row["_fold"] = (shift, rank, dtype)
        if row["where"] == "add":
            row["_outside"] = shift
        row["shift_norm"] = float(np.linalg.norm(shift))
        row["mean_gap_before"] = float(np.abs(dense.mean - now.mean).max())
        return row

    def _oracle(self, ctx: PassContext, points: list[Point], dense: dict[str, Moments],
                outside: dict[str, np.ndarray]) -> dict:
        """The per-channel output means (and re-estimated BN statistics) measured again on the
        corrected graph: what the correction promised, checked."""
        after = channel_moments(ctx.model, ctx.store, {p.tensor: p.axis for p in points}, self.settings)
        out: dict = {}
        gaps = [float(np.abs(after[p.tensor].mean + outside.get(p.tensor, 0.0) - dense[p.tensor].mean).max()
                      / max(float(np.sqrt(dense[p.tensor].var).max()), 1e-12))
                for p in points if p.kind != "bn"]
        if gaps:
            out["max_mean_gap"] = max(gaps)  # ÷ the channel deviation of the dense output
        index = {n.input[0]: n for n in ctx.model.graph.node if n.op_type == "BatchNormalization"}
        bn_gaps = []
        for p in (p for p in points if p.kind == "bn"):
            written = ctx.store.read(GraphIndex(ctx.model.graph).stored_tensor(index[p.tensor].input[3]))
            bn_gaps.append(float(np.abs(after[p.tensor].mean - written).max()))
        if bn_gaps:
            out["max_bn_mean_gap"] = max(bn_gaps)
        return out
