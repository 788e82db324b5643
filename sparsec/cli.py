"""The `sparsec` command line: a thin layer over sparsec.api."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from sparsec import api
from sparsec.core.options import parse_shapes
from sparsec.core.report import summary_table
from sparsec.errors import CLI_ACTIVE, SparsecError
from sparsec.inspection import inspect_table
from sparsec.runtime.calib_data import parse_ranges
from sparsec.runtime.engine_report import build_and_record
from sparsec.version import __version__


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


@cli.command("compile")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output directory (default: <model stem>_sparse/ beside the model).")
@click.option("--nm", help="N:M pattern along the reduction axis, e.g. 2:4 or 4:8.")
@click.option("--sparsity", type=float, help="Unstructured sparsity in [0, 1).")
@click.option("--method", default="magnitude", show_default=True,
              help="Weight score: magnitude, wanda (|W|·‖X‖, needs calibration) or sparsegpt "
                   "(second order with weight update, needs calibration).")
@click.option("--group", default="output", show_default=True,
              type=click.Choice(["output", "layer", "input"]),
              help="Comparison group for unstructured pruning.")
@click.option("--include", metavar="REGEX", help="Prune only layers whose node name matches.")
@click.option("--exclude", metavar="REGEX", help="Leave layers whose node name matches dense.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=d0,d1|NAME:d0xd1",
              help="Fix an input's symbolic dims for verification and MAC counts (repeatable).")
@click.option("--nm-everywhere", is_flag=True,
              help="Apply N:M also where TensorRT cannot use it (grouped/depthwise conv, ...).")
@click.option("--min-params", type=int, default=256, show_default=True,
              help="Leave layers with fewer weights dense.")
@click.option("--precision", default="fp32", show_default=True,
              type=click.Choice(["fp32", "fp16", "bf16"]),
              help="Convert the output model (TensorRT's sparse kernels need fp16/bf16).")
@click.option("--calib", metavar="FILE.npz|DIR",
              help="Calibration data: arrays keyed by input name, axis 0 = samples.")
@click.option("--calib-random", type=int, metavar="N", help="Draw N calibration samples from the input spec.")
@click.option("--calib-range", "calib_range", multiple=True, metavar="NAME=lo,hi",
              help="Value range [lo, hi) of a random input for --calib-random and for verification "
                   "without --calib, e.g. input_ids=0,30522 (repeatable).")
@click.option("--calib-samples", type=int, metavar="N", help="Use the first N calibration samples.")
@click.option("--batch", type=int, default=8, show_default=True, help="Calibration batch size.")
@click.option("--providers", default="cpu", show_default=True,
              help="onnxruntime execution providers for calibration, e.g. cuda,cpu.")
@click.option("--sequential", is_flag=True,
              help="Calibrate level by level with earlier layers already pruned.")
@click.option("--damp", type=float, default=0.01, show_default=True,
              help="SparseGPT damping, as a fraction of the mean Hessian diagonal.")
@click.option("--block-size", type=int, default=128, show_default=True, help="SparseGPT block size.")
@click.option("--owl", is_flag=True, help="Outlier-weighed layerwise sparsity (unstructured only).")
@click.option("--owl-lambda", type=float, default=0.08, show_default=True,
              help="OWL: layer sparsities stay within S ± lambda.")
@click.option("--owl-m", type=float, default=5.0, show_default=True,
              help="OWL: a score above M times its layer's mean is an outlier.")
@click.option("--channels", type=float, metavar="R",
              help="Remove this fraction of the prunable channels (structured, global ranking).")
@click.option("--channels-per-layer-max", type=float, default=1.0, show_default=True,
              help="At most this fraction of any one layer's channels goes.")
@click.option("--channel-score", default="l1", show_default=True,
              help="Channel importance: l1, l2 (filter norms), bn (BatchNorm |gamma|), "
                   "act (calibrated activation x outgoing weights).")
@click.option("--round-to", type=int, default=1, show_default=True,
              help="Kept channel counts stay multiples of K (e.g. 8 for tensor cores).")
@click.option("--fold-bn/--no-fold-bn", default=None,
              help="Fold BatchNormalization into the preceding layer (default: on with --channels).")
@click.option("--recover", is_flag=True,
              help="Refit consumers on the kept channels by least squares (needs calibration).")
@click.option("--heads", type=float, metavar="R",
              help="Remove this fraction of attention heads (global ranking, one kept per layer).")
@click.option("--heads-per-layer", type=int, metavar="N", help="Keep exactly N heads in every layer.")
@click.option("--ffn", type=float, metavar="R", help="Remove this fraction of FFN neurons.")
@click.option("--tokens", type=float, metavar="KEEP",
              help="Token pruning: later layers keep the top ceil(KEEP*L) tokens plus the first.")
@click.option("--tokens-from", type=int, default=1, show_default=True, metavar="LAYER",
              help="Score tokens with this layer's attention (1-based); the layers after it run pruned.")
@click.option("--encode", default="auto", show_default=True,
              help="Blob encoding of pruned weights in weights.sparsec: auto (smallest per tensor), "
                   "none, or one of dense, bitmap, rle, coo, csr, csc, nm_hw, nm_rank.")
@click.option("--rle-bits", type=int, default=4, show_default=True, help="Run-length field width in bits.")
@click.option("--sparse-initializers", is_flag=True,
              help="Store pruned weights as ONNX sparse initializers (COO) in model.onnx.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime comparison with the dense model.")
@click.option("--force", is_flag=True, help="Overwrite the output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@user_errors
def compile_cmd(model: Path, output: Path | None, nm: str | None, sparsity: float | None,
                method: str, group: str, include: str | None, exclude: str | None,
                shapes: tuple[str, ...], nm_everywhere: bool, min_params: int, precision: str,
                calib: str | None, calib_random: int | None, calib_range: tuple[str, ...],
                calib_samples: int | None, batch: int, providers: str, sequential: bool, damp: float,
                block_size: int, owl: bool, owl_lambda: float, owl_m: float, channels: float | None,
                channels_per_layer_max: float, channel_score: str, round_to: int, fold_bn: bool | None,
                recover: bool, heads: float | None, heads_per_layer: int | None, ffn: float | None,
                tokens: float | None, tokens_from: int, encode: str, rle_bits: int,
                sparse_initializers: bool, quiet: bool,
                no_verify: bool, force: bool, as_json: bool, seed: int) -> None:
    """Prune MODEL and write OUTDIR/model.onnx and OUTDIR/report.json.

    \b
    Examples:
      sparsec compile model.onnx --nm 2:4 -o out/
      sparsec compile model.onnx --nm 4:8 --exclude 'lm_head' --precision fp16 -o out/
      sparsec compile model.onnx --sparsity 0.6 --shape input_ids=1,128 --json
      sparsec compile bert.onnx --nm 2:4 --method sparsegpt --calib calib.npz -o out/
      sparsec compile resnet.onnx --channels 0.3 --round-to 8 --channel-score bn -o out/
      sparsec compile bert.onnx --heads 0.25 --ffn 0.25 --calib calib.npz -o out/
      sparsec compile bert.onnx --tokens 0.7 --tokens-from 2 -o out/
      sparsec compile bert.onnx --sparsity 0.6 --method wanda --owl --calib-random 64 \
          --shape input_ids=1,128 --shape attention_mask=1,128 --calib-range input_ids=0,30522
    """
    report = api.compile(
        model, output=output, nm=nm, sparsity=sparsity, method=method, group=group,
        include=include, exclude=exclude, shapes=parse_shapes(shapes), verify=not no_verify,
        force=force, seed=seed, nm_everywhere=nm_everywhere, min_params=min_params,
        precision=precision, calib=calib, calib_random=calib_random,
        calib_range=parse_ranges(calib_range), calib_samples=calib_samples, batch=batch,
        providers=tuple(p for p in providers.split(",") if p), quiet=quiet or as_json,
        sequential=sequential, damp=damp, block_size=block_size, owl=owl, owl_lambda=owl_lambda,
        owl_m=owl_m, channels=channels, channels_per_layer_max=channels_per_layer_max,
        channel_score=channel_score, round_to=round_to, fold_bn=fold_bn, recover=recover,
        heads=heads, heads_per_layer=heads_per_layer, ffn=ffn, tokens=tokens, tokens_from=tokens_from,
        encode=encode, rle_bits=rle_bits, sparse_initializers=sparse_initializers,
    )
    click.echo(report.to_json() if as_json else summary_table(report))
    if report.nothing_pruned:
        click.echo(f"sparsec: {report.nothing_pruned}", err=True)


@cli.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--shape", "shapes", multiple=True, metavar="NAME=d0,d1|NAME:d0xd1",
              help="Fix an input's symbolic dims for MAC counts (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@user_errors
def inspect_cmd(model: Path, shapes: tuple[str, ...], as_json: bool) -> None:
    """List every prunable layer: op, weight, shape, reduction axis, params, MACs, and
    whether the weight already satisfies 2:4 / 4:8 on TensorRT's axis.

    \b
    Examples:
      sparsec inspect model.onnx
      sparsec inspect bert.onnx --shape input_ids=1,128 --shape attention_mask=1,128 --json
    """
    report = api.inspect(model, shapes=parse_shapes(shapes))
    click.echo(report.to_json() if as_json else inspect_table(report))


@cli.command("decode")
@click.argument("outdir", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Where to write the rebuilt model.")
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
