"""Zero weights by a score: N:M along the reduction axis, or unstructured per group."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from sparsec.core.graph_index import GraphIndex, to_effective, to_stored
from sparsec.core.options import NMPattern
from sparsec.core.pipeline import PassContext, PassResult
from sparsec.errors import SparsecError
from sparsec.weights.masks import (
    NonFinite,
    apply_mask,
    count_nonzero,
    nm_mask,
    nm_prune,
    non_finite_reason,
    unstructured_mask,
)
from sparsec.weights.quant import dequantize, zero_point
from sparsec.weights.scores import magnitude, relative_error_diagonal, relative_error_gram, wanda
from sparsec.weights.selection import PruneTarget

# weights are independent and numpy frees the GIL while it sweeps one: two prune at once; more would
# add a weight-sized score array each (Wanda) for little gain on a memory-bound sweep
PRUNE_THREADS = min(2, os.cpu_count() or 1)


@dataclass(frozen=True)
class PrunedWeight:
    """What pruning did to one stored weight."""

    weight: str
    layers: tuple[str, ...]
    pattern: str
    params: int
    nonzeros_before: int
    nonzeros: int
    method: str = "magnitude"
    samples: int | None = None
    rel_error: float | None = None  # ‖WX − ŴX‖/‖WX‖ estimated from calibration statistics
    rel_error_basis: str | None = None  # "gram" (exact) or "diagonal" (cross terms ignored)
    note: str | None = None


@dataclass
class PruneWeightsPass:
    """Apply a keep-mask to every target weight; shape and dtype unchanged.

    The model keeps dense-with-zeros weights: TensorRT's ONNX parser reads only ordinary
    initializers, and its sparse kernels find the N:M pattern in them. `method="wanda"` needs
    calibration statistics; per-layer sparsities (OWL) come from `facts["layer_sparsity"]`.
    """

    targets: list[PruneTarget]
    nm: NMPattern | None = None
    sparsity: float | None = None
    group: str = "output"
    method: str = "magnitude"
    name: str = "prune-weights"

    @property
    def requires(self) -> frozenset[str]:
        return frozenset({"calibration"}) if self.method == "wanda" else frozenset()

    def run(self, ctx: PassContext) -> PassResult:
        index = GraphIndex(ctx.model.graph)
        calib = ctx.facts.get("calibration")
        sumsq = {n: s.sumsq for n, s in calib.layers.items()} if calib else {}
        score = wanda(sumsq) if self.method == "wanda" else magnitude
        ratios = ctx.facts.get("layer_sparsity", {})
        pruned = []
        # magnitude N:M checks NaN/±Inf on its pruning sweep: each weight is read once, not twice
        fused = self.method == "magnitude" and self.nm is not None
        left = ctx.facts.setdefault("left_dense", {})
        targets = [t for t in self.targets if t.weight not in left] if fused \
            else finite_targets(ctx, index, self.targets)
        for target in targets:
            if self.method == "wanda" and target.layer.name not in sumsq:
                raise_missing(target, calib)

        def one(i: int) -> PrunedWeight | str:
            ahead = i + PRUNE_THREADS  # the weight after those being pruned comes off the disk meanwhile
            if ahead < len(targets):
                ctx.store.prefetch(index.constant(targets[ahead].layer.source))
            return self._prune(ctx, index, targets[i], score, ratios.get(targets[i].weight), calib, fused)

        pool = ThreadPoolExecutor(PRUNE_THREADS)
        try:  # results in target order, whichever thread finished first
            for target, done in zip(targets, pool.map(one, range(len(targets))), strict=True):
                if isinstance(done, str):
                    left[target.weight] = done
                else:
                    pruned.append(done)
        finally:
            pool.shutdown(cancel_futures=True)  # an error stops the weights not yet started
        modified = any(p.nonzeros != p.nonzeros_before for p in pruned)
        return PassResult(self.name, modified, {"weights": pruned})

    def _prune(self, ctx, index, target: PruneTarget, score, ratio, calib, finite: bool = False
               ) -> PrunedWeight | str:
        """One weight pruned and written; with `finite`, the reason it is left dense when the pruning
        sweep met NaN/±Inf."""
        layer = target.layer
        if layer.source.dequant is not None:
            return self._prune_quantized(ctx, index, target, score, ratio, calib)
        tensor = index.constant(layer.source)
        stored = ctx.store.read(tensor)
        effective = to_effective(stored, layer.source.steps)
        sparsity = self.sparsity if ratio is None else ratio
        try:
            pruned, before, after = prune_values(layer, stored, self.nm, sparsity, self.group, score,
                                                 effective, finite)
        except NonFinite:
            return non_finite_reason(stored) or "weight holds NaN or ±Inf values: left dense"
        pattern = str(self.nm) if self.nm is not None else f"unstructured/{self.group}"
        if after != before:
            ctx.store.write(tensor, pruned)
        error, basis = (estimate_error(layer, effective, to_effective(pruned, layer.source.steps), calib)
                        if calib else (None, None))
        return PrunedWeight(layer.weight, tuple(u.name for u in target.layers), pattern,
                            stored.size, before, after, self.method,
                            calib.samples if calib else None, error, basis)

    def _prune_quantized(self, ctx, index, target: PruneTarget, score, ratio, calib) -> PrunedWeight:
        """A QDQ weight: scores on the dequantized values; removed weights become the zero point,
        which dequantizes to exactly 0; kept integers stay bit for bit."""
        layer, steps = target.layer, target.layer.source.steps
        tensor = index.constant(layer.source)
        stored = ctx.store.read(tensor)
        zero = zero_point(index, ctx.store, layer.source)
        real = to_effective(dequantize(index, ctx.store, layer.source, stored), steps)
        if self.nm is not None:
            keep = nm_mask(score(layer, real), self.nm.n, self.nm.m, layer.reduction_axis)
            pattern = str(self.nm)
        else:
            sparsity = self.sparsity if ratio is None else ratio
            keep = unstructured_mask(score(layer, real), sparsity or 0.0, self.group,
                                     output_axis=layer.output_axis, reduction_axis=layer.reduction_axis)
            pattern = f"unstructured/{self.group}"
        pruned = np.where(to_stored(keep, steps), stored, zero).astype(stored.dtype)
        before, after = count_nonzero(stored, zero), count_nonzero(pruned, zero)
        if after != before:
            ctx.store.write(tensor, pruned)
        pruned_real = to_effective(dequantize(index, ctx.store, layer.source, pruned), steps)
        error, basis = estimate_error(layer, real, pruned_real, calib) if calib else (None, None)
        return PrunedWeight(layer.weight, tuple(u.name for u in target.layers), pattern,
                            stored.size, before, after, self.method,
                            calib.samples if calib else None, error, basis)


def prune_values(layer, stored: np.ndarray, nm: NMPattern | None, sparsity: float | None, group: str,
                 score, effective: np.ndarray | None = None, finite: bool = False
                 ) -> tuple[np.ndarray, int, int]:
    """A (non-QDQ) stored weight as magnitude/Wanda pruning leaves it: (pruned, non-zeros before, after).
    The pass writes it; the quality policy's sensitivity measures it without writing. `finite` (N:M by
    magnitude): raise masks.NonFinite on a NaN/±Inf met by the pruning sweep."""
    if effective is None:
        effective = to_effective(stored, layer.source.steps)
    if nm is not None:
        scores = None if score is magnitude else score(layer, effective)
        new_eff, before, after = nm_prune(effective, nm.n, nm.m, layer.reduction_axis, scores,
                                          finite and scores is None)
        return np.ascontiguousarray(to_stored(new_eff, layer.source.steps)), before, after
    keep = unstructured_mask(score(layer, effective), sparsity or 0.0, group,
                             output_axis=layer.output_axis, reduction_axis=layer.reduction_axis)
    pruned = apply_mask(stored, to_stored(keep, layer.source.steps))
    return pruned, count_nonzero(stored), count_nonzero(pruned)


def finite_targets(ctx: PassContext, index: GraphIndex, targets: list[PruneTarget]) -> list[PruneTarget]:
    """The targets whose weights are finite; the others go to `facts["left_dense"]` with the reason
    (the report lists them, the pattern check skips them)."""
    left = ctx.facts.setdefault("left_dense", {})
    out = []
    for target in targets:
        if target.weight not in left and target.layer.source.dequant is None:
            reason = non_finite_reason(ctx.store.read(index.constant(target.layer.source)))
            if reason:
                left[target.weight] = reason
        if target.weight not in left:
            out.append(target)
    return out


def estimate_error(layer, weight, pruned, calib) -> tuple[float | None, str | None]:
    """Relative output error from the statistics: exact with a Gram matrix, else diagonal."""
    stats = calib.layers.get(layer.name) if calib else None
    if stats is None:
        return None, None
    if stats.gram is not None and layer.groups == 1:
        rows_per_out = int(np.prod(layer.shape)) // layer.shape[layer.output_axis] // layer.reduction_dim
        if rows_per_out == 1:
            return relative_error_gram(layer, weight, pruned, stats.gram), "gram"
    return relative_error_diagonal(layer, weight, pruned, stats.sumsq), "diagonal"


def raise_missing(target: PruneTarget, calib) -> None:
    why = (calib.unavailable.get(target.layer.name) if calib else None) or "no statistics were collected"
    raise SparsecError(f"wanda cannot score layer {target.layer.name}: {why}",
                       "exclude it with --exclude or use --method magnitude")
