"""OWL: outlier-weighed layerwise sparsity (Yin et al. 2024), an analysis pass.

Layers whose Wanda scores hold more outliers (scores above M times the layer's mean) keep
more weights. Ratios are spread over [S−λ, S+λ] and shifted (and clipped back into the band)
until the parameter-weighted mean sparsity is S. Unstructured patterns only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparsec.core.graph_index import GraphIndex
from sparsec.core.pipeline import PassContext, PassResult
from sparsec.weights.quant import real_weight
from sparsec.weights.scores import wanda
from sparsec.weights.selection import PruneTarget


def outlier_ratio(scores: np.ndarray, m: float) -> float:
    """Fraction of scores larger than m times their mean."""
    return float((scores > m * scores.mean()).mean())


def owl_sparsities(ratios: np.ndarray, params: np.ndarray, target: float, lam: float) -> np.ndarray:
    """Per-layer sparsity: more outliers, less sparsity; within [S−λ, S+λ], weighted mean S."""
    spread = ratios.max() - ratios.min()
    keep_bonus = (ratios - ratios.min()) / spread * 2 * lam if spread > 0 else np.zeros_like(ratios)
    sparsity = target + lam - keep_bonus  # in [target − λ, target + λ]
    low, high = max(target - lam, 0.0), min(target + lam, 0.99)
    for _ in range(50):  # shift to the exact mean, clip to the band, repeat (a projection)
        sparsity = np.clip(sparsity + target - float((sparsity * params).sum() / params.sum()), low, high)
    return sparsity


@dataclass
class OwlPass:
    targets: list[PruneTarget]
    sparsity: float
    lam: float = 0.08
    m: float = 5.0
    name: str = "owl"
    requires: frozenset[str] = frozenset({"calibration"})

    def run(self, ctx: PassContext) -> PassResult:
        index = GraphIndex(ctx.model.graph)
        calib = ctx.facts["calibration"]
        score = wanda({n: s.sumsq for n, s in calib.layers.items()})
        ratios, params = [], []
        for target in self.targets:
            layer = target.layer
            weight = real_weight(index, ctx.store, layer.source)
            ratios.append(outlier_ratio(score(layer, weight), self.m))
            params.append(layer.params)
        sparsities = owl_sparsities(np.array(ratios), np.array(params, dtype=np.float64),
                                    self.sparsity, self.lam)
        table = {t.weight: float(s) for t, s in zip(self.targets, sparsities, strict=True)}
        ctx.facts["layer_sparsity"] = table
        outliers = {t.weight: r for t, r in zip(self.targets, ratios, strict=True)}
        return PassResult(self.name, False, {"layer_sparsity": table, "outlier_ratio": outliers})
