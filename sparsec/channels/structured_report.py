"""Report sections of a channel-pruning compile, and the masked-model oracle check."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import onnx

from sparsec.core.graph_index import GraphIndex
from sparsec.core.layers import Layer, LayerAnalysis, find_layers
from sparsec.core.macs import all_layer_macs
from sparsec.core.names import node_ids
from sparsec.core.pipeline import PassContext
from sparsec.core.report import LayerEntry, Report, totals
from sparsec.core.tensors import TensorStore
from sparsec.runtime.observe import layer_shapes
from sparsec.runtime.session import random_feeds, run_checked, session_on_store
from sparsec.runtime.verify import compare_outputs


def structured_section(report: Report, ctx: PassContext, plan, old: LayerAnalysis,
                       old_macs: dict[str, int | None], fixed: dict) -> None:
    """Replace the weight-pruning layer table by before/after shapes, params and MACs."""
    new = find_layers(ctx.model)
    new_macs = all_layer_macs(ctx.model, new.layers, layer_shapes(ctx.model, ctx.store, new.layers, fixed))
    index = GraphIndex(ctx.model.graph)
    entries, weight_bytes = [], {}
    for layer in new.layers:
        was = _before(old, layer)
        params_before = was.params if was else layer.params
        changed = layer.params != params_before
        whole = None if changed else _kept_whole(plan, was.name if was else layer.name)
        weight_bytes[layer.weight] = layer.params * ctx.store.read(index.constant(layer.source)).itemsize
        recovery = plan.recovery.get(was.name if was else layer.name) if plan else None
        entries.append(LayerEntry(
            name=layer.name, op=layer.op, weight=layer.weight, shape=list(layer.shape),
            reduction_axis=layer.reduction_axis, pattern="channels" if changed else "dense",
            sparsity=1.0 - layer.params / params_before if params_before else 0.0,
            params=params_before, nonzeros=layer.params,
            macs_dense=old_macs.get(was.name if was else layer.name), macs_nonzero=new_macs.get(layer.name),
            skipped_reason=whole,
            method="structured" if changed else None,
            rel_error=recovery["error_after"] if recovery else None,
            rel_error_basis=recovery["basis"] if recovery else None,
            note=(f"least-squares recovery: error {recovery['error_before']:.4f} -> "
                  f"{recovery['error_after']:.4f}") if recovery else None,
        ))
    report.layers = entries
    # the weight-pruning selection does not apply here: skipped[] is exactly the layers left whole
    report.skipped = [{"name": e.name, "op": e.op, "weight": e.weight, "reason": e.skipped_reason}
                      for e in entries if e.skipped_reason is not None]
    report.totals = totals(entries, weight_bytes)
    report.totals["weights_after"] = sum(e.nonzeros for e in entries)
    report.channels = _channels(plan) if plan else None


def _before(old: LayerAnalysis, layer: Layer) -> Layer | None:
    """The same layer before the compile, by identity: display names (`Conv_3`) of unnamed nodes
    shift when folding removes nodes, the weight a layer reads keeps its name."""
    same_weight = [la for la in old.layers if la.weight == layer.weight and la.op == layer.op]
    if len(same_weight) == 1:
        return same_weight[0]
    named = [la for la in old.layers if la.name == layer.name and la.op == layer.op]
    return named[0] if len(named) == 1 and not _unnamed_display(layer) else None


def _unnamed_display(layer: Layer) -> bool:
    return layer.name == f"{layer.op}_{layer.node_index}"


def _kept_whole(plan, name: str) -> str:
    """Why no channel of layer `name` (its name in the dense model) went: the reasons that
    blocked its channels, or its ranking."""
    if plan is None:
        return "no channel of this layer was removed"
    analysis = plan.analysis
    source = next((s for s in analysis.sources if s.name == name), None)
    if source is None:
        return ("not a channel source (shared, computed or grouped weight) and none of its input "
                "channels was removed")
    classes = {int(analysis.root[e]) for e in range(source.first, source.first + source.channels)}
    if all(c in analysis.untouchable for c in classes):
        return "channels kept whole: " + "; ".join(sorted({analysis.untouchable[c] for c in classes}))
    return "none of its removable channels ranked among the lowest"


def _channels(plan) -> dict:
    analysis, choice = plan.analysis, plan.choice
    sources = [{"name": s.name, "op": s.op, "channels": s.channels,
                "kept": choice.kept_per_source.get(s.name, s.channels),
                "note": plan.score_notes.get(s.name)}
               for s in analysis.sources if s.op != "fixed"]
    removed_by_class = {int(analysis.root[e]) for e in choice.removed}
    return {
        "removed": len(removed_by_class),
        "removable": len([c for c in analysis.classes() if c not in analysis.untouchable]),
        "sources": sources,
        "groups": analysis.groups(),
        "compensation": {"constants_folded": len(plan.compensation.constants),
                         "inexact_consumers": _inexact(plan),
                         "not_constant": plan.compensation.varying},
        "recovery": [{"consumer": n, "error_before": r["error_before"], "error_after": r["error_after"],
                      "basis": r["basis"]} for n, r in plan.recovery.items()],
    }


def _inexact(plan) -> list[str]:
    """Consumers where the removed channels' value is not one constant (padding upstream): their
    compensation is exact only where the value is the constant. Padded k×k Convs and
    ConvTranspose get an exact border correction (sparsec/channels/border_correction.py)."""
    out = []
    for name in node_ids(plan.compensation.masked.graph):  # every consumer whose removed input varies
        if name in plan.compensation.varying:
            out.append(f"{name}: its input is not constant everywhere "
                       f"(padding upstream; largest deviation {plan.compensation.varying[name]:.3g})")
    return out


@dataclass(frozen=True)
class MaskedRun:
    """The masked twin's outputs on the oracle's random inputs."""

    feeds: dict
    names: list[str]
    outputs: list


def run_masked(masked: onnx.ModelProto, store: TensorStore, fixed: dict, seed: int,
               ranges: dict[str, tuple[float, float]] | None = None) -> MaskedRun:
    """Run the masked twin (the dense graph with the removed parts zeroed) before the step's passes:
    its session, fed from the data file by reference, never coexists with the pruned weights."""
    session = session_on_store(masked, store)
    feeds = random_feeds(session, fixed, seed, ranges=ranges)
    names = [o.name for o in session.get_outputs()]
    return MaskedRun(feeds, names, run_checked(session, names, feeds, "the masked model"))


def verify_masked(before: MaskedRun, model: onnx.ModelProto, store: TensorStore, recovered: bool = False
                  ) -> dict:
    """The oracle: the smaller graph (run in place on its store) against the dense model with the same
    filters zeroed (`run_masked`)."""
    pruned = run_checked(session_on_store(model, store), before.names, before.feeds, "the pruned model")
    diffs = compare_outputs(before.outputs, pruned, before.names)
    return {"max_abs_diff": max((d.max_abs_diff for d in diffs), default=0.0),
            "outputs": [asdict(d) for d in diffs],
            "recovered": recovered,
            "note": "with --recover the pruned model is refit toward the dense model, not the masked one"
            if recovered else "exact up to float error except at consumers listed in "
            "channels.compensation.inexact_consumers"}
