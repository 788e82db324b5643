"""`sparsec inspect`: every prunable layer, its cost, and whether it already fits 2:4 / 4:8."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sparsec.core.graph import load_model
from sparsec.core.graph_index import GraphIndex, to_effective
from sparsec.core.layers import find_layers
from sparsec.core.macs import all_layer_macs
from sparsec.core.report import _count, strict_json
from sparsec.core.shapes import fixed_input_shapes
from sparsec.runtime.observe import layer_shapes
from sparsec.transformer.attention import find_attention
from sparsec.version import __version__
from sparsec.weights.masks import count_nonzero, satisfies_nm
from sparsec.weights.quant import effective_zero
from sparsec.weights.selection import nm_skip_reason

PATTERNS = ((2, 4), (4, 8))


@dataclass
class InspectLayer:
    name: str
    op: str
    weight: str
    shape: list[int]
    reduction_axis: int
    params: int
    nonzeros: int
    macs: int | None
    tensorrt_nm: dict[str, str | None]  # "2:4" -> None when TensorRT can use it, else why not
    satisfies: dict[str, bool]  # "2:4" -> the weight already holds the pattern


@dataclass
class InspectReport:
    sparsec_version: str
    input: str
    layers: list[InspectLayer]
    totals: dict[str, Any]
    skipped: list[dict[str, str]] = field(default_factory=list)
    attention: list[dict[str, Any]] = field(default_factory=list)
    unexplained_softmax: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return strict_json(self.as_dict())


def inspect_model(model_path: str | Path, shapes: dict[str, tuple[int, ...]] | None = None
                  ) -> InspectReport:
    """Describe every prunable layer of a model without changing anything."""
    loaded = load_model(model_path)
    model = loaded.model
    analysis = find_layers(model)
    fixed = fixed_input_shapes(model, shapes or {})
    macs = all_layer_macs(model, analysis.layers, layer_shapes(model, loaded.store, analysis.layers, fixed))
    index = GraphIndex(model.graph)
    layers = []
    for layer in analysis.layers:
        values = to_effective(loaded.store.read(index.constant(layer.source)), layer.source.steps)
        zero = effective_zero(index, loaded.store, layer.source)  # a QDQ weight's zero point
        layers.append(InspectLayer(
            name=layer.name, op=layer.op, weight=layer.weight, shape=list(layer.shape),
            reduction_axis=layer.reduction_axis, params=layer.params,
            nonzeros=count_nonzero(values, zero),
            macs=macs[layer.name],
            tensorrt_nm={f"{n}:{m}": nm_skip_reason(layer, m) for n, m in PATTERNS},
            satisfies={f"{n}:{m}": satisfies_nm(values, n, m, layer.reduction_axis, zero)
                       for n, m in PATTERNS},
        ))
    attention = find_attention(model)
    unique = {e.weight: e for e in layers}
    known = [e.macs for e in layers if e.macs is not None]
    return InspectReport(
        sparsec_version=__version__,
        input=str(loaded.path),
        layers=layers,
        totals={"layers": len(layers), "params": sum(e.params for e in unique.values()),
                "nonzeros": sum(e.nonzeros for e in unique.values()), "macs": sum(known),
                "macs_unknown_layers": len(layers) - len(known)},
        skipped=[{"name": s.name, "op": s.op, "reason": s.reason} for s in analysis.skipped],
        attention=[{"layer": b.name, "heads": b.heads, "kv_heads": b.kv_heads, "head_dim": b.head_dim,
                    "q": b.q.weight, "k": b.k.weight, "v": b.v.weight, "o": b.o.weight}
                   for b in attention.blocks],
        unexplained_softmax=[{"node": n, "reason": r} for n, r in attention.unexplained],
    )


def inspect_table(report: InspectReport) -> str:
    rows = [("layer", "op", "shape", "axis", "params", "MACs", "TRT 2:4", "has 2:4", "has 4:8")]
    for e in report.layers:
        rows.append((e.name, e.op, "x".join(map(str, e.shape)), str(e.reduction_axis),
                     f"{e.params:,}", _count(e.macs),
                     "yes" if e.tensorrt_nm["2:4"] is None else "no",
                     "yes" if e.satisfies["2:4"] else "no", "yes" if e.satisfies["4:8"] else "no"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    t = report.totals
    lines.append(f"\n{t['layers']} prunable layers, {t['params']:,} weights, {_count(t['macs'])} MACs")
    for e in report.layers:
        if e.tensorrt_nm["2:4"] is not None:
            lines.append(f"not TensorRT 2:4: {e.name}: {e.tensorrt_nm['2:4']}")
    for s in report.skipped:
        lines.append(f"not prunable: {s['name']} ({s['op']}): {s['reason']}")
    for a in report.attention:
        lines.append(f"attention {a['layer']}: {a['heads']} heads ({a['kv_heads']} K/V) of {a['head_dim']}; "
                     f"Q {a['q']}, K {a['k']}, V {a['v']}, O {a['o']}")
    for u in report.unexplained_softmax:
        lines.append(f"unexplained {u['node']}: {u['reason']}")
    return "\n".join(lines)
