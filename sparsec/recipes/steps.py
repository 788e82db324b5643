"""Each recipe stage: plan on the current graph (a typed plan, sparsec.recipes.step_plans), run its
passes, check its own oracle. The compiler calls them in sparsec.recipes.ORDER, each with only its own
options object (sparsec.core.options: WeightsOptions, ChannelsOptions, ...; the shared settings are
`run.shared`); each returns its `steps[]` entry for the report."""

from __future__ import annotations

import time

from onnxconverter_common import float16

from sparsec.channels.fold_bn import FoldBatchNormPass
from sparsec.channels.permute_channels import PermuteChannelsPass
from sparsec.channels.prune_channels import PruneChannelsPass
from sparsec.channels.structured import plan_structured
from sparsec.channels.structured_report import MaskedRun, run_masked, verify_masked
from sparsec.core.options import (
    ChannelsOptions,
    EncodeOptions,
    FoldBNOptions,
    PrecisionOptions,
    TransformerOptions,
    WeightsOptions,
)
from sparsec.core.output import CONTAINER, SKELETON
from sparsec.encoding.blobs import encode_weights
from sparsec.errors import SparsecError
from sparsec.recipes.compile_run import CompileRun
from sparsec.recipes.policy_step import policy_weights
from sparsec.recipes.step_oracle import FOLD_RTOL, PERMUTE_RTOL
from sparsec.recipes.step_plans import (
    ChannelsPlan,
    EncodePlan,
    FoldBNPlan,
    PrecisionPlan,
    StepPlan,
    TransformerStepPlan,
    WeightsPlan,
)
from sparsec.runtime.precision import lowp_unsupported_ops
from sparsec.runtime.precision_pass import PrecisionPass
from sparsec.transformer.transformer_compile import plan_transformer
from sparsec.weights.calibrate_pass import CalibratePass
from sparsec.weights.check_pattern import CheckPatternPass
from sparsec.weights.owl import OwlPass
from sparsec.weights.prune_weights import PruneWeightsPass
from sparsec.weights.selection import depth_levels, nothing_pruned


def _entry(name: str, plan: StepPlan, results, oracle: dict | None = None, **extra) -> dict:
    return {"name": name, "plan": str(plan), "passes": [r.name for r in results],
            "modified": any(r.modified for r in results), "oracle": oracle, **extra}


def _timed(run: CompileRun, check):
    start = time.perf_counter()
    try:
        return check()
    finally:
        run.timings["verify_s"] = run.timings.get("verify_s", 0.0) + time.perf_counter() - start


def _masked_before(run: CompileRun, masked: tuple | None) -> MaskedRun | None:
    """The structural step's reference, run before its passes: the masked twin (model, store) of the
    graph before the step, so its session and the pruned weights are never in memory together."""
    if masked is None or not run.shared.verify:
        return None
    shared = run.shared
    return _timed(run, lambda: run_masked(*masked, run.fixed, shared.seed, shared.calib_range))


def _masked_oracle(run: CompileRun, before: MaskedRun | None, recovered: bool = False) -> dict | None:
    """The structural step's oracle: the graph right after the step (run in place on its store)
    against the graph before it with the removed parts masked to zero (later stages do not blur it)."""
    run.oracle.forget()  # the next step's reference is the graph this step left
    if before is None:
        return None
    result = _timed(run, lambda: verify_masked(before, run.ctx.model, run.ctx.store, recovered))
    run.masked_oracle = result
    return {"max_abs_diff": result["max_abs_diff"], "against": "the graph before this step, masked"}


def _step_oracle(run: CompileRun, passes: list) -> tuple[list, dict | None]:
    """Run a non-structural step's passes between two onnxruntime runs of the graph on the same
    inputs: before (the previous step's outputs when it left them) and after."""
    if not run.shared.verify:
        return run.run_passes(passes), None
    # the graph runs in place, its values fed from the store: no copy of the model, at any size
    before = _timed(run, lambda: run.oracle.before(lambda: (run.ctx.model, run.ctx.store)))
    results = run.run_passes(passes)
    if not any(r.modified for r in results):
        return results, {"max_abs_diff": 0.0, "cosine": 1.0, "against": "unchanged: no pass modified it"}
    return results, _timed(run, lambda: run.oracle.check(before, run.ctx.model, run.ctx.store))


def transformer_step(run: CompileRun, opts: TransformerOptions) -> dict:
    """Heads, FFN neurons and tokens (sparsec.transformer)."""
    before = run.analyse()
    start = time.perf_counter()
    plan = plan_transformer(run.ctx.model, run.ctx.store, opts, run.fixed, run.calibration(),
                            ffn_shape=run.options.ffn_channels(), seed=run.shared.seed,
                            ranges=run.shared.calib_range)
    masked = plan.masked(run.ctx.model, run.ctx.store)
    run.timings["analyze_s"] += time.perf_counter() - start
    masked = _masked_before(run, masked)
    results = run.run_passes(plan.passes())
    run.structural = ("transformer", plan, before, run.ctx.model)
    typed = TransformerStepPlan(
        blocks=len(plan.blocks),
        heads_removed=sum(len(v) for v in plan.heads.removed.values()) if plan.heads else 0,
        ffn_removed=_neurons(plan.ffn) if plan.ffn else 0, tokens=plan.tokens)
    nothing = None if any(r.modified for r in results) else (
        "nothing removed: every head, FFN neuron and token was kept" if plan.blocks
        else "nothing removed: no attention block or FFN found")
    return _entry("transformer", typed, results, _masked_oracle(run, masked), nothing=nothing)


def _neurons(plan) -> int:
    """Removed channel groups: a gated MLP's neuron is one column of gate and one of up, counted once
    (as report.channels.removed)."""
    return len({int(plan.analysis.root[e]) for e in plan.choice.removed})


def channels_step(run: CompileRun, opts: ChannelsOptions) -> dict:
    """Whole channels, with bias compensation or recovery (sparsec.channels)."""
    before = run.analyse()
    start = time.perf_counter()
    plan = plan_structured(run.ctx.model, run.ctx.store, opts, run.fixed, run.calibration(),
                           seed=run.shared.seed, ranges=run.shared.calib_range)
    run.timings["analyze_s"] += time.perf_counter() - start
    masked = _masked_before(run, (plan.compensation.masked, plan.compensation.store))
    results = run.run_passes([PruneChannelsPass(plan.analysis, plan.choice.removed,
                                                {} if opts.recover else plan.compensation.constants,
                                                plan.recovery)])
    run.structural = ("channels", plan, before, run.ctx.model)
    analysis = plan.analysis
    typed = ChannelsPlan(removed=len({int(analysis.root[e]) for e in plan.choice.removed}),
                         removable=len([c for c in analysis.classes() if c not in analysis.untouchable]),
                         elements=len(plan.choice.removed))
    reasons = [r for g in analysis.groups() for r in g.get("untouchable", [])]  # as report.channels
    nothing = None if any(r.modified for r in results) else (
        "nothing removed: every channel group is kept whole"
        + (f" ({len(reasons)} reasons, first: {reasons[0]})" if reasons else ""))
    defaults = run.options.channel_defaults  # what the data decided (--channel-score, --recover)
    return _entry("channels", typed, results, _masked_oracle(run, masked, opts.recover),
                  nothing=nothing, **({"defaults": defaults} if defaults else {}))


def fold_bn_step(run: CompileRun, opts: FoldBNOptions) -> dict:
    """BatchNormalization folded into its producer; its oracle: the graph after folding equals the
    graph before it within FOLD_RTOL (relative to max(|output|, 1)), or nothing is written."""
    results, oracle = _step_oracle(run, [FoldBatchNormPass()])
    details = results[0].details
    folded, kept = details.get("folded") or [], details.get("kept") or []
    if oracle is not None and "max_rel_diff" in oracle:
        oracle["tolerance"] = FOLD_RTOL
        if oracle["max_rel_diff"] > FOLD_RTOL:
            raise SparsecError(f"BatchNorm folding changed the outputs by {oracle['max_rel_diff']:.3g} "
                               f"(relative, more than {FOLD_RTOL:g})",
                               "nothing was written; compile with --no-fold-bn and report this model")
    plan = FoldBNPlan(batchnorms=len(folded) + len(kept), fold=len(folded), kept=list(kept))
    nothing = None if folded else "nothing folded: " + (
        f"{len(kept)} BatchNormalization kept, first: {kept[0][0]}: {kept[0][1]}" if kept
        else "the model has no BatchNormalization")
    return _entry("fold-bn", plan, results, oracle, nothing=nothing)


def weights_step(run: CompileRun, opts: WeightsOptions) -> dict:
    """N:M or unstructured sparsity chosen on the graph as the earlier stages left it."""
    found = run.analyse()
    run.weights, run.targets, run.nm = found, found.targets, opts.nm
    run.nothing = nothing_pruned(found.analysis, found.targets, found.skipped)
    settings = run.calibration() if not run.nothing else None
    pattern = str(opts.nm) if opts.nm is not None else f"unstructured {opts.sparsity}"
    plan = WeightsPlan(pattern, str(opts.method), len(found.targets),
                       len({(s.name, s.weight) for s in found.skipped}), opts.owl)
    permuted = None
    if opts.permute and found.targets and not run.nothing:
        permuted = permute_step(run, opts, found.targets, settings)
        found = run.analyse()  # the permuted graph: same layers, reordered weights
        run.weights, run.targets = found, found.targets
    if run.options.corrects and found.targets and not run.nothing and not _default_correction_too_big(run):
        run.dense = run.snapshot()  # the correct stage matches the pruned graph to this one
    extra: dict = {"permute": permuted} if permuted is not None else {}  # --permute: gain and time
    if run.options.weight_defaults:  # --method left unset: what the data decided
        extra["defaults"] = run.options.weight_defaults
    if opts.min_similarity is not None and found.targets and not run.nothing:  # the quality-target policy
        results, oracle, extra["policy"] = policy_weights(
            run, opts, found, settings,
            lambda targets, fit: _step_oracle(run, weight_passes(opts, targets, run.ctx.model, fit)))
        return _entry("weights", plan, results, oracle, nothing=run.nothing, **extra)
    results, oracle = _step_oracle(run, weight_passes(opts, found.targets, run.ctx.model, settings))
    return _entry("weights", plan, results, oracle, nothing=run.nothing, **extra)


def permute_step(run: CompileRun, opts: WeightsOptions, targets, settings) -> dict:
    """--permute: reorder coupled channels before the N:M masks (scores from a calibration of the
    dense graph for wanda/sparsegpt; the weights passes calibrate the permuted graph again). Its
    oracle: the permuted graph equals the graph before it within PERMUTE_RTOL, or nothing is written."""
    passes: list = [CalibratePass(targets, settings)] if opts.calibrated_method and settings else []
    passes.append(PermuteChannelsPass(targets, opts.nm, str(opts.method), run.fixed, run.shared.seed))
    results, oracle = _step_oracle(run, passes)
    if oracle is not None and oracle.get("max_rel_diff", 0.0) > PERMUTE_RTOL:
        raise SparsecError(f"channel permutation changed the outputs by {oracle['max_rel_diff']:.3g} "
                           f"(relative, more than {PERMUTE_RTOL:g})",
                           "nothing was written; compile without --permute and report this model")
    return {**results[-1].details, "oracle": oracle}


def _default_correction_too_big(run: CompileRun) -> bool:
    """Default bias correction needs an in-memory dense copy of the model: not for a model whose weights
    live in external data (memory stays bounded by one inference); --bias-correct asks for it anyway."""
    options = run.options
    return options.bias_correct is None and not options.bn_reestimate and run.loaded.external


def weight_passes(options: WeightsOptions, targets, model, settings) -> list:
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
            from sparsec.weights.sparsegpt_pass import SparseGPTPass  # scipy.linalg: 0.5 s of import

            passes.append(SparseGPTPass(group, nm=options.nm, sparsity=options.sparsity,
                                        block_size=options.block_size, damp=options.damp,
                                        scale=settings.scale if settings is not None else None,
                                        progress=settings.progress if settings is not None else False))
        else:
            passes.append(PruneWeightsPass(group, nm=options.nm, sparsity=options.sparsity,
                                           group=options.group, method=options.method))
    return passes


def precision_step(run: CompileRun, opts: PrecisionOptions) -> dict:
    """fp16/bf16 conversion; the N:M pattern the weights step left must survive it. Its oracle: the
    fp32 graph before conversion against the converted one (the drift)."""
    model = run.ctx.model
    blocked = set(float16.DEFAULT_OP_BLOCK_LIST) | set(lowp_unsupported_ops(model, opts.precision))
    plan = PrecisionPlan(str(opts.precision), sum(n.op_type in blocked for n in model.graph.node),
                         len(model.graph.node))
    passes: list = [PrecisionPass(opts.precision)]
    if run.nm is not None and run.targets:
        passes.append(CheckPatternPass(run.targets, run.nm))  # conversion must keep the zeros
    results, oracle = _step_oracle(run, passes)
    return _entry("precision", plan, results, oracle)


def encode_step(run: CompileRun, opts: EncodeOptions) -> dict:
    """Each pruned weight in its smallest encoding, for weights.sparsec (written with model.onnx)."""
    run.encoding, run.blobs = encoding_section(run, opts)
    totals = run.encoding.get("totals") or {}
    plan = EncodePlan(totals.get("tensors", 0), dict(totals.get("formats", {})), run.encoding.get("skipped"))
    return _entry("encode", plan, [])


def encoding_section(run: CompileRun, opts: EncodeOptions) -> tuple[dict, dict]:
    ctx = run.ctx
    if run.weights is None:
        return {"skipped": "no weight was pruned (--fold-bn only)"}, {}
    if opts.encode == "none":
        return {"skipped": "--encode none"}, {}
    if opts.sparse_initializers:
        return {"skipped": "--sparse-initializers: the pruned weights are stored in model.onnx"}, {}
    pruned = {n for r in run.results for w in r.details.get("weights", []) for n in w.layers}
    layers = [la for la in run.weights.analysis.layers if la.name in pruned]
    if not layers:
        return {"skipped": "no weight was pruned: weights.sparsec and skeleton.onnx are not written"}, {}
    blobs, rows = encode_weights(ctx.model, ctx.store, layers, run.nm, str(opts.encode), opts.rle_bits)
    formats: dict[str, int] = {}
    for row in rows:
        formats[row["format"]] = formats.get(row["format"], 0) + 1
    return {"container": CONTAINER, "skeleton": SKELETON, "tensors": rows,
            "totals": {"tensors": len(rows), "formats": formats,
                       "dense_bytes": sum(r["dense_bytes"] for r in rows),
                       "encoded_bytes": sum(r["bytes"] for r in rows)}}, blobs
