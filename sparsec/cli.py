"""The `sparsec` command line: a thin layer over sparsec.api."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
from pathlib import Path

import click

from sparsec import api
from sparsec.core.options import RUN, SETTINGS, declared, parse_shapes
from sparsec.core.report import summary_table
from sparsec.errors import CLI_ACTIVE, SparsecError
from sparsec.inspection import inspect_table
from sparsec.recipes import STAGE_NAMES
from sparsec.runtime.engine_report import build_and_record
from sparsec.version import __version__
from sparsec.weights.quality_policy import table_lines
from sparsec.weights.sensitivity import Sensitivity


class UserError(click.ClickException):
    """A SparsecError shown as one line with its own exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def user_errors(fn):
    """Turn SparsecError and I/O failures into one-line errors with a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        token = CLI_ACTIVE.set(True)  # errors keep naming CLI flags, not API keywords
        try:
            return fn(*args, **kwargs)
        except SparsecError as exc:
            raise UserError(str(exc), exc.exit_code) from None
        except OSError as exc:
            where = f" {exc.filename}" if exc.filename else ""
            raise UserError(f"I/O error{where}: {exc.strerror or exc}", 1) from None
        except KeyboardInterrupt:  # the shell convention 128 + SIGINT; click's Abort would exit 1
            raise UserError("interrupted", 130) from None
        finally:
            CLI_ACTIVE.reset(token)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sparsec")
@click.option("-v", "--verbose", is_flag=True, help="Log what each pass does.")
def cli(verbose: bool) -> None:
    """sparsec: prune ONNX models for deployment.

    \b
    Examples:
      sparsec compile model.onnx --nm 2:4 -o out/
      sparsec compile model.onnx --sparsity 0.5 --group layer -o out/
      sparsec inspect model.onnx --shape input_ids=1,128
      sparsec engine out/model.onnx -o out/model.engine
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def verbosity(own_quiet: bool = False):
    """-v (log what each pass does, onnxruntime's log lines) and -q (warnings off; compile's own -q
    also hides the progress bar) on every command as well as on `sparsec` itself."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, verbose: bool = False, quiet_log: bool = False, **kwargs):
            if verbose or quiet_log:
                logging.getLogger().setLevel(logging.INFO if verbose else logging.ERROR)
            return fn(*args, **kwargs)

        wrapper = click.option("-v", "--verbose", is_flag=True, help="Log what each pass does.")(wrapper)
        if not own_quiet:
            wrapper = click.option("-q", "--quiet", "quiet_log", is_flag=True, help="Warnings off.")(wrapper)
        return wrapper
    return decorate


GROUP_TITLES = {
    "transformer": "Transformer stage (heads, FFN neurons, tokens)",
    "channels": "Channels stage (structured)",
    "fold-bn": "BatchNorm folding stage", "weights": "Weights stage (N:M or unstructured sparsity)",
    "correct": "Correction stage (bias correction, BatchNorm re-estimation)",
    "precision": "Precision stage", "encode": "Encode stage (weights.sparsec)",
    SETTINGS: "Calibration, shapes and verification (shared by every stage)", RUN: "Output and run",
}


class GroupedCommand(click.Command):
    """--help lists the options by recipe stage, in the order the stages run (as polygraphy groups)."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        groups: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record is not None:
                groups.setdefault(getattr(param, "group", RUN), []).append(record)
        for name in (*STAGE_NAMES, SETTINGS, RUN):
            if groups.get(name):
                with formatter.section(GROUP_TITLES[name]):
                    formatter.write_dl(groups[name])


def _python_type(spec) -> type:
    text = str(spec.type)
    return float if text.startswith("float") else int if text.startswith("int") else str


def declared_option(spec) -> click.Option:
    """The click option of one declared CompileOptions field: every value defaults to None, so only
    what the user typed reaches the API (and overrides a --recipe file)."""
    meta = spec.metadata
    flag = meta.get("flag") or "--" + spec.name.replace("_", "-")
    decls = [*flag.split("/")] if meta.get("kind") != "pair" else [f"{flag}/--no-{flag[2:]}"]
    default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
    shown = None if default in (None, {}, ()) or meta.get("kind") in ("flag", "negated") else (
        ",".join(default) if isinstance(default, tuple) else str(default))
    kind = meta.get("kind", "value")
    kwargs: dict = {"help": meta["help"] + (f"  [default: {shown}]" if shown else ""), "default": None}
    if kind in ("flag", "negated"):
        kwargs |= {"is_flag": True, "flag_value": kind == "flag", "default": None}
    elif kind == "multi":
        kwargs |= {"multiple": True, "metavar": meta.get("metavar"), "default": ()}
    elif kind == "value":
        choices = meta["choices"].values() if meta.get("choices") else None
        # choices are shown as [a|b|c] and checked by CompileOptions, whose error is one line naming
        # the flag and the choices (click's own would print a usage block)
        kwargs |= {"type": _python_type(spec),
                   "metavar": f"[{'|'.join(choices)}]" if choices else meta.get("metavar")}
    option = click.Option([*decls, spec.name], **kwargs)
    option.group = meta["stage"]
    return option


def declared_options(fn):
    """Add one click option per declared CompileOptions field (sparsec/core/options.py)."""
    params = getattr(fn, "__click_params__", [])
    params.extend(declared_option(spec) for spec in reversed(declared()))
    fn.__click_params__ = params
    return fn


@cli.command("compile", cls=GroupedCommand)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output directory (default: <model stem>_sparse/ beside the model).")
@click.option("--recipe", type=click.Path(path_type=Path), metavar="FILE.yaml",
              help="Run the stages of a recipe file (every compile writes OUTDIR/recipe.yaml); options "
                   "given here override it.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout.")
@declared_options
@verbosity(own_quiet=True)
@user_errors
def compile_cmd(model: Path, output: Path | None, recipe: Path | None, as_json: bool, **values) -> None:
    """Prune MODEL and write OUTDIR/model.onnx, OUTDIR/report.json and OUTDIR/recipe.yaml.

    Stages run in a fixed order: transformer, channels, fold-bn, weights, precision, encode;
    any combination works, each stage reading the graph the one before left.

    \b
    Examples:
      sparsec compile model.onnx --nm 2:4 -o out/
      sparsec compile model.onnx --nm 4:8 --exclude 'lm_head' --precision fp16 -o out/
      sparsec compile model.onnx --sparsity 0.6 --shape input_ids=1,128 --json
      sparsec compile bert.onnx --nm 2:4 --method sparsegpt --calib calib.npz -o out/
      sparsec compile resnet.onnx --channels 0.3 --round-to 8 --channel-score bn -o out/
      sparsec compile resnet.onnx --channels 0.3 --fold-bn --nm 2:4 --precision fp16 -o out/
      sparsec compile bert.onnx --heads 0.25 --ffn 0.25 --nm 2:4 --method sparsegpt --calib calib.npz
      sparsec compile bert.onnx --tokens 0.7 --tokens-from 2 -o out/
      sparsec compile model.onnx --recipe out/recipe.yaml -o again/
    """
    options = {k: v for k, v in values.items() if v is not None and v != () and v is not False
               or (k in ("verify", "fold_bn", "bias_correct") and v is False)}
    options.setdefault("quiet", as_json)
    report = api.compile(model, output=output, recipe=recipe, **options)
    click.echo(report.to_json() if as_json else summary_table(report))
    if report.nothing_pruned:
        click.echo(f"sparsec: {report.nothing_pruned}", err=True)
    elif len(report.steps or []) > 1:  # a combined compile: each step that did nothing says why
        for step in report.steps:
            if step.get("nothing"):
                click.echo(f"sparsec: step {step['name']}: {step['nothing']}", err=True)


SENSITIVITY_OPTIONS = ("nm", "sparsity", "method", "group", "min_params", "include", "exclude",
                       "nm_everywhere", "min_similarity", "calib", "calib_random", "calib_range",
                       "calib_samples", "batch", "seed")


def sensitivity_options(fn):
    """The compile options `inspect --sensitivity` reads (declared once, in sparsec/core/options.py)."""
    params = getattr(fn, "__click_params__", [])
    params.extend(declared_option(s) for s in reversed(declared()) if s.name in SENSITIVITY_OPTIONS)
    fn.__click_params__ = params
    return fn


def sensitivity_text(table: dict) -> str:
    """The sensitivity table as `inspect --sensitivity` prints it (most sensitive first)."""
    head = (f"sensitivity to {table['pattern']} by {table['method']}: output cosine similarity on "
            f"{table['held_back_samples']} held-back calibration samples, one layer pruned at a time")
    rows = [Sensitivity(r["weight"], tuple(r["layers"]), r["macs_saved"], r["similarity"])
            for r in table["table"]]
    reasons = table.get("kept_dense") if "min_similarity" in table else None
    lines = [head, *table_lines(rows, reasons)]
    if "min_similarity" in table:
        lines.append(f"--min-similarity {table['min_similarity']:g}: combined similarity "
                     f"{table['combined_similarity']:.5f}")
    lines += [f"not measured: {s['name']}: {s['reason']}" for s in table["not_measured"]]
    return "\n".join(lines)


@cli.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--shape", "shapes", multiple=True, metavar="NAME=d0,d1|NAME:d0xd1",
              help="Fix an input's symbolic dims for MAC counts (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--sensitivity", is_flag=True,
              help="Measure each layer's sensitivity to --nm/--sparsity on held-back calibration samples "
                   "(the last quarter) and print the table; prunes nothing.")
@sensitivity_options
@verbosity()
@user_errors
def inspect_cmd(model: Path, shapes: tuple[str, ...], as_json: bool, sensitivity: bool, **values) -> None:
    """List every prunable layer: op, weight, shape, reduction axis, params, MACs, and
    whether the weight already satisfies 2:4 / 4:8 on TensorRT's axis.

    \b
    Examples:
      sparsec inspect model.onnx
      sparsec inspect bert.onnx --shape input_ids=1,128 --shape attention_mask=1,128 --json
      sparsec inspect model.onnx --sensitivity --nm 2:4 --calib calib.npz [--min-similarity 0.99]
    """
    given = {k: v for k, v in values.items() if v not in (None, ())}
    if not sensitivity:
        if given:
            raise SparsecError(f"--{next(iter(given)).replace('_', '-')} is an option of --sensitivity",
                               "add --sensitivity, or drop it")
        report = api.inspect(model, shapes=parse_shapes(shapes))
        click.echo(report.to_json() if as_json else inspect_table(report))
        return
    table = api.sensitivity(model, shapes=parse_shapes(shapes), **given)
    click.echo(json.dumps({"sensitivity": table}, indent=2) if as_json else sensitivity_text(table))


@cli.command("decode")
@click.argument("outdir", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Where to write the rebuilt model.")
@verbosity()
@user_errors
def decode_cmd(outdir: Path, output: Path) -> None:
    """Rebuild OUTDIR/model.onnx from OUTDIR/skeleton.onnx and OUTDIR/weights.sparsec.

    \b
    Example:
      sparsec decode out/ -o restored.onnx && cmp restored.onnx out/model.onnx
    """
    click.echo(f"wrote {api.decode(outdir, output)}")


@cli.command("engine")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Where to write the serialized TensorRT engine.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=d0,d1|NAME:d0xd1",
              help="Shape of a dynamic input for the optimization profile (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print what TensorRT did as JSON.")
@verbosity()
@user_errors
def engine_cmd(model: Path, output: Path, shapes: tuple[str, ...], as_json: bool) -> None:
    """Build a sparse TensorRT engine from MODEL (needs tensorrt and an NVIDIA GPU).

    Reads back which layers got sparse kernels; when MODEL sits in a compile output
    directory, its report.json gains a `tensorrt.engine` section.

    \b
    Example:
      sparsec engine out/model.onnx -o out/model.engine
    """
    info = build_and_record(model, output, parse_shapes(shapes))
    click.echo(json.dumps(info, indent=2) if as_json else _engine_summary(info))


def _engine_summary(info: dict) -> str:
    sparse = info.get("sparse_layers", [])
    return (f"built {info.get('engine_path')} with TensorRT {info.get('trt_version')}: "
            f"{len(sparse)} layers use sparse kernels" + ("".join(f"\n  {s}" for s in sparse)))


def main() -> None:
    """Console-script entry point."""
    cli.main(prog_name="sparsec")


if __name__ == "__main__":
    sys.exit(main())
