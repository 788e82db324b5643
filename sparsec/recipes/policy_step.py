"""--min-similarity inside the weights stage: measure (sensitivity), choose (quality_policy), prune the
chosen weights with the stage's own passes, then check the floor on the held-back samples with the pruned
graph itself; a miss restores the dense weights and prunes again without the least efficient weight."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from sparsec.core.graph import load_model
from sparsec.core.layers import Skipped
from sparsec.core.options import WeightsOptions
from sparsec.core.pipeline import PassContext
from sparsec.core.shapes import fixed_input_shapes
from sparsec.errors import SparsecError
from sparsec.recipes.compile_run import Analysed, CompileRun
from sparsec.runtime.calibrate import collect_stats
from sparsec.weights.quality_policy import QualityPlan, back_off, choose
from sparsec.weights.sensitivity import (
    WeightSwap,
    graph_outputs,
    measurable,
    measure,
    pruned_value,
    run_outputs,
    score_fn,
    similarity,
    split_calibration,
)

POLICY_KIND = "--min-similarity"


def sensitivity_plan(run: CompileRun, opts: WeightsOptions, found: Analysed, settings, floor: float):
    """Measure every target's sensitivity on the held-back samples and choose (analysis only).
    Returns the plan, the fit settings (the first three quarters) and what the final check needs."""
    model, store = run.ctx.model, run.ctx.store
    fit_data, held = split_calibration(settings.data, settings.batch)
    fit = replace(settings, data=fit_data)
    targets, unmeasured = measurable(found.targets, store, model)
    stats = None
    if opts.method != "magnitude" and targets:
        stats = collect_stats(model, store, [la for t in targets for la in t.layers], fit)
    score = score_fn(str(opts.method), stats)
    swap = WeightSwap(model, store, targets)
    pruned = {t.weight: pruned_value(t, swap.dense[t.weight], opts.nm, opts.sparsity, str(opts.group), score)
              for t in targets}
    dense_out, table = measure(swap, held, targets, pruned, found.macs)

    def combined(chosen: tuple[str, ...]) -> float:
        outs = run_outputs(swap.session, held, swap.feeds({w: pruned[w] for w in chosen}))
        return similarity(dense_out, outs, held.counts)

    plan = choose(table, floor, combined, fit_data.num_samples, held.samples, unmeasured)
    return plan, fit, (swap, held, dense_out)


def policy_weights(run: CompileRun, opts: WeightsOptions, found: Analysed, settings,
                   prune: Callable[[list, object], tuple[list, dict | None]]
                   ) -> tuple[list, dict | None, dict]:
    """Prune what the policy chose (`prune(targets, settings)` runs the stage's passes with its
    oracle); returns the pass results, the oracle and report.json's `policy` entry."""
    floor = float(opts.min_similarity)
    plan, fit, (swap, held, dense_out) = sensitivity_plan(run, opts, found, settings, floor)
    store, results, oracle, final = run.ctx.store, [], None, 1.0
    while plan.chosen:
        chosen = [t for t in found.targets if t.weight in plan.chosen]
        first = len(run.results)
        results, oracle = prune(chosen, fit)
        final = similarity(dense_out, graph_outputs(run.ctx.model, store, held), held.counts)
        if final >= floor:
            break
        for weight in plan.chosen:  # undo: the dense values, then prune one weight fewer
            store.write(swap.tensors[weight], swap.dense[weight])
        del run.results[first:]
        plan, results, oracle, final = back_off(plan, final), [], None, 1.0
    _record(run, found, plan)
    return results, oracle, {**plan.as_dict(), "final_similarity": final,
                             "held_back": f"the last {held.samples} of {plan.fit_samples + held.samples} "
                                          "calibration samples (masks fitted on the others)"}


def _record(run: CompileRun, found: Analysed, plan: QualityPlan) -> None:
    """The weights the policy left dense become skipped layers with its reason; the targets shrink."""
    chosen = [t for t in found.targets if t.weight in plan.chosen]
    skipped = list(found.skipped) + [Skipped(la.name, la.op, t.weight, plan.dense[t.weight], POLICY_KIND)
                                     for t in found.targets if t.weight in plan.dense for la in t.layers]
    run.weights = Analysed(found.analysis, chosen, skipped, found.macs)
    run.targets = chosen
    if not chosen:
        first = next(iter(plan.dense.items()), ("", "no layer measured"))
        run.nothing = (f"nothing pruned: --min-similarity {plan.floor:g} leaves all {len(found.targets)} "
                       f"prunable weights dense (first: {first[0]}: {first[1]})")


def sensitivity_report(model_path, options) -> dict:
    """`sparsec inspect --sensitivity`: the table (and, with --min-similarity, the choice) on the model as
    given, without pruning; the weights stage's selection decides which layers are measured."""
    if not options.calibrated:
        raise SparsecError("--sensitivity measures on calibration data",
                           "give --calib FILE.npz|DIR or --calib-random N")
    loaded = load_model(model_path)
    ctx = PassContext(loaded.model, loaded.store)
    run = CompileRun(loaded, options, ctx, fixed_input_shapes(ctx.model, options.shapes))
    found = run.analyse()
    opts = options.of("weights")
    floor = options.min_similarity if options.min_similarity is not None else 0.0
    plan, _, _ = sensitivity_plan(run, opts, found, run.calibration(), floor) if found.targets else (
        QualityPlan(floor, 0, 0, (), ()), None, None)
    pattern = str(opts.nm) if opts.nm is not None else f"unstructured {opts.sparsity}"
    entry = {**plan.as_dict(), "pattern": pattern, "method": str(opts.method),
             "not_measured": [{"name": s.name, "weight": s.weight, "reason": s.reason}
                              for s in found.skipped]}
    if options.min_similarity is None:
        for key in ("min_similarity", "combined_similarity", "checks", "kept_dense"):
            entry.pop(key)
        for row in entry["table"]:
            row.pop("pruned"), row.pop("reason")
    return entry
