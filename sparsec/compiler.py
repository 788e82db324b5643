"""`sparsec compile`: load, analyse, prune, convert, save, verify, report."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from sparsec import __version__
from sparsec.errors import SparsecError
from sparsec.graph import TWO_GB, load_model, save_model
from sparsec.layers import LayerAnalysis, find_layers
from sparsec.macs import all_layer_macs, fixed_input_shapes
from sparsec.options import CompileOptions
from sparsec.output import check_output_dir, staged_dir
from sparsec.passes.check_pattern import CheckPatternPass
from sparsec.passes.precision import PrecisionPass
from sparsec.passes.prune_weights import PruneWeightsPass
from sparsec.pipeline import PassContext, PassResult, Pipeline
from sparsec.report import LayerEntry, Report, totals
from sparsec.runtime.session import make_session_from_proto
from sparsec.selection import PruneTarget, select_targets
from sparsec.weights import GraphIndex


def build_pipeline(options: CompileOptions, targets: list[PruneTarget]) -> Pipeline:
    """The one place that knows the order of the passes."""
    passes = [PruneWeightsPass(targets, nm=options.nm, sparsity=options.sparsity, group=options.group)]
    if options.precision != "fp32":
        passes.append(PrecisionPass(options.precision))
    if options.nm is not None:
        passes.append(CheckPatternPass(targets, options.nm))
    return Pipeline(passes)


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
    fixed = fixed_input_shapes(model, options.shapes)
    analysis = find_layers(model)
    targets, skipped = select_targets(analysis, options)
    macs = all_layer_macs(model, loaded.store, analysis.layers, fixed)
    timings["analyze_s"] = time.perf_counter() - start

    start = time.perf_counter()
    results = build_pipeline(options, targets).run(ctx)
    timings["prune_s"] = time.perf_counter() - start

    # the report reads final weights before saving moves them into the new data file
    report = _report(ctx, loaded.path, out, options, analysis, skipped, macs, results)
    with staged_dir(out, options.force, (model_path, *loaded.data_files)) as tmp:
        start = time.perf_counter()
        save_model(ctx.model, tmp / "model.onnx", ctx.store, external=loaded.external)
        timings["save_s"] = time.perf_counter() - start
        if options.verify:
            start = time.perf_counter()
            report.verify = _verify(model_path, tmp / "model.onnx", ctx, fixed, options)
            timings["verify_s"] = time.perf_counter() - start
        report.timings = timings
        (tmp / "report.json").write_text(report.to_json())
    return report


def _verify(dense: Path, pruned: Path, ctx: PassContext, fixed: dict, options: CompileOptions
            ) -> dict:
    """Dense vs final model in onnxruntime; after a precision change also the conversion drift."""
    from sparsec.runtime.session import make_session, random_feeds
    from sparsec.runtime.verify import compare_outputs, verify_models

    if options.precision != "fp32":
        try:
            make_session(pruned)
        except SparsecError as exc:
            return {"skipped": f"{options.precision} model not runnable on onnxruntime CPU: {exc}"}
    result = verify_models(dense, pruned, fixed, options.seed).as_dict()
    before = ctx.facts.get("model_before_precision")
    if before is not None and before.ByteSize() < TWO_GB:
        final = make_session(pruned)
        feeds = random_feeds(final, fixed, options.seed)
        names = [o.name for o in final.get_outputs()]
        ref = make_session_from_proto(before).run(names, feeds)
        diffs = compare_outputs(ref, final.run(names, feeds), names)
        result["precision_drift"] = {
            "max_abs_diff": max(d.max_abs_diff for d in diffs),
            "outputs": [asdict(d) for d in diffs],
        }
    return result


def _report(ctx: PassContext, model_path: Path, out: Path, options: CompileOptions,
            analysis: LayerAnalysis, skipped, macs_by_layer: dict[str, int | None],
            results: list[PassResult]) -> Report:
    index = GraphIndex(ctx.model.graph)
    reasons = {(s.name, s.weight): s.reason for s in skipped}
    pruned_names = {n for r in results for w in r.details.get("weights", []) for n in w.layers}
    pattern = str(options.nm) if options.nm else f"unstructured/{options.group}"
    entries: list[LayerEntry] = []
    weight_bytes: dict[str, int] = {}
    nonzeros_cache: dict[str, int] = {}
    for layer in analysis.layers:
        tensor = index.constant(layer.source)
        if layer.weight not in nonzeros_cache:
            values = ctx.store.read(tensor)
            nonzeros_cache[layer.weight] = int(np.count_nonzero(values))
            weight_bytes[layer.weight] = values.nbytes
        nz = nonzeros_cache[layer.weight]
        macs = macs_by_layer[layer.name]
        reason = None if layer.name in pruned_names else reasons.get((layer.name, layer.weight))
        entries.append(LayerEntry(
            name=layer.name, op=layer.op, weight=layer.weight, shape=list(layer.shape),
            reduction_axis=layer.reduction_axis, pattern=pattern if reason is None else "dense",
            sparsity=1.0 - nz / layer.params, params=layer.params, nonzeros=nz, macs_dense=macs,
            macs_nonzero=None if macs is None else int(round(macs * nz / layer.params)),
            skipped_reason=reason,
        ))
    trt = {}
    try:
        from sparsec.runtime.tensorrt import trt_commands

        trt = {"commands": trt_commands(str(out / "model.onnx"), options.precision)}
    except ImportError:
        trt = {}
    return Report(
        sparsec_version=__version__,
        input=str(model_path),
        output=str(out),
        options=options.as_dict(),
        layers=entries,
        totals=totals(entries, weight_bytes),
        verify=None,
        skipped=[{"name": s.name, "op": s.op, "weight": s.weight, "reason": s.reason} for s in skipped],
        passes=[{"name": r.name, "modified": r.modified, "seconds": r.seconds} for r in results],
        tensorrt=trt,
    )

