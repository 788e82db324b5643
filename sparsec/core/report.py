"""The compile report: what was pruned or left dense, what it costs, how close it stays."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

REPORT_KEYS = ("sparsec_version", "input", "output", "options", "layers", "totals", "verify",
               "skipped", "passes", "timings", "tensorrt")


@dataclass
class LayerEntry:
    """One weight-carrying layer, pruned or not."""

    name: str
    op: str
    weight: str
    shape: list[int]
    reduction_axis: int
    pattern: str
    sparsity: float
    params: int
    nonzeros: int
    macs_dense: int | None
    macs_nonzero: int | None
    skipped_reason: str | None = None
    method: str | None = None  # score that chose the mask (null when left dense)
    calib_samples: int | None = None
    rel_error: float | None = None  # ‖WX − ŴX‖/‖WX‖ estimated from calibration statistics
    rel_error_basis: str | None = None  # "gram": exact; "diagonal": XᵀX's diagonal only
    note: str | None = None  # e.g. a fallback to another method


@dataclass
class Report:
    """Everything `sparsec compile` did; `as_dict` is the report.json schema."""

    sparsec_version: str
    input: str
    output: str | None
    options: dict[str, Any]
    layers: list[LayerEntry]
    totals: dict[str, Any]
    verify: dict[str, Any] | None
    skipped: list[dict[str, str]]
    passes: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    tensorrt: dict[str, Any] = field(default_factory=dict)
    channels: dict[str, Any] | None = None  # channel pruning: sources, groups, compensation
    transformer: dict[str, Any] | None = None  # heads/FFN per block and the cost model
    encoding: dict[str, Any] | None = None  # weights.sparsec: format and sizes per tensor
    nothing_pruned: str | None = None  # one line: why a weight-pruning compile changed no weight
    steps: list[dict[str, Any]] = field(default_factory=list)  # each stage: plan, passes, oracle
    recipe: dict[str, Any] | None = None  # the stages as run with every option value (recipe.yaml)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return strict_json(self.as_dict())


def strict_json(obj: Any) -> str:
    """JSON that every parser reads: NaN and ±Inf (from NaN weights or degenerate outputs) become null."""
    return json.dumps(_finite(obj), indent=2, sort_keys=False, allow_nan=False)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy scalar
        return _finite(obj.item())
    return obj


def totals(layers: list[LayerEntry], weight_bytes: dict[str, int]) -> dict[str, Any]:
    """Sums over layers; a weight shared by several layers counts once in params."""
    seen: dict[str, LayerEntry] = {}
    for entry in layers:
        seen.setdefault(entry.weight, entry)
    params = sum(e.params for e in seen.values())
    nonzeros = sum(e.nonzeros for e in seen.values())
    known = [e for e in layers if e.macs_dense is not None]
    return {
        "layers": len(layers),
        "layers_pruned": sum(1 for e in layers if e.skipped_reason is None),
        "params": params,
        "nonzeros": nonzeros,
        "sparsity": 1.0 - nonzeros / params if params else 0.0,
        "macs_dense": sum(e.macs_dense for e in known),
        "macs_nonzero": sum(e.macs_nonzero or 0 for e in known),
        "macs_unknown_layers": len(layers) - len(known),
        "bytes_dense": sum(weight_bytes.get(w, 0) for w in seen),
    }


def summary_table(report: Report) -> str:
    """A readable table for stdout."""
    rows = [("layer", "op", "shape", "pattern", "sparsity", "MACs dense", "MACs nz")]
    for e in report.layers:
        rows.append((
            _clip(e.name, 40), e.op, "x".join(map(str, e.shape)),
            e.pattern if e.skipped_reason is None else "dense",
            f"{e.sparsity:.1%}", _count(e.macs_dense), _count(e.macs_nonzero),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    t = report.totals
    lines.append("")
    lines.append(f"pruned {t['layers_pruned']}/{t['layers']} layers; weights {t['params']:,} -> "
                 f"{t['nonzeros']:,} {'kept' if report.channels else 'non-zero'} "
                 f"({t['sparsity']:.1%} removed); MACs {_count(t['macs_dense'])} -> "
                 f"{_count(t['macs_nonzero'])}")
    lines += _structured_lines(report)
    for s in report.skipped:
        lines.append(f"left dense: {s['name']} ({s['op']}): {s['reason']}")
    if report.encoding and "totals" in report.encoding:
        e = report.encoding["totals"]
        formats = ", ".join(f"{k} {v}" for k, v in e["formats"].items())
        lines.append(f"encoded {e['tensors']} weights: {e['dense_bytes']:,} -> {e['encoded_bytes']:,} bytes "
                     f"({formats}) in {report.encoding['container']}")
    elif report.encoding:
        lines.append(f"encoding: {report.encoding.get('skipped')}")
    lines += _step_lines(report.steps)
    lines += _verify_lines(report.verify)
    if report.output:
        lines.append(f"wrote {report.output}")
    return "\n".join(lines)


def _structured_lines(report: Report) -> list[str]:
    """Transformer blocks, channel groups and BatchNorm folds, one line each."""
    lines: list[str] = []
    if report.transformer:
        for b in report.transformer["blocks"]:
            ffn = f", FFN {b['ffn_before']} -> {b['ffn_after']}" if b["ffn_before"] else ""
            tok = (f", tokens {b['tokens_before']} -> {b['tokens_after']}"
                   if b.get("tokens_after") != b.get("tokens_before") else "")
            lines.append(f"{b['block']}: heads {b['heads_before']} -> {b['heads_after']}{ffn}{tok}")
        cm = report.transformer["cost_model"]
        lines.append(f"transformer cost model (B={cm['batch']}, L={cm['seq']}, E={cm['hidden']}): "
                     f"{_count(cm['before'])} -> {_count(cm['after'])}")
    if report.channels:
        c = report.channels
        lines.append(f"channels: removed {c['removed']} of {c['removable']} removable")
        for g in c["groups"]:
            if g["untouchable"]:
                lines.append(f"kept whole: {', '.join(g['sources'][:3])}: {g['untouchable'][0]}")
        for item in c["compensation"]["inexact_consumers"]:
            lines.append(f"compensation inexact: {item}")
    for p in (p for p in report.passes if p["name"] == "fold-bn"):
        lines.append(f"fold-bn: folded {len(p.get('folded', []))} BatchNormalization, "
                     f"kept {len(p.get('kept', []))}")
        lines += [f"kept BatchNormalization {bn}: {why}" for bn, why in p.get("kept", [])]
    return lines


def _step_lines(steps: list[dict]) -> list[str]:
    """One line per recipe step: its plan and its own oracle (against the graph before the step)."""
    lines = []
    for s in steps:
        o = s.get("oracle")
        if not o:
            check = ""
        elif "skipped" in o:
            check = f"; oracle skipped: {o['skipped']}"
        elif "cosine" in o:
            check = f"; oracle vs before: max |diff| {o['max_abs_diff']:.3g}, cosine {o['cosine']:.4f}"
        elif "max_abs_diff" in o:
            check = f"; oracle vs before, masked: max |diff| {o['max_abs_diff']:.3g}"
        else:  # the correct stage: per-channel output means against the dense graph's
            gaps = ", ".join(f"{k.replace('_', ' ')} {v:.3g}" for k, v in o.items() if isinstance(v, float))
            check = f"; oracle vs dense means: {gaps}" if gaps else ""
        said = s.get("skipped") or s.get("nothing")  # a step that did nothing says why in its line
        lines.append(f"step {s['name']}: {said if said and not s.get('modified') else s['plan']}{check}")
        lines += [f"  {k.replace('_', ' ')}: {v}" for k, v in (s.get("defaults") or {}).items()]
    return lines


def _verify_lines(v: dict | None) -> list[str]:
    """The oracle and onnxruntime comparison lines; what verification could not tell."""
    lines: list[str] = []
    if not v:
        return lines
    if "masked" in v:
        lines.append(f"oracle (pruned vs dense with the same filters zeroed): "
                     f"max |diff| {v['masked']['max_abs_diff']:.3g}")
    if "max_abs_diff" in v:
        worst = min((o["cosine"] for o in v["outputs"] if not o.get("degenerate")), default=None)
        cosine = "no informative output" if worst is None else f"min output cosine {worst:.4f}"
        lines.append(f"verify (onnxruntime, dense vs pruned, on {v.get('source', 'random inputs')}): "
                     f"max |diff| {v['max_abs_diff']:.3g}, mean |diff| {v['mean_abs_diff']:.3g}, "
                     f"{cosine}")
        if (tok := v.get("next_token")) is not None:
            lines.append(f"verify next token ({tok['output']}, greedy argmax): last position "
                         f"{tok['last_position']:.1%} of {tok['sequences']} sequences, all positions "
                         f"{tok['all_positions']:.1%} of {tok['positions']}")
        if v.get("informative") is False:
            lines.append(f"verify UNINFORMATIVE: {v['reason']}")
        for name, why in (v.get("uninformative_outputs") or {}).items():
            lines.append(f"verify: dense output {name} {why} on these inputs; not counted in the cosine")
        for name, dims in (v.get("assumed_dims") or {}).items():
            lines.append(f"verify ASSUMED: input {name} dims {', '.join(map(str, dims))} set to 1 "
                         f"(symbolic; give --shape {name}=...)")
    else:
        lines.append(f"verify: skipped: {v.get('skipped')}")
    return lines


def _count(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]
