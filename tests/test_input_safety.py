"""Inputs that must be refused before any work: external data outside the model's folder, declared
sizes that do not match, structurally invalid graphs (whatever --no-verify says), huge --shape; and
outputs that must stay well formed (strict JSON, error messages naming the user's paths)."""

from __future__ import annotations

import builtins
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_helpers import assert_failed_cleanly, compile_cli
from onnx import TensorProto, helper, numpy_helper

from sparsec.core.output import staged_dir
from sparsec.errors import SparsecError

F32 = TensorProto.FLOAT


def _matmul_model(w: np.ndarray | None = None) -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32) if w is None else w
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", F32, [1, w.shape[0]])],
        [helper.make_tensor_value_info("y", F32, [1, w.shape[1]])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _external(model_dir: Path, location: str, dims: tuple[int, ...] = (32, 32),
              length: int | None = None) -> Path:
    """A MatMul model whose weight W points at `location` (written by hand, as an attacker would)."""
    model = _matmul_model()
    w = model.graph.initializer[0]
    w.ClearField("raw_data")
    del w.dims[:]
    w.dims.extend(dims)
    w.data_location = TensorProto.EXTERNAL
    nbytes = int(np.prod(dims)) * 4 if length is None else length
    for key, value in (("location", location), ("offset", "0"), ("length", str(nbytes))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    path = model_dir / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside the model's folder, large enough to satisfy the declared tensor."""
    path = tmp_path / "secret.bin"
    path.write_bytes(b"S" * 8192)
    return path


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path opened through Python's open() during the test."""
    paths: list[str] = []
    real_open = builtins.open

    def spy(file, *args, **kwargs):
        paths.append(os.path.realpath(file) if isinstance(file, (str, os.PathLike)) else str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    return paths


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
@pytest.mark.parametrize("command", ["compile", "inspect"])
def test_external_data_outside_the_model_folder_is_refused_unread(
        tmp_path: Path, secret: Path, opened: list[str], kind: str, command: str) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    if kind == "symlink":
        (model_dir / "w.data").symlink_to(secret)
        location = "w.data"
    else:
        location = "../secret.bin" if kind == "dotdot" else str(secret)
    model = _external(model_dir, location)
    out = tmp_path / "out"
    if command == "compile":
        result = compile_cli(model, "--nm", "2:4", "--no-verify", "-o", out)
        line = assert_failed_cleanly(result, out, "'W'", "model's folder")
    else:
        from cli_helpers import assert_one_line_error, invoke

        line = assert_one_line_error(invoke("inspect", model), "'W'")
    assert "external data" in line
    assert str(secret.resolve()) not in opened


def test_declared_size_must_match_the_shape(tmp_path: Path) -> None:
    (tmp_path / "w.data").write_bytes(b"\0" * 4096)
    model = _external(tmp_path, "w.data", length=100)
    out = tmp_path / "out"
    assert_failed_cleanly(compile_cli(model, "--nm", "2:4", "-o", out), out, "'W'", "needs 4096")


def test_a_huge_declared_tensor_is_refused_before_reading(tmp_path: Path) -> None:
    """100k x 100k floats (40 GB) declared over a 4 KB file: refused from the file size, nothing read."""
    (tmp_path / "w.data").write_bytes(b"\0" * 4096)
    model = _external(tmp_path, "w.data", dims=(100_000, 100_000))
    out = tmp_path / "out"
    assert_failed_cleanly(compile_cli(model, "--nm", "2:4", "-o", out), out, "truncated")


def test_a_huge_shape_is_a_one_line_error(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(_matmul_model(), str(model))
    out = tmp_path / "out"
    assert_failed_cleanly(compile_cli(model, "--nm", "2:4", "--shape", "x=100000000000,32", "-o", out),
                          out, "--shape", "GiB")


def _invalid(kind: str) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", F32, [1, 32])
    y = helper.make_tensor_value_info("y", F32, [1, 32])
    w = numpy_helper.from_array(np.ones((32, 32), np.float32), "W")
    if kind == "cycle":
        nodes = [helper.make_node("MatMul", ["b", "W"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
                 helper.make_node("Add", ["x", "b"], ["y"])]
    else:
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Relu", ["x"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if kind == "no-opset":
        del model.opset_import[:]
        del model.graph.node[1]
    return model


@pytest.mark.parametrize("kind", ["cycle", "duplicate-producer", "no-opset"])
def test_invalid_graphs_are_refused_even_without_verify(tmp_path: Path, kind: str) -> None:
    model = tmp_path / "bad.onnx"
    model.write_bytes(_invalid(kind).SerializeToString())
    out = tmp_path / "out"
    assert_failed_cleanly(compile_cli(model, "--nm", "2:4", "--no-verify", "-o", out), out,
                          "not a valid ONNX model")


def test_report_is_strict_json_with_nan_weights(tmp_path: Path) -> None:
    w = np.random.default_rng(1).standard_normal((32, 32)).astype(np.float32)
    w[3, 5] = np.nan
    w[7, 1] = np.inf
    model = tmp_path / "nan.onnx"
    onnx.save(_matmul_model(w), str(model))
    out = tmp_path / "out"
    result = compile_cli(model, "--nm", "2:4", "-o", out)
    assert result.exit_code == 0, result.stderr

    def refuse(token: str) -> None:
        raise AssertionError(f"report.json holds {token}, which is not JSON")

    json.loads((out / "report.json").read_text(), parse_constant=refuse)


def test_errors_name_the_output_not_the_staging_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(SparsecError) as info, staged_dir(out, force=False) as tmp:
        raise SparsecError(f"cannot verify {tmp / 'model.onnx'}")
    assert str(out / "model.onnx") in str(info.value)
    assert ".tmp-" not in str(info.value)
    assert not out.exists()


def _nan_and_default_model(path: Path) -> Path:
    """mm reads a weight with NaN and Inf; mm2 reads W2, an initializer that is also a graph input."""
    w = np.random.default_rng(1).standard_normal((32, 32)).astype(np.float32)
    w[3, 5], w[7, 1] = np.nan, np.inf
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
         helper.make_node("MatMul", ["y", "W2"], ["z"], name="mm2")], "g",
        [helper.make_tensor_value_info("x", F32, [1, 32]),
         helper.make_tensor_value_info("W2", F32, [32, 32])],
        [helper.make_tensor_value_info("z", F32, [1, 32])],
        [numpy_helper.from_array(w, "W"),
         numpy_helper.from_array(np.random.default_rng(2).standard_normal((32, 32)).astype(np.float32),
                                 "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("options", [{"nm": "2:4"}, {"sparsity": 0.5}, {"nm": "2:4", "precision": "fp16"},
                                     {"nm": "2:4", "method": "wanda", "calib_random": 4},
                                     {"nm": "2:4", "method": "sparsegpt", "calib_random": 8},
                                     {"sparsity": 0.5, "method": "wanda", "owl": True, "calib_random": 4}])
def test_non_finite_weights_and_overridable_initializers_stay_dense_with_reasons(
        tmp_path: Path, options: dict) -> None:
    import sparsec

    model = _nan_and_default_model(tmp_path / "m.onnx")
    report = sparsec.compile(model, output=tmp_path / "out", force=True, **options)
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    assert "NaN" in reasons["mm"] and "graph input" in reasons["mm2"]
    written = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "out" / "model.onnx")
                                                                   ).graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(model)).graph.initializer}
    for name in ("W", "W2"):
        np.testing.assert_array_equal(written[name].astype(np.float32), original[name].astype(np.float16)
                                      .astype(np.float32) if "precision" in options else original[name])
    assert report.nothing_pruned and "NaN" in report.nothing_pruned
    assert report.verify["informative"] is False


def test_an_invalid_written_model_is_caught_even_without_verify(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """onnx's full check runs on every written model: a (simulated) writer bug that produces a
    graph reading an undefined tensor stops the compile, and nothing is moved into place."""
    import sparsec
    import sparsec.compiler as compiler

    real_save = compiler.save_model

    def broken_save(model, path, store, *, external):
        model.graph.node[0].input[1] = "nowhere"
        real_save(model, path, store, external=external)

    monkeypatch.setattr(compiler, "save_model", broken_save)
    model = tmp_path / "m.onnx"
    onnx.save(_matmul_model(), str(model))
    out = tmp_path / "out"
    with pytest.raises(SparsecError, match="sparsec wrote an invalid model"):
        sparsec.compile(model, output=out, nm="2:4", verify=False, min_params=0)
    assert not out.exists()
