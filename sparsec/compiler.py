"""`sparsec compile`: load, analyse, prune, convert, save, verify, report."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import onnx

from sparsec.channels.fold_bn import FoldBatchNormPass
from sparsec.channels.prune_channels import PruneChannelsPass
from sparsec.channels.structured import plan_structured
from sparsec.channels.structured_report import structured_section, verify_masked
from sparsec.core.graph import TWO_GB, load_model, save_model
from sparsec.core.graph_index import GraphIndex
from sparsec.core.layers import LayerAnalysis, find_layers
from sparsec.core.macs import all_layer_macs
from sparsec.core.options import CompileOptions
from sparsec.core.output import CONTAINER, SKELETON, check_output_dir, staged_dir
from sparsec.core.pipeline import PassContext, PassResult, Pipeline
from sparsec.core.report import LayerEntry, Report, totals
from sparsec.core.shapes import assumed_dims, fixed_input_shapes
from sparsec.encoding.blobs import encode_weights, to_sparse_initializers, write_outputs
from sparsec.errors import SparsecError
from sparsec.runtime.calib_data import check_ranges, input_specs, open_calibration
from sparsec.runtime.calibrate import CalibrationSettings
from sparsec.runtime.observe import layer_shapes
from sparsec.runtime.precision_pass import PrecisionPass
from sparsec.runtime.session import make_session, make_session_from_proto, resolve_providers
from sparsec.runtime.tensorrt import trt_commands
from sparsec.runtime.verify import (
    calibration_inputs,
    compare_outputs,
    random_inputs,
    run_batches,
    verify_models,
)
from sparsec.transformer.transformer_compile import plan_transformer, transformer_section
from sparsec.version import __version__
from sparsec.weights.calibrate_pass import CalibratePass
from sparsec.weights.check_pattern import CheckPatternPass
from sparsec.weights.masks import count_nonzero
from sparsec.weights.owl import OwlPass
from sparsec.weights.prune_weights import PruneWeightsPass
from sparsec.weights.quant import zero_point
from sparsec.weights.selection import PruneTarget, depth_levels, nothing_pruned, select_targets
from sparsec.weights.sparsegpt_pass import SparseGPTPass

log = logging.getLogger(__name__)


def build_pipeline(options: CompileOptions, targets: list[PruneTarget], model: onnx.ModelProto,
                   settings: CalibrationSettings | None = None, plan=None) -> Pipeline:
    """The one place that knows the order of the passes."""
    if options.transformer:
        passes = plan.passes()
        passes += [PrecisionPass(options.precision)] if options.precision != "fp32" else []
        return Pipeline(passes)
    if plan is not None:
        passes: list = [PruneChannelsPass(plan.analysis, plan.choice.removed,
                                          {} if options.recover else plan.compensation.constants,
                                          plan.recovery)]
        passes += [FoldBatchNormPass()] if options.folds_bn else []
        passes += [PrecisionPass(options.precision)] if options.precision != "fp32" else []
        return Pipeline(passes)
    passes = []
    gram = options.method == "sparsegpt"
    if options.owl and targets:
        passes += [CalibratePass(targets, settings), OwlPass(targets, options.sparsity or 0.0,
                                                             options.owl_lambda, options.owl_m)]
    levels = (depth_levels(model, targets) if options.sequential else [targets]) if targets else []
    for level, group in enumerate(levels):
        if settings is not None and (options.sequential or not options.owl or gram):
            passes.append(CalibratePass(group, settings, gram=gram,
                                        level=level if options.sequential else None))
        passes.append(_prune_pass(options, group))
    if options.precision != "fp32":
        passes.append(PrecisionPass(options.precision))
    if options.nm is not None and options.precision != "fp32":
        passes.append(CheckPatternPass(targets, options.nm))  # conversion must keep the zeros
    return Pipeline(passes)


def build_prepasses(options: CompileOptions) -> Pipeline:
    """Passes that run before analysis of a weight-pruning compile: BatchNorm folding, so the
    N:M or unstructured pattern is chosen on the weights TensorRT multiplies by (it folds BN too)."""
    if options.structured or not options.folds_bn:
        return Pipeline([])
    return Pipeline([FoldBatchNormPass()])


def _prune_pass(options: CompileOptions, group: list[PruneTarget]):
    if options.method == "sparsegpt":
        return SparseGPTPass(group, nm=options.nm, sparsity=options.sparsity,
                             block_size=options.block_size, damp=options.damp)
    return PruneWeightsPass(group, nm=options.nm, sparsity=options.sparsity, group=options.group,
                            method=options.method)


def _nothing_done(report: Report, options: CompileOptions, results: list[PassResult]) -> str | None:
    """One line when a fold-only, channel or transformer compile changed nothing, with the first
    reason (the compile still writes the verified, unchanged model: exit 0 is not a silent no-op)."""
    if options.transformer and report.transformer:
        blocks = report.transformer.get("blocks") or []
        changed = any(b.get(f"{k}_after") != b.get(f"{k}_before") for b in blocks
                      for k in ("heads", "ffn", "tokens"))
        if not changed:
            why = report.transformer.get("unexplained") or ["no attention block or FFN found"] \
                if not blocks else ["every head, neuron and token was kept"]
            return f"nothing removed: {why[0] if isinstance(why[0], str) else why[0]}"
        return None
    if options.structured and report.channels is not None:
        if report.channels.get("removed"):
            return None
        reasons = [r for g in report.channels.get("groups", []) for r in g.get("untouchable", [])]
        return ("nothing removed: every channel group is kept whole"
                + (f" ({len(reasons)} reasons, first: {reasons[0]})" if reasons else ""))
    if options.folds_bn and not options.prunes_weights and not options.structured:
        fold = next((r for r in results if r.name == "fold-bn"), None)
        if fold is None or not fold.details.get("folded"):
            kept = fold.details.get("kept", []) if fold else []
            return ("nothing folded: " + (f"{len(kept)} BatchNormalization kept, first: {kept[0][0]}: "
                                          f"{kept[0][1]}" if kept else "the model has no BatchNormalization"))
    return None


def default_output(model_path: Path) -> Path:
    return model_path.with_name(f"{model_path.stem}_sparse")


def compile_model(model_path: str | Path, options: CompileOptions, output: str | Path | None = None
                  ) -> Report:
    """Prune `model_path` as `options` say and write OUTDIR/model.onnx and report.json."""
    model_path = Path(model_path)
    out = Path(output) if output is not None else default_output(model_path)
    check_output_dir(out, options.force, (model_path,))
    timings: dict[str, float] = {}
    start = time.perf_counter()
    loaded = load_model(model_path)
    timings["load_s"] = time.perf_counter() - start
    model = loaded.model
    ctx = PassContext(model, loaded.store)

    start = time.perf_counter()
    prepared = build_prepasses(options).run(ctx)
    model = ctx.model
    fixed = fixed_input_shapes(model, options.shapes)
    analysis = find_layers(model)
    targets, skipped = select_targets(analysis, options)
    nothing = (nothing_pruned(analysis, targets, skipped)
               if options.prunes_weights and not (options.structured or options.transformer) else None)
    macs = all_layer_macs(model, analysis.layers, layer_shapes(model, loaded.store, analysis.layers, fixed))
    timings["analyze_s"] = time.perf_counter() - start

    settings = _calibration(loaded, options, fixed) if options.calibrated and not nothing else None
    if options.calib_range:  # ranges of every random input sparsec draws (verify, oracle, probes)
        check_ranges(input_specs(model), options.calib_range)
    plan = masked = None
    if options.transformer:
        plan = plan_transformer(model, loaded.store, options, fixed, settings)
        masked = plan.masked(model, loaded.store)
        timings["analyze_s"] = time.perf_counter() - start
    elif options.structured:
        plan = plan_structured(model, loaded.store, options, fixed, settings)
        masked = plan.compensation.masked
        timings["analyze_s"] = time.perf_counter() - start
    start = time.perf_counter()
    results = prepared + build_pipeline(options, targets, model, settings, plan).run(ctx)
    timings["prune_s"] = time.perf_counter() - start

    # the report reads final weights before saving moves them into the new data file
    report = _report(ctx, loaded.path, out, options, analysis, skipped, macs, results)
    left = ctx.facts.get("left_dense", {})
    if nothing is None and targets and all(t.weight in left for t in targets):
        nothing = f"nothing pruned: every prunable weight was left dense ({next(iter(left.values()))})"
    report.nothing_pruned = nothing
    if plan is not None:
        structured_section(report, ctx, plan.ffn if options.transformer else plan, analysis, macs, fixed)
        if options.transformer:
            report.transformer = transformer_section(plan, model, ctx.store, fixed)
    report.nothing_pruned = report.nothing_pruned or _nothing_done(report, options, results)
    blobs = _encode(ctx, options, analysis, results, loaded.external, report)
    with staged_dir(out, options.force, (model_path, *loaded.data_files)) as tmp:
        if blobs:
            write_outputs(ctx.model, blobs, tmp)
        if options.sparse_initializers:
            names = {w.weight for r in results for w in r.details.get("weights", [])}
            report.tensorrt["note"] = ("model.onnx holds sparse initializers: "
                                       "TensorRT's parser needs dense ones")
            report.tensorrt["sparse_initializers"] = to_sparse_initializers(ctx.model, ctx.store, names)
        start = time.perf_counter()
        save_model(ctx.model, tmp / "model.onnx", ctx.store, external=loaded.external)
        timings["save_s"] = time.perf_counter() - start
        if options.verify:
            start = time.perf_counter()
            report.verify = _verify(model_path, tmp / "model.onnx", ctx, fixed, options, settings)
            _check_exact(report.verify, options)
            if masked is not None and "max_abs_diff" in report.verify:
                report.verify["masked"] = verify_masked(masked, tmp / "model.onnx", fixed, options.seed,
                                                        options.recover, options.calib_range)
            timings["verify_s"] = time.perf_counter() - start
        report.timings = timings
        (tmp / "report.json").write_text(report.to_json())
    return report


def _calibration(loaded, options: CompileOptions, fixed: dict) -> CalibrationSettings:
    """Open and validate the calibration data against the model's inputs."""
    reader = None if isinstance(options.calib, str | Path | None) else options.calib
    data = open_calibration(
        input_specs(loaded.model), path=None if reader is not None else options.calib, reader=reader,
        random_samples=options.calib_random, ranges=options.calib_range, shapes=options.shapes,
        samples=options.calib_samples, seed=options.seed)
    return CalibrationSettings(data=data, batch=options.batch,
                               providers=tuple(resolve_providers(options.providers)),
                               progress=False if options.quiet else None, fixed_shapes=fixed)


def _encode(ctx: PassContext, options: CompileOptions, analysis: LayerAnalysis,
            results: list[PassResult], external: bool, report: Report) -> dict:
    """Encode every pruned weight (weight-pruning compiles); the report lists every candidate."""
    if options.structured:
        return {}
    if not options.prunes_weights:
        report.encoding = {"skipped": "no weight was pruned (--fold-bn only)"}
        return {}
    if options.encode == "none":
        report.encoding = {"skipped": "--encode none"}
        return {}
    if options.sparse_initializers or external or ctx.model.ByteSize() >= TWO_GB:
        why = "--sparse-initializers" if options.sparse_initializers else "the model uses external data"
        report.encoding = {"skipped": f"{why}: weights.sparsec is written for self-contained models only"}
        return {}
    pruned = {n for r in results for w in r.details.get("weights", []) for n in w.layers}
    layers = [la for la in analysis.layers if la.name in pruned]
    if not layers:
        report.encoding = {"skipped": "no weight was pruned: weights.sparsec and skeleton.onnx are "
                                      "not written"}
        return {}
    blobs, rows = encode_weights(ctx.model, ctx.store, layers, options.nm, options.encode, options.rle_bits)
    formats: dict[str, int] = {}
    for row in rows:
        formats[row["format"]] = formats.get(row["format"], 0) + 1
    report.encoding = {"container": CONTAINER, "skeleton": SKELETON, "tensors": rows,
                       "totals": {"tensors": len(rows), "formats": formats,
                                  "dense_bytes": sum(r["dense_bytes"] for r in rows),
                                  "encoded_bytes": sum(r["bytes"] for r in rows)}}
    return blobs


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
        guessed = assumed_dims(ctx.model, options.shapes)
        for name, dims in guessed.items():
            log.warning("verify: input %s has symbolic dims %s that no --shape fixes; they are set to 1, "
                        "which may not exercise the model (give --shape %s=...)",
                        name, ", ".join(map(str, dims)), name)
        inputs = random_inputs(final, fixed, options.seed, options.calib_range, guessed)
    result = verify_models(dense, pruned, fixed, options.seed, inputs).as_dict()
    if not result["informative"]:
        log.warning("verify: %s", result["reason"])
    before = ctx.facts.get("model_before_precision")
    if before is not None and before.ByteSize() < TWO_GB:
        names = [o.name for o in final.get_outputs()]
        ref = run_batches(make_session_from_proto(before), names, inputs.batches)
        diffs = compare_outputs(ref, run_batches(final, names, inputs.batches), names)
        result["precision_drift"] = {
            "max_abs_diff": max(d.max_abs_diff for d in diffs),
            "outputs": [asdict(d) for d in diffs],
        }
    return result


FOLD_ONLY_RTOL = 1e-4  # BatchNorm folding is exact up to float32 rounding


def _check_exact(verify: dict, options: CompileOptions) -> None:
    """A compile that only folds BatchNorm must reproduce the dense outputs; never write one that does not."""
    if options.prunes_weights or options.structured or options.precision != "fp32" or "outputs" not in verify:
        return
    for out in verify["outputs"]:
        if out["max_abs_diff"] > FOLD_ONLY_RTOL * max(out["max_abs_dense"], 1.0):
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
    index = GraphIndex(ctx.model.graph)
    reasons = {(s.name, s.weight): s.reason for s in skipped}
    reasons |= {(la.name, la.weight): ctx.facts["left_dense"][la.weight] for la in analysis.layers
                if la.weight in ctx.facts.get("left_dense", {})}
    pruned = {n: w for r in results for w in r.details.get("weights", []) for n in w.layers}
    entries: list[LayerEntry] = []
    weight_bytes: dict[str, int] = {}
    nonzeros_cache: dict[str, int] = {}
    for layer in analysis.layers:
        tensor = index.constant(layer.source)
        if layer.weight not in nonzeros_cache:
            done = pruned.get(layer.name)
            if done is not None and options.precision == "fp32":  # the pass counted already
                nonzeros_cache[layer.weight] = done.nonzeros
                weight_bytes[layer.weight] = done.params * _itemsize(tensor)
            else:
                values = ctx.store.read(tensor)
                zero = zero_point(index, ctx.store, layer.source)  # a QDQ weight's zero point
                nonzeros_cache[layer.weight] = count_nonzero(values, zero)
                weight_bytes[layer.weight] = values.nbytes
        nz = nonzeros_cache[layer.weight]
        macs = macs_by_layer[layer.name]
        done = pruned.get(layer.name)
        reason = None if done is not None else reasons.get((layer.name, layer.weight))
        entries.append(LayerEntry(
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
        ))
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
        + [{"name": la.name, "op": la.op, "weight": la.weight, "reason": ctx.facts["left_dense"][la.weight]}
           for la in analysis.layers if la.weight in ctx.facts.get("left_dense", {})],
        passes=[_pass_entry(r) for r in results],
        tensorrt=trt,
    )

