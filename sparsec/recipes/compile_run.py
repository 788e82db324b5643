"""The state one compile threads through its stages: the graph being rewritten, the calibration data
(opened once, on first need), the passes run so far and what each stage leaves for the report."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from sparsec.core.layers import LayerAnalysis, Skipped, find_layers
from sparsec.core.macs import all_layer_macs
from sparsec.core.options import SETTINGS, CompileOptions, NMPattern, SettingsOptions
from sparsec.core.pipeline import PassContext, PassResult, Pipeline
from sparsec.core.tensors import inline_copy
from sparsec.recipes.step_oracle import StepOracle
from sparsec.runtime.calib_data import input_specs, open_calibration
from sparsec.runtime.calibrate import CalibrationSettings
from sparsec.runtime.observe import layer_shapes
from sparsec.runtime.scale_out import scale_out
from sparsec.runtime.session import resolve_providers
from sparsec.weights.lm_head import embedding_skips, lm_head_layers
from sparsec.weights.selection import PruneTarget, select_targets


@dataclass(frozen=True)
class Analysed:
    """The prunable layers of the graph as it was when a stage read it."""

    analysis: LayerAnalysis
    targets: list[PruneTarget]
    skipped: list[Skipped]
    macs: dict[str, int | None]


@dataclass
class CompileRun:
    """One compile in progress; stages read `ctx.model` as the previous stage left it."""

    loaded: Any  # sparsec.core.graph.LoadedModel
    options: CompileOptions
    ctx: PassContext
    fixed: dict
    results: list[PassResult] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=lambda: {"analyze_s": 0.0, "prune_s": 0.0})
    settings: CalibrationSettings | None = None
    structural: tuple | None = None  # (stage name, plan, Analysed before it, model after it)
    weights: Analysed | None = None  # what the weights stage analysed (the graph it pruned)
    targets: list[PruneTarget] = field(default_factory=list)  # the weights it pruned
    nothing: str | None = None  # the weights stage's one line when it had nothing to prune
    nm: NMPattern | None = None  # the pattern the weights stage pruned to (precision keeps it)
    dense: onnx.ModelProto | None = None  # the graph before the weights stage, kept for the correct stage
    masked_oracle: dict | None = None
    encoding: dict | None = None
    blobs: dict = field(default_factory=dict)
    oracle: StepOracle = field(init=False)  # the non-structural steps' before/after runs

    def __post_init__(self) -> None:
        self.oracle = StepOracle(self.fixed, self.shared.seed, self.shared.calib_range)

    @property
    def shared(self) -> SettingsOptions:
        """The settings every stage shares (shapes, calibration data, seed, verification)."""
        return self.options.of(SETTINGS)

    def calibration(self) -> CalibrationSettings | None:
        """The calibration data, opened and validated against the inputs on first use (None without)."""
        opts = self.shared
        if self.settings is None and opts.calibrated:
            reader = None if isinstance(opts.calib, str | Path | None) else opts.calib
            data = open_calibration(
                input_specs(self.ctx.model), path=None if reader is not None else opts.calib, reader=reader,
                random_samples=opts.calib_random, ranges=opts.calib_range, shapes=opts.shapes,
                samples=opts.calib_samples, seed=opts.seed)
            self.settings = CalibrationSettings(data=data, batch=opts.batch,
                                                providers=tuple(resolve_providers(opts.providers)),
                                                progress=False if self.options.quiet else None,
                                                fixed_shapes=self.fixed,
                                                scale=scale_out(opts.workers, opts.ray))
        return self.settings

    def analyse(self) -> Analysed:
        """find_layers + selection + MACs on the current graph (each stage re-analyses)."""
        start = time.perf_counter()
        model = self.ctx.model
        analysis = find_layers(model)
        targets, skipped = select_targets(analysis, self.options, lm_head_layers(model, analysis.layers))
        if self.options.prunes_weights:
            read = {x.weight for x in (*analysis.layers, *analysis.skipped)}
            skipped += embedding_skips(model, read)
        macs = all_layer_macs(model, analysis.layers,
                              layer_shapes(model, self.ctx.store, analysis.layers, self.fixed))
        self.timings["analyze_s"] += time.perf_counter() - start
        return Analysed(analysis, targets, skipped, macs)

    def run_passes(self, passes: list) -> list[PassResult]:
        start = time.perf_counter()
        results = Pipeline(passes).run(self.ctx)
        self.timings["prune_s"] += time.perf_counter() - start
        self.results += results
        return results

    def snapshot(self) -> onnx.ModelProto:
        """A self-contained copy of the graph as it is now (the correct stage's dense reference)."""
        return inline_copy(self.ctx.model, self.ctx.store)

