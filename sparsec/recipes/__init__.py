"""Recipes: a compile is an ordered list of stages, each one capability with its own options.

ORDER is the one table that fixes the order in which stages run (structural removal first, then
BatchNorm folding, weight sparsity, precision, encoding); see docs/ARCHITECTURE.md. Each stage's
options are the CompileOptions fields declared with that `stage` (sparsec/core/options.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, dataclass
from typing import Any

from sparsec.core.options import RUN, SETTINGS, Choice, CompileOptions, NMPattern, declared, parse_shapes
from sparsec.errors import SparsecError
from sparsec.recipes.compile_run import CompileRun
from sparsec.recipes.correct_step import correct_step
from sparsec.recipes.steps import (
    channels_step,
    encode_step,
    fold_bn_step,
    precision_step,
    transformer_step,
    weights_step,
)
from sparsec.runtime.calib_data import parse_ranges


@dataclass(frozen=True)
class Stage:
    """One recipe stage: when it runs, what it does (plan + passes + oracle), one line for --help."""

    name: str
    runs: Callable[[CompileOptions], bool]
    step: Callable[[CompileRun, Any], dict]  # (the run, this stage's own options object) -> steps[] entry
    what: str

    def apply(self, run: CompileRun) -> dict:
        """Run this stage's step with only its own options (CompileOptions.of(name))."""
        return self.step(run, run.options.of(self.name))


ORDER: tuple[Stage, ...] = (
    Stage("transformer", lambda o: o.transformer, transformer_step,
          "remove attention heads, FFN neurons or tokens"),
    Stage("channels", lambda o: o.channels is not None, channels_step,
          "remove whole channels (structured)"),
    Stage("fold-bn", lambda o: o.folds_bn, fold_bn_step, "fold BatchNormalization into its producer"),
    Stage("weights", lambda o: o.prunes_weights, weights_step,
          "N:M or unstructured sparsity of the remaining weights"),
    Stage("correct", lambda o: o.corrects, correct_step,
          "bias correction and BatchNorm re-estimation on the calibration data"),
    Stage("precision", lambda o: o.precision != "fp32", precision_step, "convert to fp16/bf16"),
    Stage("encode", lambda o: o.prunes_weights or not o.structured, encode_step,
          "encode the pruned weights (weights.sparsec)"),
)
STAGE_NAMES = tuple(s.name for s in ORDER)


def stages_for(options: CompileOptions) -> list[Stage]:
    """The stages a compile with these options runs, in ORDER."""
    return [s for s in ORDER if s.runs(options)]


def _providers(value) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    return tuple(p.strip() for p in items if p.strip())


def _pairs(parse):
    """A parser for `NAME=...` items that also takes a mapping (the API's and a recipe file's form)."""
    def run(value):
        if isinstance(value, dict):
            return {k: tuple(v) for k, v in value.items()}
        return parse([value] if isinstance(value, str) else list(value))
    return run


PARSERS: dict[str, Callable] = {  # value parsers named by an option's `parse` (one per value kind)
    "nm": lambda v: v if isinstance(v, NMPattern) else NMPattern.parse(v),
    "shapes": _pairs(parse_shapes),
    "ranges": _pairs(parse_ranges),
    "providers": _providers,
    "path": lambda v: v,
}
FIELDS = {f.name: f for f in declared()}


def options_from(values: dict) -> CompileOptions:
    """CompileOptions from keyword values (API, CLI or a recipe file); an unknown name is an error."""
    kwargs = {}
    for name, value in values.items():
        spec = FIELDS.get(name)
        if spec is None:
            raise SparsecError(f"unknown option {name!r}", "see `sparsec compile --help` (keywords are the "
                               "flags without -- and with _ for -) or help(sparsec.compile)")
        if value is None and spec.default_factory is not MISSING:
            continue  # shapes=None, calib_range=None: the empty default
        parse = PARSERS.get(spec.metadata.get("parse", ""))
        kwargs[name] = parse(value) if parse is not None and value is not None else value
    return CompileOptions(**kwargs)


def recipe_of(options: CompileOptions) -> dict:
    """The stages as run with every option value, and the shared settings: recipe.yaml's content."""
    stages = []
    for stage in stages_for(options):
        values = {f.name: options.value_of(f.name) for f in declared(stage.name)}
        stages.append({stage.name: values})
    if options.fold_bn is False and options.channels is not None:  # the default would fold again
        stages.insert(1, {"fold-bn": {"fold_bn": False}})
    shaping = _ffn_shaping(options)
    if shaping:  # --ffn reads --round-to/--channels-per-layer-max, which belong to the channels stage
        stages.insert(1, {"channels": shaping})
    settings = {f.name: options.value_of(f.name) for f in declared(SETTINGS)}
    if settings.get("calib") is not None and not isinstance(options.calib, str | type(None)) \
            and not hasattr(options.calib, "__fspath__"):
        settings["calib"] = None  # a reader object cannot be written; the recipe then needs --calib
    return {"stages": stages, "settings": settings}


def _ffn_shaping(options: CompileOptions) -> dict:
    """The channels-stage options an --ffn compile was given beyond their defaults (the transformer's
    FFN removal reads them; the channels stage itself does not run)."""
    if options.ffn is None:
        return {}
    derived = {"round_to": options.round_to_for(None, options.nm), "channels_per_layer_max": 1.0}
    return {k: options.value_of(k) for k, v in derived.items() if options.value_of(k) != v}


def options_doc() -> str:
    """The option list for sparsec.compile's docstring, grouped by stage (generated, never edited)."""
    lines = []
    for stage in (*STAGE_NAMES, SETTINGS, RUN):
        lines.append(f"    {stage}:")
        for f in declared(stage):
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            choices = f.metadata.get("choices")
            kind = "|".join(choices.values()) if choices else f.type
            default = str(default) if isinstance(default, Choice) else default
            lines.append(f"        {f.name} ({kind}, default {default!r}): {f.metadata['help']}")
    return "\n".join(lines)


__all__ = ["ORDER", "PARSERS", "RUN", "SETTINGS", "STAGE_NAMES", "CompileRun", "Stage", "options_from",
           "recipe_of", "stages_for"]
