"""--min-similarity's choice: which measured weights to prune so the output similarity stays above a floor.

Pure analysis over the sensitivity table (sparsec.weights.sensitivity). Greedy by MACs saved per unit of
sensitivity (1 − similarity), while the summed sensitivities stay within the budget 1 − floor; then the
combined model is measured on the held-back samples and the least efficient chosen weight is backed off
until the floor holds. The result is a typed plan: the weights to prune and, for every other one, why it
stays dense. The weights stage prunes exactly the chosen ones and checks the floor again on its result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sparsec.weights.sensitivity import Sensitivity

TINY = 1e-9  # a sensitivity below this counts as free


def efficiency(row: Sensitivity) -> float:
    """MACs saved per unit of sensitivity (the greedy order)."""
    return row.macs_saved / max(row.sensitivity, TINY)


@dataclass(frozen=True)
class QualityPlan:
    """What --min-similarity decided: the weights to prune and why every other one stays dense."""

    floor: float
    fit_samples: int
    held_samples: int
    table: tuple[Sensitivity, ...]  # in greedy order
    chosen: tuple[str, ...]  # weights to prune, in greedy order
    dense: dict[str, str] = field(default_factory=dict)  # weight -> why it stays dense
    similarity: float = 1.0  # the combined model's held-back similarity (its masks)
    checks: int = 0  # combined-model measurements

    def as_dict(self) -> dict:
        """report.json's `policy` entry of the weights step."""
        return {"min_similarity": self.floor, "fit_samples": self.fit_samples,
                "held_back_samples": self.held_samples, "combined_similarity": self.similarity,
                "checks": self.checks,
                "table": [{"weight": r.weight, "layers": list(r.layers), "macs_saved": r.macs_saved,
                           "similarity": r.similarity, "sensitivity": r.sensitivity,
                           "pruned": r.weight in self.chosen, "reason": self.dense.get(r.weight)}
                          for r in self.table],
                "kept_dense": dict(self.dense)}


def choose(table: list[Sensitivity], floor: float, combined: Callable[[tuple[str, ...]], float],
           fit_samples: int, held_samples: int, unmeasured: dict[str, str] | None = None) -> QualityPlan:
    """Greedy choice within the budget, then back off until `combined(chosen)` ≥ floor."""
    order = sorted(table, key=lambda r: (-efficiency(r), -r.macs_saved, r.weight))
    budget, spent = 1.0 - floor, 0.0
    chosen: list[str] = []
    dense = dict(unmeasured or {})
    for row in order:
        if row.macs_saved <= 0:
            dense[row.weight] = "pruning saves no MACs here"
        elif spent + row.sensitivity <= budget + TINY:
            chosen.append(row.weight)
            spent += row.sensitivity
        else:
            dense[row.weight] = (f"sensitivity {row.sensitivity:.4g} > remaining budget "
                                 f"{max(budget - spent, 0.0):.4g} (1 - {floor:g} - the chosen layers')")
    checks, sim = 0, 1.0
    while chosen:
        sim, checks = combined(tuple(chosen)), checks + 1
        if sim >= floor:
            break
        dropped = chosen.pop()  # the least MACs per sensitivity among the chosen
        dense[dropped] = (f"backed off: the combined model's held-back similarity {sim:.4g} < {floor:g}")
        sim = 1.0
    return QualityPlan(floor, fit_samples, held_samples, tuple(order), tuple(chosen), dense, sim, checks)


def back_off(plan: QualityPlan, similarity: float) -> QualityPlan:
    """The plan without its least efficient chosen weight, after the pruned model measured `similarity`
    (below the floor) on the held-back samples."""
    chosen = list(plan.chosen)
    dropped = chosen.pop()
    dense = {**plan.dense, dropped: (f"backed off: the pruned model's held-back similarity "
                                     f"{similarity:.4g} < {plan.floor:g}")}
    return QualityPlan(plan.floor, plan.fit_samples, plan.held_samples, plan.table, tuple(chosen), dense,
                       plan.similarity, plan.checks + 1)


def table_lines(table: list[Sensitivity] | tuple[Sensitivity, ...], reasons: dict[str, str] | None = None
                ) -> list[str]:
    """The sensitivity table as text (most sensitive first), for `inspect --sensitivity` and the summary."""
    rows = sorted(table, key=lambda r: -r.sensitivity)
    width = max([len(", ".join(r.layers)) for r in rows] + [5])
    lines = [f"{'layer':<{width}}  {'similarity':>10}  {'sensitivity':>11}  {'MACs saved':>12}  decision"]
    for r in rows:
        decision = "" if reasons is None else \
            ("dense: " + reasons[r.weight] if r.weight in reasons else "pruned")
        lines.append(f"{', '.join(r.layers):<{width}}  {r.similarity:>10.5f}  {r.sensitivity:>11.5f}  "
                     f"{r.macs_saved:>12.0f}  {decision}".rstrip())
    return lines
