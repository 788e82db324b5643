"""Zero weights by a score: N:M along the reduction axis, or unstructured per group."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sparsec.masks import apply_mask, nm_mask, unstructured_mask
from sparsec.options import NMPattern
from sparsec.pipeline import PassContext, PassResult
from sparsec.scores import ScoreFn, magnitude
from sparsec.selection import PruneTarget
from sparsec.tensors import TensorStore
from sparsec.weights import GraphIndex, to_effective, to_stored


@dataclass(frozen=True)
class PrunedWeight:
    """What pruning did to one stored weight."""

    weight: str
    layers: tuple[str, ...]
    pattern: str
    params: int
    nonzeros_before: int
    nonzeros: int


@dataclass
class PruneWeightsPass:
    """Apply a keep-mask to every target weight, in place, shape and dtype unchanged.

    The model keeps dense-with-zeros weights: TensorRT's ONNX parser reads only ordinary
    initializers, and its sparse kernels find the N:M pattern in them.
    """

    targets: list[PruneTarget]
    nm: NMPattern | None = None
    sparsity: float | None = None
    group: str = "output"
    score: ScoreFn = field(default=magnitude)
    name: str = "prune-weights"
    requires: frozenset[str] = frozenset()

    def run(self, ctx: PassContext) -> PassResult:
        index = GraphIndex(ctx.model.graph)
        pruned = [self._prune(index, ctx.store, t) for t in self.targets]
        modified = any(p.nonzeros != p.nonzeros_before for p in pruned)
        return PassResult(self.name, modified, {"weights": pruned})

    def _prune(self, index: GraphIndex, store: TensorStore, target: PruneTarget) -> PrunedWeight:
        layer = target.layer
        tensor = index.constant(layer.source)
        stored = store.read(tensor)
        effective = to_effective(stored, layer.source.steps)
        scores = self.score(layer, effective)
        if self.nm is not None:
            keep = nm_mask(scores, self.nm.n, self.nm.m, layer.reduction_axis)
            pattern = str(self.nm)
        else:
            keep = unstructured_mask(scores, self.sparsity or 0.0, self.group,
                                     output_axis=layer.output_axis,
                                     reduction_axis=layer.reduction_axis)
            pattern = f"unstructured/{self.group}"
        pruned = apply_mask(stored, to_stored(keep, layer.source.steps))
        before = int(np.count_nonzero(stored))
        after = int(np.count_nonzero(pruned))
        if after != before:
            store.write(tensor, pruned)
        return PrunedWeight(layer.weight, tuple(u.name for u in target.layers), pattern,
                            stored.size, before, after)
