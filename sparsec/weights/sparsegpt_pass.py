"""SparseGPT (Frantar & Alistarh 2023): prune with second-order weight updates."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparsec.core.graph_index import GraphIndex, to_effective, to_stored
from sparsec.core.options import NMPattern
from sparsec.core.pipeline import PassContext, PassResult
from sparsec.runtime.progress import Progress
from sparsec.runtime.scale_out import ScaleOut, ordered_map
from sparsec.weights.scores import as_rows, from_rows
from sparsec.weights.selection import PruneTarget
from sparsec.weights.sparsegpt_solver import sparsegpt_prune_shared

from .prune_weights import PrunedWeight, PruneWeightsPass, finite_targets

# SparseGPT's update changes kept weights; an int8 weight would need requantizing, which can
# move every kept value, so a QDQ weight keeps its integers and takes Wanda's mask instead.
QUANTIZED_NOTE = ("quantized (QDQ) weight: SparseGPT's update would need requantization; "
                  "pruned with wanda scores, kept integers unchanged")


def _patch_rows(weight: np.ndarray) -> np.ndarray:
    """Conv [M, C, R, S] as [M, R·S·C]: the order of the im2col patches, N:M groups along C."""
    return weight.transpose(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _from_patch_rows(rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    m, c, r, s = shape
    return rows.reshape(m, r, s, c).transpose(0, 3, 1, 2)


def gram_ready(layer) -> bool:
    """SparseGPT needs the layer as [rows, K] against one Gram: 2-D weights and 1×1 convs."""
    per_out = int(np.prod(layer.shape)) // layer.shape[layer.output_axis] // layer.reduction_dim
    return layer.groups == 1 and per_out == 1


@dataclass
class SparseGPTPass:
    """Per layer: H = XᵀX/n + λI, column-wise OBS updates in blocks; kept weights change.

    k×k Convs use the Gram matrix of their im2col patches (collected in the graph by a
    one-hot Conv). Layers without a usable Gram matrix (grouped convs) fall back to Wanda and
    the report says so; nothing silently degrades to magnitude.
    """

    targets: list[PruneTarget]
    nm: NMPattern | None = None
    sparsity: float | None = None
    block_size: int = 128
    damp: float = 0.01
    scale: ScaleOut | None = None  # --workers / --ray: the per-layer solves as Ray tasks
    progress: bool | None = None  # layers solved and ETA on stderr; None: only on a terminal, False: -q
    name: str = "sparsegpt"
    requires: frozenset[str] = frozenset({"calibration"})

    def run(self, ctx: PassContext) -> PassResult:
        index = GraphIndex(ctx.model.graph)
        calib = ctx.facts["calibration"]
        ratios = ctx.facts.get("layer_sparsity", {})
        done: list[PrunedWeight] = []
        patched = {t.layer.name for t in self.targets if t.layer.name in calib.patches}
        fallback = [t for t in self.targets if t.layer.source.dequant is not None
                    or t.layer.name not in patched and (
                    not gram_ready(t.layer) or calib.layers.get(t.layer.name) is None
                    or calib.layers[t.layer.name].gram is None)]
        finite = finite_targets(ctx, index, self.targets)
        fallback = [t for t in fallback if t in finite]
        solved = [t for t in finite if t not in fallback]
        jobs = self._jobs(ctx, index, calib, ratios, solved, patched)
        with Progress(len(solved), "sparsegpt", enabled=self.progress if solved else False,
                      unit="layers") as bar:
            for keys, results in ordered_map(self.scale, sparsegpt_prune_shared, jobs):
                for (target, tensor, stored, shape, patch), res in zip(keys, results, strict=True):
                    bar.update()
                    done.append(self._write(ctx, calib, target, tensor, stored, shape, patch, res))
        position = {t.weight: i for i, t in enumerate(solved)}
        done.sort(key=lambda p: position[p.weight])  # the report in layer order, whatever the grouping
        if fallback:
            wanda_pass = PruneWeightsPass(fallback, nm=self.nm, sparsity=self.sparsity, method="wanda")
            quantized = {t.weight for t in fallback if t.layer.source.dequant is not None}
            for p in wanda_pass.run(ctx).details["weights"]:
                note = (QUANTIZED_NOTE if p.weight in quantized
                        else "SparseGPT needs a 2-D or 1x1 weight; this layer fell back to wanda")
                done.append(PrunedWeight(**{**p.__dict__, "note": note}))
        modified = any(p.nonzeros != p.nonzeros_before for p in done)
        return PassResult(self.name, modified, {"weights": done})

    def _write(self, ctx: PassContext, calib, target: PruneTarget, tensor, stored: np.ndarray,
               shape: tuple[int, ...], patch: bool, result) -> PrunedWeight:
        """Store one solved weight back in its stored layout; its report row."""
        layer = target.layer
        new_eff = (_from_patch_rows(result.weight, shape) if patch
                   else from_rows(layer, result.weight)).astype(stored.dtype)
        new_stored = np.ascontiguousarray(to_stored(new_eff, layer.source.steps))
        ctx.store.write(tensor, new_stored)
        # exact, from the solve itself: ‖(W − Ŵ)X‖/‖WX‖ over the rows (or im2col patches) it multiplies
        error, basis = result.error_after, "gram (im2col)" if patch else "gram"
        return PrunedWeight(
            layer.weight, tuple(u.name for u in target.layers),
            str(self.nm) if self.nm else "unstructured/sparsegpt", stored.size,
            int(np.count_nonzero(stored)), int(np.count_nonzero(new_stored)), "sparsegpt",
            calib.samples, error, basis)

    def _jobs(self, ctx: PassContext, index: GraphIndex, calib, ratios: dict, targets: list[PruneTarget],
              patched: set[str]):
        """One solve per Gram matrix, its weights read lazily: (what each write-back needs, args, kwargs) for
        ordered_map. Layers reading the same input (Q, K and V) share one factorisation of H (and with N:M
        one sweep); the solves are independent, so --workers/--ray run them as Ray tasks."""
        shared: dict[int, list] = {}  # id of the Gram matrix -> its layers, in layer order
        for target in targets:
            patch = target.layer.name in patched
            stats = calib.patches[target.layer.name] if patch else calib.layers[target.layer.name]
            shared.setdefault(id(stats.gram), []).append((target, patch, stats))
        for members in shared.values():
            keys, weights, sparsities = [], [], []
            for target, patch, _ in members:
                layer = target.layer
                tensor = index.constant(layer.source)
                stored = ctx.store.read(tensor)
                effective = to_effective(stored, layer.source.steps)
                weights.append(_patch_rows(effective) if patch else as_rows(layer, effective))
                sparsities.append(ratios.get(target.weight, self.sparsity))
                keys.append((target, tensor, stored, effective.shape, patch))
            stats = members[0][2]
            kwargs = {"sparsity": None if self.nm else sparsities, "n": self.nm.n if self.nm else None,
                      "m": self.nm.m if self.nm else None, "block_size": self.block_size,
                      "percdamp": self.damp, "error_before": False}  # the report shows the error after
            yield keys, (weights, stats.gram, stats.rows), kwargs
