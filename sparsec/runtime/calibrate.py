"""Run the instrumented graph over calibration batches and accumulate statistics in float64."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from sparsec.core.layers import Layer
from sparsec.core.shapes import fixed_input_shapes, infer_types
from sparsec.core.tensors import TensorStore
from sparsec.errors import SparsecError
from sparsec.runtime.calib_data import CalibrationData
from sparsec.runtime.instrument import (
    StatSpec,
    activation_of,
    instrumented_graph,
    plan_patches,
    plan_stats,
    subgraph_reads,
)
from sparsec.runtime.level_cut import CutPlan, LevelCut, advance, plan_cut
from sparsec.runtime.observe import observe_shapes
from sparsec.runtime.progress import Progress
from sparsec.runtime.scale_out import ScaleOut, sharded_sums
from sparsec.runtime.session import run_checked, session_with_values
from sparsec.runtime.stat_sums import StatSums


@dataclass(frozen=True)
class ActivationStats:
    """What calibration learned about the input of a layer."""

    tensor: str
    axis: int
    channels: int
    sumsq: np.ndarray  # [K] float64: Σ x_j² over every row
    sums: np.ndarray  # [K] float64: Σ x_j (means for intercepts)
    rows: int  # how many rows (samples × positions) went in
    gram: np.ndarray | None  # [K, K] float64: Σ x xᵀ, when asked for

    @property
    def norm(self) -> np.ndarray:
        """‖X_j‖₂ per input channel (Wanda's activation term)."""
        return np.sqrt(self.sumsq)


@dataclass(frozen=True)
class CalibrationStats:
    layers: dict[str, ActivationStats]
    samples: int
    seconds: float
    unavailable: dict[str, str] = field(default_factory=dict)  # layer -> why it has no stats
    patches: dict[str, ActivationStats] = field(default_factory=dict)  # k×k Conv -> im2col stats


@dataclass(frozen=True)
class CalibrationSettings:
    data: CalibrationData
    batch: int = 8
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    progress: bool | None = None  # None: only on a terminal
    fixed_shapes: dict = field(default_factory=dict)
    scale: ScaleOut | None = None  # --workers / --ray: batches sharded over Ray workers


def collect_stats(model: onnx.ModelProto, store: TensorStore, layers: list[Layer],
                  settings: CalibrationSettings, gram_for: set[str] = frozenset(),
                  cut: LevelCut | None = None) -> CalibrationStats:
    """Statistics of every layer's input over all calibration samples.

    `cut` (--sequential): start from the values the previous level kept, and keep this level's."""
    start = time.perf_counter()
    if not settings.fixed_shapes:  # symbolic dims as 1: ranks then come from inference, not a run
        settings = replace(settings, fixed_shapes=fixed_input_shapes(model, {}))
    types = infer_types(model, settings.fixed_shapes)
    nodes = model.graph.node
    ranks = {name: rank for name, (_, rank) in types.items()}
    specs, by_layer, unknown = plan_stats(layers, nodes, set(gram_for), ranks)
    if unknown:  # exporters' computed shapes: ask onnxruntime once for the missing ranks
        wanted = [_activation_name(la, nodes) for la in layers if la.name in unknown]
        ranks.update({k: len(v) for k, v in
                      observe_shapes(model, store, settings.fixed_shapes, wanted).items()})
        specs, by_layer, unknown = plan_stats(layers, nodes, set(gram_for), ranks)
    patch_specs = plan_patches(layers, nodes, set(gram_for), len(specs))
    spec_list = list(specs.values()) + list(patch_specs.values())
    if not spec_list:  # nothing to measure: onnxruntime refuses a graph without outputs
        return CalibrationStats({}, 0, time.perf_counter() - start,
                                {name: "the rank of its input is unknown" for name in unknown})
    graph = instrumented_graph(model, spec_list, ranks, {k: v[0] for k, v in types.items()})
    plan = plan_cut(model, graph, cut) if cut is not None and settings.scale is None else None
    graph = plan.graph if plan is not None else graph
    used = {i for n in graph.graph.node for i in [*n.input, *subgraph_reads(n)]}  # outer scope too
    tensors = [t for t in model.graph.initializer if t.name in used]
    with Progress(settings.data.num_samples, "calibrating", enabled=settings.progress) as bar:
        batches = settings.data.sized_batches(settings.batch)
        if settings.scale is None:
            session = session_with_values(graph, tensors, store, list(settings.providers))
            names = [o.name for o in graph.graph.output]
            if plan is None:
                total = _accumulate(session, names, spec_list, batches, bar.update)
            else:
                total, fetched = _accumulate_cut(session, names, spec_list, batches, bar.update, cut, plan)
                advance(model, cut, plan, fetched)
        else:
            total = sharded_sums(settings.scale, graph, tensors, store, spec_list, batches,
                                 list(settings.providers), bar.update)
    sums, rows, grams, seen = total.sums, total.rows, total.grams, total.seen
    if seen == 0:
        raise SparsecError("calibration data yielded no samples", "check --calib")
    stats = {key: _stats(s, sums, rows, grams) for key, s in specs.items()}
    for s in stats.values():
        if not np.isfinite(s.sumsq).all():
            raise SparsecError(f"calibration statistics of tensor {s.tensor} are not finite",
                               "the model overflows on this data; check --calib")
    return CalibrationStats(
        layers={name: stats[key] for name, key in by_layer.items()},
        samples=seen, seconds=time.perf_counter() - start,
        unavailable={name: "the rank of its input is unknown" for name in unknown},
        patches={name: _stats(s, sums, rows, grams) for name, s in patch_specs.items()},
    )


def _accumulate(session, names: list[str], spec_list: list[StatSpec], batches, done) -> StatSums:
    """Run every batch in this process and add up the reducers' outputs in float64."""
    total = StatSums(spec_list)
    for n, feeds in batches:
        outs = run_checked(session, names, feeds, "the calibration graph")
        total.add(dict(zip(names, outs, strict=True)), n)
        done(n)
    return total


def _accumulate_cut(session, names: list[str], spec_list: list[StatSpec], batches, done, cut: LevelCut,
                    plan: CutPlan) -> tuple[StatSums, dict[str, list[np.ndarray]]]:
    """`_accumulate` on a graph cut at the kept values: each batch also feeds those and fetches the next."""
    total = StatSums(spec_list)
    inputs = {i.name for i in session.get_inputs()}
    fetched: dict[str, list[np.ndarray]] = {name: [] for name in plan.fetch}
    for b, (n, feeds) in enumerate(batches):
        feeds = {k: v for k, v in feeds.items() if k in inputs} | {k: cut.values[k][b] for k in plan.fed}
        outs = dict(zip(names, run_checked(session, names, feeds, "the calibration graph"), strict=True))
        for name in plan.fetch:
            fetched[name].append(outs.pop(name))
        total.add(outs, n)
        done(n)
    return total, fetched


def _stats(spec: StatSpec, sums, rows, grams) -> ActivationStats:
    return ActivationStats(spec.tensor, spec.axis, spec.channels, sums[spec.sumsq_output],
                           sums[spec.sum_output], rows[spec.size_output], grams.get(spec.gram_output))


def _activation_name(layer: Layer, nodes) -> str:
    node = nodes[layer.node_index]
    trans = tuple(next((a.i for a in node.attribute if a.name == k), 0) for k in ("transA", "transB"))
    return activation_of(layer, node, trans)[0]
