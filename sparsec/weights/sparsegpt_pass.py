"""SparseGPT (Frantar & Alistarh 2023): prune with second-order weight updates."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparsec.core.graph_index import GraphIndex, to_effective, to_stored
from sparsec.core.options import NMPattern
from sparsec.core.pipeline import PassContext, PassResult
from sparsec.weights.scores import as_rows, from_rows
from sparsec.weights.selection import PruneTarget
from sparsec.weights.sparsegpt_solver import sparsegpt_prune

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
        for target in finite:
            if target in fallback:
                continue
            layer = target.layer
            patch = layer.name in patched
            stats = calib.patches[layer.name] if patch else calib.layers[layer.name]
            tensor = index.constant(layer.source)
            stored = ctx.store.read(tensor)
            effective = to_effective(stored, layer.source.steps)
            sparsity = ratios.get(target.weight, self.sparsity)
            rows = _patch_rows(effective) if patch else as_rows(layer, effective)
            result = sparsegpt_prune(
                rows, stats.gram, stats.rows,
                sparsity=None if self.nm else sparsity, n=self.nm.n if self.nm else None,
                m=self.nm.m if self.nm else None, block_size=self.block_size, percdamp=self.damp)
            new_eff = (_from_patch_rows(result.weight, effective.shape) if patch
                       else from_rows(layer, result.weight)).astype(stored.dtype)
            new_stored = np.ascontiguousarray(to_stored(new_eff, layer.source.steps))
            ctx.store.write(tensor, new_stored)
            # exact, from the solve itself: ‖(W − Ŵ)X‖/‖WX‖ over the rows (or im2col patches) it multiplies
            error, basis = result.error_after, "gram (im2col)" if patch else "gram"
            done.append(PrunedWeight(
                layer.weight, tuple(u.name for u in target.layers),
                str(self.nm) if self.nm else "unstructured/sparsegpt", stored.size,
                int(np.count_nonzero(stored)), int(np.count_nonzero(new_stored)), "sparsegpt",
                calib.samples, error, basis))
        if fallback:
            wanda_pass = PruneWeightsPass(fallback, nm=self.nm, sparsity=self.sparsity, method="wanda")
            quantized = {t.weight for t in fallback if t.layer.source.dequant is not None}
            for p in wanda_pass.run(ctx).details["weights"]:
                note = (QUANTIZED_NOTE if p.weight in quantized
                        else "SparseGPT needs a 2-D or 1x1 weight; this layer fell back to wanda")
                done.append(PrunedWeight(**{**p.__dict__, "note": note}))
        modified = any(p.nonzeros != p.nonzeros_before for p in done)
        return PassResult(self.name, modified, {"weights": done})
