"""Recipe files: OUTDIR/recipe.yaml reproduces a compile; a stage, key or option that does not apply is
one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cli_helpers import assert_one_line_error, compile_cli

import sparsec
from models import example_path


def ok(result):
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("args", [
    ("--channels", "0.3", "--nm", "2:4"),
    ("--fold-bn", "--nm", "2:4", "--precision", "fp16", "--encode", "bitmap"),
])
def test_recipe_round_trip_gives_identical_bytes(tmp_path: Path, args):
    first, second = tmp_path / "a", tmp_path / "b"
    ok(compile_cli(example_path(), *args, "--seed", "3", "-o", first))
    recipe = yaml.safe_load((first / "recipe.yaml").read_text())
    assert recipe == json.loads((first / "report.json").read_text())["recipe"]
    ok(compile_cli(example_path(), "--recipe", first / "recipe.yaml", "-o", second))
    assert (first / "model.onnx").read_bytes() == (second / "model.onnx").read_bytes()
    again = json.loads((second / "report.json").read_text())
    assert again["options"] == json.loads((first / "report.json").read_text())["options"]
    assert again["options"]["seed"] == 3


def test_flags_override_the_recipe(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- weights: {nm: '2:4', min_params: 0}\n")
    report = sparsec.compile(example_path(), output=tmp_path / "o", recipe=recipe, nm="4:8")
    assert report.options["nm"] == "4:8" and report.options["min_params"] == 0


def test_fold_bn_stage_without_options_folds(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - fold-bn\n  - weights: {nm: '2:4'}\nsettings: {seed: 1}\n")
    report = sparsec.compile(example_path(), output=tmp_path / "o", recipe=recipe)
    assert [s["name"] for s in report.steps] == ["fold-bn", "weights", "encode"]


@pytest.mark.parametrize(("text", "needles"), [
    ("- prune: {nm: '2:4'}\n", ("unknown stage 'prune'", "weights")),
    ("- weights: {nmm: '2:4'}\n", ("option 'nmm' does not apply to 'weights'", "no such option")),
    ("- weights: {channels: 0.3}\n", ("option 'channels' does not apply to 'weights'",
                                      "belongs to stage 'channels'")),
    ("- weights: {nm: '2:4'}\n- channels: {channels: 0.3}\n", ("stage 'channels' is out of order",)),
    ("stages: []\nsetings: {}\n", ("unknown key 'setings'",)),
    ("settings: {nm: '2:4'}\n", ("option 'nm' does not apply to 'settings'",)),
    ("- weights: [1, 2]\n", ("options of 'weights' must be a mapping",)),
    ("- weights: {nm: '5:4'}\n", ("need 1 <= N < M",)),
    ("stages: [\n", ("is not valid YAML",)),
])
def test_recipe_errors_are_one_line_naming_it(tmp_path: Path, text, needles):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    line = assert_one_line_error(compile_cli(example_path(), "--recipe", recipe, "-o", tmp_path / "o"),
                                 *needles)
    assert "--recipe" in line or "--nm" in line
    assert not (tmp_path / "o").exists()


def test_missing_recipe_file(tmp_path: Path):
    assert_one_line_error(compile_cli(example_path(), "--recipe", tmp_path / "nope.yaml"), "file not found")
    with pytest.raises(sparsec.SparsecError, match="recipe="):
        sparsec.compile(example_path(), recipe=tmp_path / "nope.yaml")
