"""Compile edge cases: control flow, BatchNorm folding alone and before N:M, --force, Ctrl-C,
output modes, API wording of errors, onnxruntime's own log lines."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_helpers import assert_one_line_error, compile_cli, invoke
from helpers import initializers
from onnx import TensorProto, helper, numpy_helper

import sparsec
from models import GOLDEN
from sparsec.errors import SparsecError

ROOT = Path(__file__).resolve().parents[1]


def control_flow_model() -> onnx.ModelProto:
    """MatMul -> If(sr == 16000) with a MatMul in each branch (own weight / outer-scope weight) -> Gemm."""
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    def branch(name: str, w: str, inits: list) -> onnx.GraphProto:
        out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1, 32])
        return helper.make_graph([helper.make_node("MatMul", ["r", w], [f"{name}_out"], f"{name}_mm")], name,
                                 [], [out], inits)

    then, other = branch("then", "w_then", [weight("w_then", 32, 32)]), branch("else", "w_outer", [])
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], "mm0"),
             helper.make_node("Relu", ["h"], ["r"], "relu"),
             helper.make_node("Equal", ["sr", "rate"], ["cond"], "eq"),
             helper.make_node("If", ["cond"], ["b"], "branch", then_branch=then, else_branch=other),
             helper.make_node("Gemm", ["b", "w2"], ["y"], "fc")]
    inits = [weight("w0", 32, 32), weight("w_outer", 32, 32), weight("w2", 32, 16),
             numpy_helper.from_array(np.array(16000, np.int64), "rate")]
    graph = helper.make_graph(nodes, "cf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32]),
                                            helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def cf_path(tmp_path: Path) -> Path:
    path = tmp_path / "cf.onnx"
    onnx.save(control_flow_model(), path)
    return path


@pytest.fixture
def resnet_path(tmp_path: Path) -> Path:
    path = tmp_path / "resnet.onnx"
    onnx.save(GOLDEN["resnet"](), path)
    return path


# --- 10: control flow ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"nm": "2:4"},
    {"nm": "2:4", "method": "wanda", "calib_random": 4},  # rank-0 int input through calibration
    {"sparsity": 0.5, "method": "sparsegpt", "calib_random": 8, "sequential": True},
    {"channels": 0.25, "channel_score": "act", "calib_random": 4},
])
def test_control_flow_compiles_and_lists_subgraph_layers(cf_path: Path, tmp_path: Path,
                                                         kwargs: dict) -> None:
    report = sparsec.compile(cf_path, output=tmp_path / "out", min_params=16, **kwargs)
    assert report.verify is not None and np.isfinite(report.verify["max_abs_diff"])
    inner = {s["name"]: s for s in report.skipped if "subgraph" in s["reason"]}
    if "channels" in kwargs:  # mm0's channels are read inside the If: its group stays whole
        assert set(inner) == {"mm0"}
        return
    assert set(inner) == {"branch/then_mm", "branch/else_mm"}
    assert inner["branch/then_mm"]["weight"] == "w_then" and inner["branch/else_mm"]["weight"] == "w_outer"
    out = onnx.load(tmp_path / "out" / "model.onnx")
    branches = {a.name: a.g for a in next(n for n in out.graph.node if n.op_type == "If").attribute}
    assert initializers(out)["w_outer"].tolist() == initializers(onnx.load(cf_path))["w_outer"].tolist()
    assert np.count_nonzero(numpy_helper.to_array(branches["then_branch"].initializer[0])) == 32 * 32


def test_verify_failure_is_one_line_naming_the_node(cf_path: Path, tmp_path: Path) -> None:
    bad = control_flow_model()  # a Reshape the random inputs cannot satisfy, behind the If
    bad.graph.initializer.append(numpy_helper.from_array(np.array([5, 7], np.int64), "bad_shape"))
    bad.graph.node.append(helper.make_node("Reshape", ["y", "bad_shape"], ["z"], "bad_reshape"))
    bad.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, [5, 7]))
    onnx.save(bad, tmp_path / "bad.onnx")
    result = compile_cli(tmp_path / "bad.onnx", "--nm", "2:4", "-o", tmp_path / "o", "--min-params", "16")
    line = assert_one_line_error(result, "bad_reshape", "--shape")
    assert "onnxruntime:" not in result.stderr.replace(line, "")


# --- 13: BatchNorm folding ----------------------------------------------------------------------

def test_fold_bn_alone_is_a_compile(resnet_path: Path, tmp_path: Path) -> None:
    bns = sum(n.op_type == "BatchNormalization" for n in onnx.load(resnet_path).graph.node)
    assert bns > 0
    report = sparsec.compile(resnet_path, fold_bn=True, output=tmp_path / "out")
    out = onnx.load(tmp_path / "out" / "model.onnx")
    assert not any(n.op_type == "BatchNormalization" for n in out.graph.node)
    fold = next(p for p in report.passes if p["name"] == "fold-bn")
    assert len(fold["folded"]) == bns and fold["kept"] == []
    for o in report.verify["outputs"]:
        assert o["max_abs_diff"] <= 1e-5 * max(o["max_abs_dense"], 1.0)
    assert report.totals["layers_pruned"] == 0 and report.encoding == {
        "skipped": "no weight was pruned (--fold-bn only)"}


def test_fold_bn_then_nm_pattern_holds_on_folded_weights(resnet_path: Path, tmp_path: Path) -> None:
    report = sparsec.compile(resnet_path, nm="2:4", fold_bn=True, output=tmp_path / "out")
    assert [p["name"] for p in report.passes][:2] == ["fold-bn", "prune-weights"]
    out = onnx.load(tmp_path / "out" / "model.onnx")
    assert not any(n.op_type == "BatchNormalization" for n in out.graph.node)
    weights = initializers(out)
    pruned = [la for la in report.layers if la.skipped_reason is None]
    assert pruned
    for la in pruned:
        w = np.moveaxis(weights[la.weight], la.reduction_axis, -1)
        groups = w.reshape(*w.shape[:-1], -1, 4)
        assert (np.count_nonzero(groups, axis=-1) <= 2).all(), la.name
    # the folded weights are the ones pruned: a kept weight is α·W of the dense one, never raw W
    dense = initializers(onnx.load(resnet_path))
    conv = next(la for la in pruned if la.op == "Conv")
    kept = weights[conv.weight] != 0
    assert not np.allclose(weights[conv.weight][kept], dense[conv.weight][kept])


def test_nothing_to_do_names_fold_bn(resnet_path: Path, tmp_path: Path) -> None:
    with pytest.raises(SparsecError, match="fold_bn=True"):
        sparsec.compile(resnet_path, output=tmp_path / "out")


# --- 15: --force --------------------------------------------------------------------------------

def test_force_refuses_a_directory_sparsec_did_not_write(resnet_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    result = compile_cli(resnet_path, "--nm", "2:4", "-o", out, "--force")
    assert_one_line_error(result, str(out), "not written by sparsec")
    assert (out / "thesis.tex").read_text() == "mine"


def test_force_refuses_a_foreign_file_in_a_sparsec_directory(resnet_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    sparsec.compile(resnet_path, nm="2:4", output=out)
    (out / "notes.txt").write_text("mine")
    result = compile_cli(resnet_path, "--nm", "2:4", "-o", out, "--force")
    assert_one_line_error(result, "notes.txt", "not written by sparsec")
    assert (out / "notes.txt").read_text() == "mine"


def test_force_replaces_sparsec_output(resnet_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    sparsec.compile(resnet_path, nm="2:4", output=out)
    (out / "model.engine").write_bytes(b"engine")  # `sparsec engine` output beside the model
    report = sparsec.compile(resnet_path, sparsity=0.5, output=out, force=True)
    assert json.loads((out / "report.json").read_text())["options"]["sparsity"] == 0.5
    assert report.options["sparsity"] == 0.5 and not (out / "model.engine").exists()


# --- 16: small ones -----------------------------------------------------------------------------

def test_ctrl_c_exits_130(resnet_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sparsec.api, "compile", interrupted)
    result = invoke("compile", resnet_path, "--nm", "2:4", "-o", tmp_path / "out")
    assert result.exit_code == 130
    assert "Traceback" not in result.stderr


def test_container_gets_the_mode_of_the_other_outputs(resnet_path: Path, tmp_path: Path) -> None:
    sparsec.compile(resnet_path, nm="2:4", output=tmp_path / "out")
    modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes["weights.sparsec"] == modes["model.onnx"] == modes["report.json"], modes


def test_api_errors_name_keywords_cli_errors_name_flags(resnet_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SparsecError) as info:
        sparsec.compile(resnet_path, nm="2:4", output=out)
    assert "force=True" in str(info.value) and "--" not in str(info.value)
    with pytest.raises(SparsecError, match=r"^sparsity=1.5 is out of range"):
        sparsec.compile(resnet_path, sparsity=1.5, output=tmp_path / "o2")
    assert_one_line_error(compile_cli(resnet_path, "--nm", "2:4", "-o", out), "--force")


def test_onnxruntime_logs_stay_quiet(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    from sparsec.runtime.session import make_session, run_checked

    graph = helper.make_graph(  # an unused initializer (graph.cc warning) and a Reshape that fails
        [helper.make_node("Reshape", ["x", "shape"], ["y"], "reshape")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones(3, np.float32), "unused"),
         numpy_helper.from_array(np.array([3], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    session = make_session(tmp_path / "m.onnx")
    with pytest.raises(SparsecError, match="Reshape node reshape"):
        run_checked(session, None, {"x": np.ones((1, 4), np.float32)})
    assert "onnxruntime" not in capfd.readouterr().err


def test_no_profiler_dumps_committed() -> None:
    assert not list(ROOT.glob("onnxruntime_profile_*.json"))
    assert "onnxruntime_profile_*.json" in (ROOT / ".gitignore").read_text().split()
