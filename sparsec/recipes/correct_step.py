"""The correct stage: bias correction and BatchNorm re-estimation after pruning (sparsec.weights.
correct_pass), planned on the graph the weights stage left and on the graph it started from."""

from __future__ import annotations

from dataclasses import dataclass, replace

from sparsec.core.names import node_ids
from sparsec.core.options import CorrectOptions
from sparsec.recipes.compile_run import CompileRun
from sparsec.recipes.step_plans import StepPlan
from sparsec.weights.correct_pass import CorrectPass, correction_points
from sparsec.weights.sensitivity import split_calibration

# a default correction costs one onnxruntime pass per depth level: past this many (a 66-level detector
# took 113 s against Wanda's 5 s) it is left out, said, and --bias-correct forces it
DEFAULT_MAX_LEVELS = 32


@dataclass(frozen=True)
class CorrectPlan(StepPlan):
    layers: int  # pruned layers whose output mean is matched to the dense graph's
    affine: int  # of those, producers a BatchNorm was folded into (mean and deviation)
    batchnorms: bool  # unfused BatchNorms re-estimated
    how: str = ""  # whether bias correction was a default (kept only where held-back samples agree)

    def summary(self) -> str:
        parts = [f"bias-correct {self.layers} pruned layers{self.how}"] if self.layers else []
        if self.affine:
            parts.append(f"match mean and deviation of {self.affine} of them (BatchNorm folded)")
        parts += ["re-estimate every unfused BatchNorm"] if self.batchnorms else []
        return "; ".join(parts) or "nothing to correct"


def correct_step(run: CompileRun, opts: CorrectOptions) -> dict:
    """Correct the pruned graph on the calibration data; its oracle: the corrected layers' output means
    (and re-estimated BatchNorm statistics) measured again, against the dense graph's (and the written
    statistics)."""
    graph = run.ctx.model.graph
    pruned = {n for r in run.results for w in r.details.get("weights", []) for n in w.layers
              if w.nonzeros != w.nonzeros_before}
    folded = {p for r in run.results if r.name == "fold-bn" for _, p in r.details.get("folded", [])}
    outputs, affine = {}, set()
    for node_id, node in zip(node_ids(graph), graph.node, strict=True):
        if node_id in pruned and node.output:
            outputs[node.output[0]] = node_id
            if opts.bn_reestimate and (node.name or node.output[0]) in folded:
                affine.add(node_id)
    bias = run.options.bias_corrects  # --bias-correct as asked, or its default (None: resolved there)
    if run.dense is None and outputs and bias and opts.bias_correct is None and not opts.bn_reestimate:
        return {"name": "correct", "plan": str(CorrectPlan(0, 0, False)), "passes": [], "modified": False,
                "oracle": None, "nothing": None, "layers": [], "batchnorms": [], "levels": 0, "samples": 0,
                "skipped": "default bias correction left out: the model keeps its weights in external data "
                           "and the correction needs an in-memory dense copy (--bias-correct forces it)"}
    if not bias:
        outputs = {t: n for t, n in outputs.items() if n in affine}
    if not outputs and not opts.bn_reestimate:  # no pass: the weights stage says why nothing was pruned
        return {"name": "correct", "plan": str(CorrectPlan(0, 0, False)), "passes": [], "modified": False,
                "oracle": None, "nothing": None, "skipped": "no layer was pruned", "layers": [],
                "batchnorms": [], "levels": 0, "samples": 0}
    default = bias and opts.bias_correct is None
    depth = len(correction_points(graph, outputs, affine, False)[0]) if default else 0
    if default and not opts.bn_reestimate and depth > DEFAULT_MAX_LEVELS:
        run.dense = None
        return {"name": "correct", "plan": str(CorrectPlan(0, 0, False)), "passes": [], "modified": False,
                "oracle": None, "nothing": None, "layers": [], "batchnorms": [], "levels": 0, "samples": 0,
                "skipped": f"default bias correction left out: the pruned layers lie at {depth} depths, "
                           f"one onnxruntime pass each (more than {DEFAULT_MAX_LEVELS}; --bias-correct "
                           "forces it)"}
    plan = CorrectPlan(len(outputs), len(affine), opts.bn_reestimate,
                       "; bias correction on (default with calibration data, kept if held-back outputs agree "
                       "better)" if default and not opts.bn_reestimate else
                       "; bias correction on (default with calibration data)" if default else "")
    settings, held = run.calibration(), None
    if default and not opts.bn_reestimate and settings.data.num_samples >= 2:  # a default must not hurt
        fit, held = split_calibration(settings.data, settings.batch)
        settings = replace(settings, data=fit)
    results = run.run_passes([CorrectPass(run.dense, outputs, settings, opts.bn_reestimate,
                                          affine, samples=opts.correct_samples, held=held)])
    details = results[0].details
    run.dense = None  # the dense copy is no longer needed
    nothing = None
    guard = details.get("guard")
    if guard is not None and not guard["kept"]:
        nothing = (f"default bias correction left out: on {guard['held_back_samples']} held-back "
                   f"calibration samples it lowered the output cosine to the dense model from "
                   f"{guard['cosine_without']:.4f} to {guard['cosine_with']:.4f} (--bias-correct forces it)")
    elif not results[0].modified:
        kept = details["batchnorms_kept"]
        nothing = ("nothing corrected: no layer was pruned" + (" and the model has no re-estimable "
                   "BatchNorm" if opts.bn_reestimate else "")
                   + (f" ({len(kept)} BatchNorm kept, first: {kept[0][0]}: {kept[0][1]})" if kept else ""))
    oracle = dict(details["oracle"], against="the dense graph's per-channel output means "
                  "(BatchNorms: their written means), on the calibration data") if details["oracle"] else None
    return {"name": "correct", "plan": str(plan), "passes": [r.name for r in results],
            "modified": results[0].modified, "oracle": oracle, "nothing": nothing,
            "layers": details["layers"], "batchnorms": details["batchnorms"],
            "levels": details["levels"], "samples": details["samples"],  # one pass per level, on samples
            **({"guard": guard} if guard is not None else {})}

