"""Bad input to `sparsec compile` / `sparsec inspect`.

Every failure must be one `Error:` line on stderr, a non-zero exit, no OUTDIR and no staging
directory left behind, and the input model's bytes untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_helpers import (
    assert_failed_cleanly,
    assert_one_line_error,
    compile_cli,
    invoke,
    leftovers,
    sha256,
)
from onnx import TensorProto, helper, numpy_helper

from models import example_path

# --------------------------------------------------------------------------- helpers














def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def make_model(nodes, inits, inputs, outputs, *, domains: tuple[str, ...] = ()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 17)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def weight(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    rng = np.random.default_rng(0)
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


F32 = TensorProto.FLOAT


@pytest.fixture
def example(tmp_path: Path) -> Path:
    path = tmp_path / "example.onnx"
    shutil.copyfile(example_path(), path)
    return path


# --------------------------------------------------------------------------- the model file


def _missing(d: Path) -> Path:
    return d / "missing.onnx"


def _directory(d: Path) -> Path:
    (d / "adir.onnx").mkdir()
    return d / "adir.onnx"


def _text(d: Path) -> Path:
    path = d / "notes.onnx"
    path.write_text("this is not an onnx model\njust some text\n")
    return path


def _text_txt(d: Path) -> Path:
    path = d / "readme.txt"
    path.write_text("hello\n")
    return path


def _empty(d: Path) -> Path:
    path = d / "empty.onnx"
    path.write_bytes(b"")
    return path


def _truncated(d: Path) -> Path:
    data = example_path().read_bytes()
    path = d / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    return path


BAD_FILES: dict[str, Callable[[Path], Path]] = {
    "missing": _missing,
    "directory": _directory,
    "text": _text,
    "text-txt": _text_txt,
    "empty": _empty,
    "truncated": _truncated,
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_compile_bad_model_file_default_outdir(tmp_path: Path, kind: str):
    model = BAD_FILES[kind](tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = compile_cli(model, "--nm", "2:4")
    out = model.with_name(f"{model.stem}_sparse")
    assert_failed_cleanly(result, out, model.name)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("kind", BAD_FILES)
def test_compile_bad_model_file_explicit_outdir(tmp_path: Path, kind: str):
    model = BAD_FILES[kind](tmp_path)
    out = tmp_path / "out"
    assert_failed_cleanly(compile_cli(model, "--sparsity", "0.5", "-o", out, "--force"), out, model.name)


@pytest.mark.parametrize("kind", BAD_FILES)
def test_inspect_bad_model_file(tmp_path: Path, kind: str):
    model = BAD_FILES[kind](tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_one_line_error(invoke("inspect", model), model.name)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_missing_and_directory_messages_differ(tmp_path: Path):
    missing = assert_one_line_error(invoke("inspect", _missing(tmp_path)))
    directory = assert_one_line_error(invoke("inspect", _directory(tmp_path)))
    assert "not found" in missing
    assert "not a file" in directory


def _corrupt_tensor_model(d: Path) -> Path:
    """Parses as ONNX, but an initializer's raw_data is shorter than its dims say."""
    w = weight("W", (32, 32))
    w.raw_data = w.raw_data[:100]
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [w],
                       [helper.make_tensor_value_info("x", F32, [1, 32])],
                       [helper.make_tensor_value_info("y", F32, [1, 32])])
    return save(model, d / "corrupt.onnx")


def test_compile_corrupt_tensor_data(tmp_path: Path):
    model = _corrupt_tensor_model(tmp_path)
    out = tmp_path / "out"
    assert_failed_cleanly(compile_cli(model, "--nm", "2:4", "-o", out), out)


def test_inspect_corrupt_tensor_data(tmp_path: Path):
    assert_one_line_error(invoke("inspect", _corrupt_tensor_model(tmp_path)), "tensor name: W")


def _missing_external_data_model(d: Path) -> Path:
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [weight("W", (32, 32))],
                       [helper.make_tensor_value_info("x", F32, [1, 32])],
                       [helper.make_tensor_value_info("y", F32, [1, 32])])
    path = d / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="ext.onnx.data",
                    size_threshold=0)
    (d / "ext.onnx.data").unlink()
    return path


@pytest.mark.parametrize("command", ["compile", "inspect"])
def test_missing_external_data(tmp_path: Path, command: str):
    model = _missing_external_data_model(tmp_path)
    out = tmp_path / "out"
    args = ["--nm", "2:4", "-o", out] if command == "compile" else []
    assert_failed_cleanly(invoke(command, model, *args), out, "ext.onnx")


# --------------------------------------------------------------------------- pattern options


@pytest.mark.parametrize("args, needles", [
    (["--nm", "3:2"], ["--nm", "3:2"]),
    (["--nm", "0:4"], ["--nm", "0:4"]),
    (["--nm", "a:b"], ["--nm", "a:b"]),
    (["--nm", "4:4"], ["--nm"]),
    (["--nm", "2:4:8"], ["--nm"]),
    (["--nm", "2"], ["--nm"]),
    (["--nm", "2:128"], ["--nm"]),
    (["--sparsity", "1.5"], ["--sparsity", "1.5"]),
    (["--sparsity", "nan"], ["--sparsity"]),
    (["--sparsity", "inf"], ["--sparsity"]),
])
def test_bad_pattern_option(example: Path, tmp_path: Path, args: list[str], needles: list[str]):
    out = tmp_path / "out"
    result = compile_cli(example, *args, "-o", out)
    assert_failed_cleanly(result, out, *needles)
    assert result.exit_code == 2


@pytest.mark.parametrize("args", [["--nm", "3:2"], ["--sparsity", "1.5"]])
def test_bad_pattern_option_default_outdir(example: Path, args: list[str]):
    out = example.with_name("example_sparse")
    assert_failed_cleanly(compile_cli(example, *args), out)


# --------------------------------------------------------------------------- no prunable layer


def _relu_only(d: Path) -> Path:
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [],
                       [helper.make_tensor_value_info("x", F32, [1, 8])],
                       [helper.make_tensor_value_info("y", F32, [1, 8])])
    onnx.checker.check_model(model, full_check=True)
    return save(model, d / "relu.onnx")


@pytest.mark.parametrize("pattern", [["--nm", "2:4"], ["--sparsity", "0.5"]])
def test_no_prunable_layer_succeeds_and_says_so(tmp_path: Path, pattern: list[str]):
    model = _relu_only(tmp_path)
    result = compile_cli(model, *pattern)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 0, result.stderr
    assert "pruned 0/0 layers" in result.stdout
    out = tmp_path / "relu_sparse"
    report = json.loads((out / "report.json").read_text())
    assert report["layers"] == []
    assert report["totals"]["layers_pruned"] == 0
    assert report["verify"]["max_abs_diff"] == 0.0
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))


def test_no_prunable_layer_json(tmp_path: Path):
    model = _relu_only(tmp_path)
    result = compile_cli(model, "--nm", "2:4", "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["layers"] == [] and report["totals"]["params"] == 0


def test_all_layers_excluded_succeeds(example: Path, tmp_path: Path):
    result = compile_cli(example, "--nm", "2:4", "--exclude", ".", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert "pruned 0/5 layers" in result.stdout


# --------------------------------------------------------------------------- OUTDIR problems


def test_outdir_exists_without_force(example: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = compile_cli(example, "--nm", "2:4", "-o", out)
    assert_one_line_error(result, "already exists", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert leftovers(out) == []


def test_default_outdir_exists_without_force(example: Path):
    out = example.with_name("example_sparse")
    out.mkdir()
    assert_one_line_error(compile_cli(example, "--nm", "2:4"), "already exists")
    assert list(out.iterdir()) == []
    assert leftovers(out) == []


def test_outdir_is_a_file(example: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.write_text("a file")
    for extra in ([], ["--force"]):
        assert_one_line_error(compile_cli(example, "--nm", "2:4", "-o", out, *extra), "not a directory")
        assert out.read_text() == "a file"
        assert leftovers(out) == []


def test_outdir_parent_missing(example: Path, tmp_path: Path):
    out = tmp_path / "no" / "such" / "out"
    assert_failed_cleanly(compile_cli(example, "--nm", "2:4", "-o", out), out, "does not exist")
    assert not (tmp_path / "no").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root ignores directory permissions; see the root-proof variants below")
def test_outdir_in_read_only_parent(example: Path, tmp_path: Path):
    parent = tmp_path / "ro"
    parent.mkdir()
    out = parent / "out"
    parent.chmod(0o555)
    try:
        assert_failed_cleanly(compile_cli(example, "--nm", "2:4", "-o", out), out, str(out))
    finally:
        parent.chmod(0o755)
    assert list(parent.iterdir()) == []


def test_outdir_parent_is_a_regular_file(example: Path, tmp_path: Path):
    """Unwritable for root too: nothing can be created below a regular file."""
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = blocker / "out"
    assert_one_line_error(compile_cli(example, "--nm", "2:4", "-o", out), str(out))
    assert blocker.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "example.onnx"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_outdir_on_a_filesystem_nobody_can_write(example: Path):
    """/proc refuses new directories even for root, so this fails only at the staging step."""
    out = Path("/proc") / f"sparsec-test-{os.getpid()}"
    assert_failed_cleanly(compile_cli(example, "--nm", "2:4", "-o", out, "--no-verify"), out, str(out))


# --------------------------------------------------------------------------- failures after staging


def _unrunnable_custom_op(d: Path) -> Path:
    """Loads and prunes, but onnxruntime cannot run it: verification fails after staging."""
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
         helper.make_node("Foo", ["h"], ["y"], name="foo", domain="com.example")],
        [weight("W", (32, 32))],
        [helper.make_tensor_value_info("x", F32, [1, 32])],
        [helper.make_tensor_value_info("y", F32, [1, 32])],
        domains=("com.example",),
    )
    return save(model, d / "custom.onnx")


def _string_input(d: Path) -> Path:
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
         helper.make_node("Identity", ["s"], ["s2"], name="id")],
        [weight("W", (32, 32))],
        [helper.make_tensor_value_info("x", F32, [1, 32]),
         helper.make_tensor_value_info("s", TensorProto.STRING, [1])],
        [helper.make_tensor_value_info("y", F32, [1, 32]),
         helper.make_tensor_value_info("s2", TensorProto.STRING, [1])],
    )
    return save(model, d / "strings.onnx")


@pytest.mark.parametrize("build", [_unrunnable_custom_op, _string_input])
def test_verification_failure_leaves_nothing(tmp_path: Path, build: Callable[[Path], Path]):
    model = build(tmp_path)
    out = tmp_path / "out"
    assert_failed_cleanly(compile_cli(model, "--nm", "2:4", "-o", out), out)
    # the same failure with --force must keep the previous OUTDIR intact
    out.mkdir()
    (out / "previous.txt").write_text("keep")
    assert_one_line_error(compile_cli(model, "--nm", "2:4", "-o", out, "--force"))
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"]
    assert leftovers(out) == []


def test_verification_failure_is_avoidable_with_no_verify(tmp_path: Path):
    model = _unrunnable_custom_op(tmp_path)
    out = tmp_path / "out"
    result = compile_cli(model, "--nm", "2:4", "-o", out, "--no-verify")
    assert result.exit_code == 0, result.stderr
    assert (out / "model.onnx").is_file()


# --------------------------------------------------------------------------- the input is never touched


def test_force_into_the_inputs_own_directory_keeps_the_input(tmp_path: Path):
    folder = tmp_path / "models"
    folder.mkdir()
    model = folder / "model.onnx"
    shutil.copyfile(example_path(), model)
    digest = sha256(model)
    result = invoke("compile", model, "--nm", "2:4", "-o", folder, "--force")
    assert model.is_file() and sha256(model) == digest
    if result.exit_code != 0:  # refusing is fine, as one line
        assert_one_line_error(result)
