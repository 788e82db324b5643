"""Prove the N:M pattern holds on every pruned weight of the final model.

Precision conversion runs after pruning; a converted zero must stay zero. If it did not,
emitting the model would be wrong, so this pass fails loudly instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsec.core.graph_index import GraphIndex, to_effective
from sparsec.core.options import NMPattern
from sparsec.core.pipeline import PassContext, PassResult
from sparsec.errors import SparsecError
from sparsec.weights.masks import satisfies_nm
from sparsec.weights.quant import effective_zero
from sparsec.weights.selection import PruneTarget


@dataclass
class CheckPatternPass:
    """Analysis-only pass: never modifies the model."""

    targets: list[PruneTarget]
    nm: NMPattern
    name: str = "check-pattern"
    requires: frozenset[str] = frozenset()

    def run(self, ctx: PassContext) -> PassResult:
        index = GraphIndex(ctx.model.graph)
        left = ctx.facts.get("left_dense", {})
        for target in (t for t in self.targets if t.weight not in left):
            layer = target.layer
            values = to_effective(ctx.store.read(index.constant(layer.source)), layer.source.steps)
            zero = effective_zero(index, ctx.store, layer.source)  # a QDQ weight's zero point
            if not satisfies_nm(values, self.nm.n, self.nm.m, layer.reduction_axis, zero):
                raise SparsecError(
                    f"weight {layer.weight} of {layer.name} breaks the {self.nm} pattern after "
                    "the rewrite; this is a sparsec bug, please report it"
                )
        return PassResult(self.name, False, {"checked": len(self.targets)})
