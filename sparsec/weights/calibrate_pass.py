"""Collect activation statistics through onnxruntime (an analysis pass: the model is unchanged)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from sparsec.core.pipeline import PassContext, PassResult
from sparsec.runtime.calibrate import CalibrationSettings, CalibrationStats, collect_stats
from sparsec.runtime.level_cut import LevelCut
from sparsec.weights.selection import PruneTarget


@dataclass
class CalibratePass:
    """Run the calibration data through a temporary instrumented copy of the current model.

    Later passes read `facts["calibration"]`; with --sequential one such pass runs per depth
    level, after the earlier levels were pruned, and its statistics replace the old ones.
    """

    targets: list[PruneTarget]
    settings: CalibrationSettings
    gram: bool = False  # SparseGPT needs XᵀX, Wanda only its diagonal
    level: int | None = None
    name: str = "calibrate"
    requires: frozenset[str] = field(default_factory=frozenset)

    def run(self, ctx: PassContext) -> PassResult:
        layers = [layer for t in self.targets for layer in t.layers]
        if not layers:  # nothing to measure (every layer skipped, e.g. all inside subgraphs)
            ctx.facts.setdefault("calibration", CalibrationStats({}, 0, 0.0, {}))
            return PassResult(self.name, False, {"layers": 0, "samples": 0, "level": self.level,
                                                 "gram": self.gram})
        gram_for = {layer.name for layer in layers} if self.gram else set()
        if self.level is not None:  # the levels' rewrites stay file-backed: one pruned model is not in memory
            ctx.store.spill_rewrites()
        cut = ctx.facts.get("calibration_cut") if self.level is not None else None
        if self.level is not None and (cut is None or cut.level != self.level):  # a new sequence of levels
            cut = ctx.facts["calibration_cut"] = LevelCut(self.level)
        old: CalibrationStats | None = ctx.facts.get("calibration")
        if old is not None and self.level is not None:  # earlier levels' Gram matrices were used: free them
            old = replace(old, layers={k: replace(v, gram=None) for k, v in old.layers.items()},
                          patches={k: replace(v, gram=None) for k, v in old.patches.items()})
            ctx.facts["calibration"] = old
        stats = collect_stats(ctx.model, ctx.store, layers, self.settings, gram_for, cut)
        if old is not None:
            stats = CalibrationStats({**old.layers, **stats.layers}, stats.samples,
                                     old.seconds + stats.seconds,
                                     {**old.unavailable, **stats.unavailable})
        ctx.facts["calibration"] = stats
        details = {"layers": len(layers), "samples": stats.samples, "level": self.level,
                   "gram": self.gram}
        return PassResult(self.name, False, details)
