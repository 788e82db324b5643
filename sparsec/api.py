"""The Python API that the CLI is a thin layer over."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsec.compiler import compile_model
from sparsec.core.options import CompileOptions, NMPattern
from sparsec.core.report import Report
from sparsec.encoding.blobs import restore
from sparsec.errors import api_errors
from sparsec.inspection import InspectReport, inspect_model


@api_errors
def compile(  # noqa: A001 - the natural name for a compiler's entry point
    model: str | Path,
    *,
    output: str | Path | None = None,
    nm: str | None = None,
    sparsity: float | None = None,
    method: str = "magnitude",
    group: str = "output",
    include: str | None = None,
    exclude: str | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    verify: bool = True,
    force: bool = False,
    seed: int = 0,
    nm_everywhere: bool = False,
    min_params: int = 256,
    precision: str = "fp32",
    calib: Any = None,
    calib_random: int | None = None,
    calib_range: dict[str, tuple[float, float]] | None = None,
    calib_samples: int | None = None,
    batch: int = 8,
    providers: tuple[str, ...] | list[str] = ("cpu",),
    quiet: bool = True,
    sequential: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    owl: bool = False,
    owl_lambda: float = 0.08,
    owl_m: float = 5.0,
    channels: float | None = None,
    channels_per_layer_max: float = 1.0,
    channel_score: str = "l1",
    round_to: int = 1,
    fold_bn: bool | None = None,
    recover: bool = False,
    heads: float | None = None,
    heads_per_layer: int | None = None,
    ffn: float | None = None,
    tokens: float | None = None,
    tokens_from: int = 1,
    encode: str = "auto",
    rle_bits: int = 4,
    sparse_initializers: bool = False,
) -> Report:
    """Prune an ONNX model and write OUTDIR/model.onnx and OUTDIR/report.json.

    `calib` is a .npz file, a directory of .npy/.npz files, or a reader object with
    `get_next()` returning a feed dict or None (onnxruntime's CalibrationDataReader).

    Example:
        report = sparsec.compile("model.onnx", nm="2:4", output="out/")
        report = sparsec.compile("bert.onnx", nm="2:4", method="sparsegpt", calib="calib.npz")
        print(report.totals["sparsity"], report.verify["max_abs_diff"])
    """
    options = CompileOptions(
        nm=NMPattern.parse(nm) if nm is not None else None,
        sparsity=sparsity, method=method, group=group, include=include, exclude=exclude,
        shapes=dict(shapes or {}), verify=verify, force=force, seed=seed,
        nm_everywhere=nm_everywhere, min_params=min_params, precision=precision,
        calib=calib, calib_random=calib_random, calib_range=dict(calib_range or {}),
        calib_samples=calib_samples, batch=batch, providers=tuple(providers), quiet=quiet,
        sequential=sequential, damp=damp, block_size=block_size, owl=owl, owl_lambda=owl_lambda,
        owl_m=owl_m, channels=channels, channels_per_layer_max=channels_per_layer_max,
        channel_score=channel_score, round_to=round_to, fold_bn=fold_bn, recover=recover,
        heads=heads, heads_per_layer=heads_per_layer, ffn=ffn, tokens=tokens, tokens_from=tokens_from,
        encode=encode, rle_bits=rle_bits, sparse_initializers=sparse_initializers,
    )
    return compile_model(model, options, output)


@api_errors
def decode(outdir: str | Path, output: str | Path) -> Path:
    """Rebuild OUTDIR/model.onnx from OUTDIR/skeleton.onnx and OUTDIR/weights.sparsec."""
    model = restore(outdir)
    out = Path(output)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(model.SerializeToString())
    tmp.replace(out)
    return out


@api_errors
def inspect(model: str | Path, *, shapes: dict[str, tuple[int, ...]] | None = None) -> InspectReport:
    """List every prunable layer with its cost and whether it already holds 2:4 / 4:8."""
    return inspect_model(model, shapes)
