"""Each recipe stage: plan on the current graph, run its passes, check its own oracle. The compiler
calls them in sparsec.recipes.ORDER; each returns its `steps[]` entry for the report."""

from __future__ import annotations

import time

from sparsec.channels.fold_bn import FoldBatchNormPass
from sparsec.channels.prune_channels import PruneChannelsPass
from sparsec.channels.structured import plan_structured
from sparsec.channels.structured_report import verify_masked
from sparsec.core.graph import TWO_GB
from sparsec.core.output import CONTAINER, SKELETON
from sparsec.encoding.blobs import encode_weights
from sparsec.recipes.compile_run import CompileRun
from sparsec.runtime.precision_pass import PrecisionPass
from sparsec.transformer.transformer_compile import plan_transformer
from sparsec.weights.calibrate_pass import CalibratePass
from sparsec.weights.check_pattern import CheckPatternPass
from sparsec.weights.owl import OwlPass
from sparsec.weights.prune_weights import PruneWeightsPass
from sparsec.weights.selection import depth_levels, nothing_pruned
from sparsec.weights.sparsegpt_pass import SparseGPTPass


def _entry(name: str, plan: str, results, oracle: dict | None = None, **extra) -> dict:
    return {"name": name, "plan": plan, "passes": [r.name for r in results],
            "modified": any(r.modified for r in results), "oracle": oracle, **extra}


def _oracle(run: CompileRun, masked) -> dict | None:
    """The structural step's oracle: the graph right after the step against the graph before it
    with the removed parts masked to zero (later stages do not blur it)."""
    if masked is None or not run.options.verify:
        return None
    start = time.perf_counter()
    opts = run.options
    result = verify_masked(masked, run.snapshot(), run.fixed, opts.seed, opts.recover, opts.calib_range)
    run.timings["verify_s"] = run.timings.get("verify_s", 0.0) + time.perf_counter() - start
    run.masked_oracle = result
    return {"max_abs_diff": result["max_abs_diff"], "against": "the graph before this step, masked"}


def transformer_step(run: CompileRun) -> dict:
    """Heads, FFN neurons and tokens (sparsec.transformer)."""
    before = run.analyse()
    start = time.perf_counter()
    plan = plan_transformer(run.ctx.model, run.ctx.store, run.options, run.fixed, run.calibration())
    masked = plan.masked(run.ctx.model, run.ctx.store)
    run.timings["analyze_s"] += time.perf_counter() - start
    results = run.run_passes(plan.passes())
    run.structural = ("transformer", plan, before, run.ctx.model)
    removed = sum(len(v) for v in plan.heads.removed.values()) if plan.heads else 0
    ffn = len(plan.ffn.choice.removed) if plan.ffn else 0
    summary = f"remove {removed} heads, {ffn} FFN channels" + (
        f", keep {plan.tokens[0]} of the tokens after layer {plan.tokens[1]}" if plan.tokens else "")
    return _entry("transformer", summary, results, _oracle(run, masked))


def channels_step(run: CompileRun) -> dict:
    """Whole channels, with bias compensation or recovery (sparsec.channels)."""
    before = run.analyse()
    opts = run.options
    start = time.perf_counter()
    plan = plan_structured(run.ctx.model, run.ctx.store, opts, run.fixed, run.calibration())
    run.timings["analyze_s"] += time.perf_counter() - start
    results = run.run_passes([PruneChannelsPass(plan.analysis, plan.choice.removed,
                                                {} if opts.recover else plan.compensation.constants,
                                                plan.recovery)])
    run.structural = ("channels", plan, before, run.ctx.model)
    groups = len({int(plan.analysis.root[e]) for e in plan.choice.removed})
    return _entry("channels", f"remove {groups} channel groups ({len(plan.choice.removed)} channels)",
                  results, _oracle(run, plan.compensation.masked))


def fold_bn_step(run: CompileRun) -> dict:
    """BatchNormalization folded into its producer: exact, so its check is the final comparison."""
    results = run.run_passes([FoldBatchNormPass()])
    return _entry("fold-bn", f"fold {len(results[0].details.get('folded') or [])} BatchNormalization",
                  results)


def weights_step(run: CompileRun) -> dict:
    """N:M or unstructured sparsity chosen on the graph as the earlier stages left it."""
    opts = run.options
    found = run.analyse()
    run.weights, run.targets = found, found.targets
    run.nothing = nothing_pruned(found.analysis, found.targets, found.skipped)
    settings = run.calibration() if not run.nothing else None
    results = run.run_passes(weight_passes(opts, found.targets, run.ctx.model, settings))
    pattern = str(opts.nm) if opts.nm is not None else f"unstructured {opts.sparsity}"
    return _entry("weights", f"{pattern} by {opts.method} on {len(found.targets)} weights", results,
                  nothing=run.nothing)


def weight_passes(options, targets, model, settings) -> list:
    """Calibration, OWL and pruning passes of the weights stage, level by level with --sequential."""
    passes: list = []
    gram = options.method == "sparsegpt"
    if options.owl and targets:
        passes += [CalibratePass(targets, settings), OwlPass(targets, options.sparsity or 0.0,
                                                             options.owl_lambda, options.owl_m)]
    levels = (depth_levels(model, targets) if options.sequential else [targets]) if targets else []
    for level, group in enumerate(levels):
        if settings is not None and (options.sequential or not options.owl or gram):
            passes.append(CalibratePass(group, settings, gram=gram,
                                        level=level if options.sequential else None))
        if gram:
            passes.append(SparseGPTPass(group, nm=options.nm, sparsity=options.sparsity,
                                        block_size=options.block_size, damp=options.damp))
        else:
            passes.append(PruneWeightsPass(group, nm=options.nm, sparsity=options.sparsity,
                                           group=options.group, method=options.method))
    return passes


def precision_step(run: CompileRun) -> dict:
    """fp16/bf16 conversion; the N:M pattern must survive it."""
    passes: list = [PrecisionPass(run.options.precision)]
    if run.options.nm is not None and run.targets:
        passes.append(CheckPatternPass(run.targets, run.options.nm))  # conversion must keep the zeros
    return _entry("precision", f"convert to {run.options.precision}", run.run_passes(passes))


def encode_step(run: CompileRun) -> dict:
    """Each pruned weight in its smallest encoding, for weights.sparsec (written with model.onnx)."""
    run.encoding, run.blobs = encoding_section(run)
    why = run.encoding.get("skipped")
    return _entry("encode", why or f"{run.encoding['totals']['tensors']} tensors", [])


def encoding_section(run: CompileRun) -> tuple[dict, dict]:
    opts, ctx = run.options, run.ctx
    if not opts.prunes_weights:
        return {"skipped": "no weight was pruned (--fold-bn only)"}, {}
    if opts.encode == "none":
        return {"skipped": "--encode none"}, {}
    if opts.sparse_initializers or run.loaded.external or ctx.model.ByteSize() >= TWO_GB:
        why = "--sparse-initializers" if opts.sparse_initializers else "the model uses external data"
        return {"skipped": f"{why}: weights.sparsec is written for self-contained models only"}, {}
    pruned = {n for r in run.results for w in r.details.get("weights", []) for n in w.layers}
    layers = [la for la in run.weights.analysis.layers if la.name in pruned] if run.weights else []
    if not layers:
        return {"skipped": "no weight was pruned: weights.sparsec and skeleton.onnx are not written"}, {}
    blobs, rows = encode_weights(ctx.model, ctx.store, layers, opts.nm, opts.encode, opts.rle_bits)
    formats: dict[str, int] = {}
    for row in rows:
        formats[row["format"]] = formats.get(row["format"], 0) + 1
    return {"container": CONTAINER, "skeleton": SKELETON, "tensors": rows,
            "totals": {"tensors": len(rows), "formats": formats,
                       "dense_bytes": sum(r["dense_bytes"] for r in rows),
                       "encoded_bytes": sum(r["bytes"] for r in rows)}}, blobs
