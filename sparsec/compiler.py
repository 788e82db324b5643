"""`sparsec compile`: load, run the recipe's stages in order (sparsec.recipes.ORDER), report, save,
verify, write."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict
from pathlib import Path

import onnx

from sparsec.channels.structured_report import structured_section
from sparsec.core.graph import TWO_GB, check_written, load_model, save_model
from sparsec.core.graph_index import GraphIndex
from sparsec.core.layers import LayerAnalysis
from sparsec.core.options import CompileOptions
from sparsec.core.output import check_output_dir, staged_dir
from sparsec.core.pipeline import PassContext, PassResult
from sparsec.core.report import LayerEntry, Report, totals
from sparsec.core.shapes import assumed_dims, fixed_input_shapes
from sparsec.encoding.blobs import to_sparse_initializers, write_outputs
from sparsec.errors import SparsecError
from sparsec.recipes import CompileRun, recipe_of, stages_for
from sparsec.recipes.recipe_file import write_recipe
from sparsec.recipes.step_oracle import FOLD_RTOL
from sparsec.recipes.steps import encode_step
from sparsec.runtime.calib_data import check_ranges, input_specs
from sparsec.runtime.calibrate import CalibrationSettings
from sparsec.runtime.session import make_session, make_session_from_proto, session_cache_fill
from sparsec.runtime.tensorrt import trt_commands
from sparsec.runtime.verify import (
    calibration_inputs,
    compare_outputs,
    random_inputs,
    run_batches,
    verify_models,
)
from sparsec.transformer.transformer_compile import transformer_section
from sparsec.version import __version__
from sparsec.weights.masks import count_nonzero
from sparsec.weights.quant import zero_point

log = logging.getLogger(__name__)


def _nothing_done(run: CompileRun, report: Report, results: list[PassResult]) -> str | None:
    """One line when the compile changed nothing, with the first reason (it still writes the verified,
    unchanged model: exit 0 is not a silent no-op); None as soon as any stage changed the model."""
    options = run.options
    lines = [step.get("nothing") for step in run.steps]
    if options.transformer and report.transformer:
        blocks = report.transformer.get("blocks") or []
        changed = any(b.get(f"{k}_after") != b.get(f"{k}_before") for b in blocks
                      for k in ("heads", "ffn", "tokens")) or \
            any(step.get("modified") for step in run.steps)  # FFN neurons outside a matched block
        if changed:
            return None
        why = report.transformer.get("unexplained") or ["no attention block or FFN found"] \
            if not blocks else ["every head, neuron and token was kept"]
        lines.insert(0, f"nothing removed: {why[0]}")
    elif options.channels is not None and report.channels is not None:
        if report.channels.get("removed"):
            return None
        reasons = [r for g in report.channels.get("groups", []) for r in g.get("untouchable", [])]
        lines.insert(0, "nothing removed: every channel group is kept whole"
                     + (f" ({len(reasons)} reasons, first: {reasons[0]})" if reasons else ""))
    if options.prunes_weights:
        left = run.ctx.facts.get("left_dense", {})
        if run.nothing is None and run.targets and all(t.weight in left for t in run.targets):
            run.nothing = ("nothing pruned: every prunable weight was left dense "
                           f"({next(iter(left.values()))})")
        if run.nothing is None:
            return None
        lines.append(run.nothing)
    elif options.folds_bn:
        fold = next((r for r in results if r.name == "fold-bn"), None)
        if fold is not None and fold.details.get("folded"):
            return None
        kept = fold.details.get("kept", []) if fold else []
        first = f"{len(kept)} BatchNormalization kept, first: {kept[0][0]}: {kept[0][1]}" if kept else ""
        lines.append("nothing folded: " + (first or "the model has no BatchNormalization"))
    return next((line for line in lines if line), None)


def default_output(model_path: Path) -> Path:
    return model_path.with_name(f"{model_path.stem}_sparse")


def compile_model(model_path: str | Path, options: CompileOptions, output: str | Path | None = None
                  ) -> Report:
    """Prune `model_path` as `options` say and write OUTDIR/model.onnx, report.json and recipe.yaml:
    load, run each stage of the recipe in ORDER on the graph the previous one left, report, write."""
    model_path = Path(model_path)
    out = Path(output) if output is not None else default_output(model_path)
    check_output_dir(out, options.force, (model_path,))
    start = time.perf_counter()
    loaded = load_model(model_path)
    load_s = time.perf_counter() - start
    ctx = PassContext(loaded.model, loaded.store)
    run = CompileRun(loaded, options, ctx, fixed_input_shapes(ctx.model, options.shapes))
    run.timings = {"load_s": load_s, **run.timings}
    if options.calib_range:  # ranges of every random input sparsec draws (verify, oracle, probes)
        check_ranges(input_specs(ctx.model), options.calib_range)
    for stage in stages_for(options):
        if stage.name == "encode":
            continue  # reads the report's pruned weights: after the report
        run.steps.append(stage.apply(run))
    report = _build_report(run, out)
    if stage_runs(options, "encode"):
        run.steps.append(encode_step(run, options.of("encode")))
        report.encoding = run.encoding
    report.steps = run.steps
    report.recipe = recipe_of(options)
    _write(run, report, model_path, out)
    return report


def stage_runs(options: CompileOptions, name: str) -> bool:
    return any(s.name == name for s in stages_for(options))


def _build_report(run: CompileRun, out: Path) -> Report:
    """The report of what the stages did: the weight table of the graph the weights stage pruned (or
    the structural before/after table), the structural and transformer sections."""
    ctx, options = run.ctx, run.options
    found = run.weights or (run.structural[2] if run.structural else run.analyse())
    # the report reads final weights before saving moves them into the new data file
    report = _report(ctx, run.loaded.path, out, options, found.analysis, found.skipped, found.macs,
                     run.results)
    if run.structural is not None:
        name, plan, before, model = run.structural
        table = copy.copy(report) if run.weights is not None else report
        structured_section(table, ctx, plan.ffn if name == "transformer" else plan, before.analysis,
                           before.macs, run.fixed)
        report.channels = table.channels
        if table is not report:  # the weights table stays; the structural one goes to its step
            next(s for s in run.steps if s["name"] == name)["totals"] = table.totals
        if name == "transformer":
            report.transformer = transformer_section(plan, model, ctx.store, run.fixed)
    report.nothing_pruned = _nothing_done(run, report, run.results)
    return report


def _write(run: CompileRun, report: Report, model_path: Path, out: Path) -> None:
    """Save into a staging directory, verify there, and only then move it into place."""
    ctx, options, loaded, timings = run.ctx, run.options, run.loaded, run.timings
    with staged_dir(out, options.force, (model_path, *loaded.data_files)) as tmp:
        if run.blobs:
            write_outputs(ctx.model, ctx.store, run.blobs, tmp, loaded.external)
        if options.sparse_initializers:
            names = {w.weight for r in run.results for w in r.details.get("weights", [])}
            report.tensorrt["note"] = ("model.onnx holds sparse initializers: "
                                       "TensorRT's parser needs dense ones")
            report.tensorrt["sparse_initializers"] = to_sparse_initializers(ctx.model, ctx.store, names)
        start = time.perf_counter()
        save_model(ctx.model, tmp / "model.onnx", ctx.store, external=loaded.external)
        timings["save_s"] = time.perf_counter() - start
        # the full check's shape inference does not know sparse initializers feeding ops
        check_written(tmp / "model.onnx", full=not options.sparse_initializers)
        if options.verify:
            start = time.perf_counter()
            report.verify = _verify(model_path, tmp / "model.onnx", ctx, run.fixed, options, run.settings)
            _check_exact(report.verify, options)
            if run.masked_oracle is not None and "max_abs_diff" in report.verify:
                report.verify["masked"] = run.masked_oracle
            timings["verify_s"] = timings.get("verify_s", 0.0) + time.perf_counter() - start
        report.timings = {k: timings[k] for k in ("load_s", "analyze_s", "prune_s", "save_s", "verify_s")
                          if k in timings}
        (tmp / "report.json").write_text(report.to_json())
        write_recipe(report.recipe, tmp / "recipe.yaml")


def _verify(dense: Path, pruned: Path, ctx: PassContext, fixed: dict, options: CompileOptions,
            settings: CalibrationSettings | None = None) -> dict:
    """Dense vs final model in onnxruntime on the first calibration samples when there are some, else
    on random inputs (--calib-range, --shape; guessed dims warned about); after a precision change
    also the conversion drift on the same inputs."""
    try:
        final = make_session(pruned)
    except SparsecError as exc:
        if options.precision == "fp32":
            raise
        if "NOT_IMPLEMENTED" not in str(exc):  # a missing kernel is the runtime's; a type error ours
            raise SparsecError(f"{options.precision} conversion produced a model onnxruntime rejects: {exc}",
                               "build with --precision fp32 and report this model") from None
        return {"skipped": f"{options.precision} model not runnable on onnxruntime CPU: {exc}"}
    if settings is not None:
        inputs = calibration_inputs(settings.data, options.batch)
    else:
        fill = session_cache_fill(final)  # a decoder's cache, mask and positions follow input_ids
        guessed = {k: v for k, v in assumed_dims(ctx.model, options.shapes).items()
                   if fill is None or k not in fill.names}
        for name, dims in guessed.items():
            log.warning("verify: input %s has symbolic dims %s that no --shape fixes; they are set to 1, "
                        "which may not exercise the model (give --shape %s=...)",
                        name, ", ".join(map(str, dims)), name)
        inputs = random_inputs(final, fixed, options.seed, options.calib_range, guessed)
    names = [o.name for o in final.get_outputs()]
    del final  # verify_models opens one model at a time: a large model's weights are not held twice
    result = verify_models(dense, pruned, fixed, options.seed, inputs).as_dict()
    if not result["informative"]:
        log.warning("verify: %s", result["reason"])
    before = ctx.facts.get("model_before_precision")
    if before is not None and before.ByteSize() < TWO_GB:
        ref = run_batches(make_session_from_proto(before), names, inputs.batches)
        diffs = compare_outputs(ref, run_batches(make_session(pruned), names, inputs.batches), names)
        result["precision_drift"] = {
            "max_abs_diff": max(d.max_abs_diff for d in diffs),
            "outputs": [asdict(d) for d in diffs],
        }
    elif (why := ctx.facts.get("precision_drift_skipped")) is not None:
        result["precision_drift"] = {"skipped": why}
    return result


def _check_exact(verify: dict, options: CompileOptions) -> None:
    """A compile that only folds BatchNorm must reproduce the dense outputs; never write one that does not."""
    if options.prunes_weights or options.structured or options.precision != "fp32" or "outputs" not in verify:
        return
    for out in verify["outputs"]:
        if out["max_abs_diff"] > FOLD_RTOL * max(out["max_abs_dense"], 1.0):
            raise SparsecError(f"BatchNorm folding changed output {out['name']} by {out['max_abs_diff']:.3g}",
                               "nothing was written; compile without --fold-bn and report this model")


def _itemsize(tensor: onnx.TensorProto) -> int:
    return onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _pass_entry(result: PassResult) -> dict:
    entry = {"name": result.name, "modified": result.modified, "seconds": result.seconds}
    for key in ("samples", "level", "layer_sparsity", "outlier_ratio", "folded", "kept"):
        if result.details.get(key) is not None:
            entry[key] = result.details[key]
    return entry


def _report(ctx: PassContext, model_path: Path, out: Path, options: CompileOptions,
            analysis: LayerAnalysis, skipped, macs_by_layer: dict[str, int | None],
            results: list[PassResult]) -> Report:
    """The report before verification: options, the layer table and its totals, what was skipped and
    why, the passes and the TensorRT commands."""
    left_dense = [(la, ctx.facts["left_dense"][la.weight]) for la in analysis.layers
                  if la.weight in ctx.facts.get("left_dense", {})]
    reasons = {(s.name, s.weight): s.reason for s in skipped}
    reasons |= {(la.name, la.weight): why for la, why in left_dense}
    entries, weight_bytes = _layer_entries(ctx, options, analysis, reasons, macs_by_layer, results)
    trt = {"commands": trt_commands(str(out / "model.onnx"), options.precision)}
    return Report(
        sparsec_version=__version__,
        input=str(model_path),
        output=str(out),
        options=options.as_dict(),
        layers=entries,
        totals=totals(entries, weight_bytes),
        verify=None,
        skipped=[{"name": s.name, "op": s.op, "weight": s.weight, "reason": s.reason} for s in skipped]
        + [{"name": la.name, "op": la.op, "weight": la.weight, "reason": why} for la, why in left_dense],
        passes=[_pass_entry(r) for r in results],
        tensorrt=trt,
    )


def _layer_entries(ctx: PassContext, options: CompileOptions, analysis: LayerAnalysis,
                   reasons: dict[tuple[str, str], str], macs_by_layer: dict[str, int | None],
                   results: list[PassResult]) -> tuple[list[LayerEntry], dict[str, int]]:
    """One entry per layer of the final model, and the bytes of each weight (counted once if shared)."""
    index = GraphIndex(ctx.model.graph)
    pruned = {n: w for r in results for w in r.details.get("weights", []) for n in w.layers}
    entries: list[LayerEntry] = []
    weight_bytes: dict[str, int] = {}
    nonzeros: dict[str, int] = {}
    for layer in analysis.layers:
        done = pruned.get(layer.name)
        if layer.weight not in nonzeros:
            if done is not None and options.precision == "fp32":  # the pass counted already
                nonzeros[layer.weight] = done.nonzeros
                weight_bytes[layer.weight] = done.params * _itemsize(index.constant(layer.source))
            else:
                values = ctx.store.read(index.constant(layer.source))
                zero = zero_point(index, ctx.store, layer.source)  # a QDQ weight's zero point
                nonzeros[layer.weight] = count_nonzero(values, zero)
                weight_bytes[layer.weight] = values.nbytes
        reason = None if done is not None else reasons.get((layer.name, layer.weight))
        entries.append(_layer_entry(layer, done, nonzeros[layer.weight], macs_by_layer[layer.name], reason))
    return entries, weight_bytes


def _layer_entry(layer, done, nz: int, macs: int | None, reason: str | None) -> LayerEntry:
    """A layer's row: its shape and cost, and what the pass that pruned it (``done``, or None) did."""
    return LayerEntry(
        name=layer.name, op=layer.op, weight=layer.weight, shape=list(layer.shape),
        reduction_axis=layer.reduction_axis, pattern=done.pattern if done else "dense",
        sparsity=1.0 - nz / layer.params, params=layer.params, nonzeros=nz, macs_dense=macs,
        macs_nonzero=None if macs is None else int(round(macs * nz / layer.params)),
        skipped_reason=reason,
        method=done.method if done else None,
        calib_samples=done.samples if done else None,
        rel_error=done.rel_error if done else None,
        rel_error_basis=done.rel_error_basis if done else None,
        note=done.note if done else None,
    )
