"""The Python API that the CLI is a thin layer over."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsec.compiler import compile_model
from sparsec.core.report import Report
from sparsec.encoding.blobs import restore_to
from sparsec.errors import api_errors
from sparsec.inspection import InspectReport, inspect_model
from sparsec.recipes import STAGE_NAMES, options_doc, options_from
from sparsec.recipes.policy_step import sensitivity_report
from sparsec.recipes.recipe_file import read_recipe


@api_errors
def compile(  # noqa: A001 - the natural name for a compiler's entry point
    model: str | Path,
    *,
    output: str | Path | None = None,
    recipe: str | Path | None = None,
    **options: Any,
) -> Report:
    """Prune an ONNX model and write OUTDIR/model.onnx, OUTDIR/report.json and OUTDIR/recipe.yaml.

    `recipe` is a recipe file (YAML; every compile writes the one it ran to OUTDIR/recipe.yaml);
    keyword options override its values. `calib` is a .npz file, a directory of .npy/.npz files, or a
    reader object with `get_next()` returning a feed dict or None (onnxruntime's CalibrationDataReader).
    An unknown keyword is a SparsecError naming it.

    Example:
        report = sparsec.compile("model.onnx", nm="2:4", output="out/")
        report = sparsec.compile("bert.onnx", heads=0.25, ffn=0.25, nm="2:4", method="sparsegpt",
                                 calib="calib.npz")
        print(report.totals["sparsity"], report.verify["max_abs_diff"])

    Keyword options, by recipe stage (stages run in this order):
    """
    values = read_recipe(recipe, STAGE_NAMES) if recipe is not None else {}
    values |= options
    values.setdefault("quiet", True)
    return compile_model(model, options_from(values), output)


compile.__doc__ = (compile.__doc__ or "") + "\n" + options_doc() + "\n"


@api_errors
def decode(outdir: str | Path, output: str | Path) -> Path:
    """Rebuild OUTDIR/model.onnx from OUTDIR/skeleton.onnx and OUTDIR/weights.sparsec."""
    return restore_to(outdir, output)


@api_errors
def sensitivity(model: str | Path, **options: Any) -> dict:
    """Per-layer sensitivity without pruning (`sparsec inspect --sensitivity`): each prunable weight
    pruned alone with `nm`/`sparsity` and `method`, its output cosine similarity on the held-back last
    quarter of the calibration data; with `min_similarity`, also which layers a compile would prune."""
    options.setdefault("quiet", True)
    return sensitivity_report(model, options_from(options))


@api_errors
def inspect(model: str | Path, *, shapes: dict[str, tuple[int, ...]] | None = None) -> InspectReport:
    """List every prunable layer with its cost and whether it already holds 2:4 / 4:8."""
    return inspect_model(model, shapes)
