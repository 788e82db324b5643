"""Verification that does not mislead (issue 9, class 11): it runs on calibration samples when there are
some, respects --calib-range and --shape otherwise, says which symbolic dims it guessed, and flags a dense
output that is constant on its inputs instead of reading a meaningless cosine."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from cli_helpers import compile_cli
from onnx import TensorProto, helper, numpy_helper

import sparsec
from sparsec.runtime.verify import degenerate


def _save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, path)
    return str(path)


def _byte_model() -> onnx.ModelProto:
    """A byte classifier: int32 bytes -> Relu(x - 100) -> MatMul; on bytes in {0, 1} its output is zero."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(100.0, np.float32), "offset"),
             numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w")]
    nodes = [helper.make_node("Cast", ["bytes"], ["xf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Sub", ["xf", "offset"], ["xs"], name="sub"),
             helper.make_node("Relu", ["xs"], ["xr"], name="relu"),
             helper.make_node("MatMul", ["xr", "w"], ["logits"], name="dense")]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("bytes", TensorProto.INT32, ["N", 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 32])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _conv_model(shape: list) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32),
                                "w")
    conv = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")
    graph = helper.make_graph([conv], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, "E", "F"])],
                              [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_degenerate_outputs():
    assert degenerate(np.zeros(10)) == "is all zeros"
    assert degenerate(np.full(10, 3.5)) == "is constant (3.5)"
    assert degenerate(np.full(10, 3.5) + np.arange(10) * 1e-9) == "is constant (3.5)"  # std 2.9e-9 < 3.5e-6
    assert degenerate(np.linspace(0, 7e-6, 10)).startswith("is near zero everywhere")
    assert degenerate(np.array([], np.float32)) == "is empty"
    assert degenerate(np.linspace(-1, 1, 10)) is None


def test_integer_inputs_follow_calib_range_and_constant_outputs_are_flagged(tmp_path):
    model = _save(_byte_model(), tmp_path / "m.onnx")
    default = sparsec.compile(model, output=tmp_path / "a", sparsity=0.5, min_params=0)
    assert default.verify["informative"] is False  # bytes in {0, 1}: Relu(x - 100) is 0 everywhere
    assert "dense output logits is all zeros" in default.verify["reason"]
    ranged = sparsec.compile(model, output=tmp_path / "b", sparsity=0.5, min_params=0,
                             calib_range={"bytes": (0, 256)})
    assert ranged.verify["informative"] is True and "reason" not in ranged.verify
    assert "bytes in [0, 256)" in ranged.verify["source"]
    assert ranged.verify["outputs"][0]["max_abs_dense"] > 100.0  # real byte values went in
    assert 0.5 < ranged.verify["outputs"][0]["cosine"] < 1.0


def test_cli_summary_says_uninformative_and_exits_0(tmp_path):
    _save(_byte_model(), tmp_path / "m.onnx")
    result = compile_cli(tmp_path / "m.onnx",
                         "--sparsity", "0.5", "--min-params", "0", "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    assert "verify UNINFORMATIVE: dense output logits is all zeros" in result.stdout
    assert "no informative output" in result.stdout  # no cosine is quoted as a score


def test_calib_range_naming_no_input_is_refused_before_pruning(tmp_path):
    model = _save(_byte_model(), tmp_path / "m.onnx")
    with pytest.raises(sparsec.SparsecError, match="calib.range names ids, not a graph input"):
        sparsec.compile(model, output=tmp_path / "a", sparsity=0.5, calib_range={"ids": (0, 9)})
    assert not (tmp_path / "a").exists()


def test_verification_runs_on_calibration_samples(tmp_path):
    model = _save(_conv_model(["N", 3, "H", "W"]), tmp_path / "m.onnx")
    x = np.random.default_rng(3).standard_normal((12, 3, 9, 20)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    report = sparsec.compile(model, output=tmp_path / "out", sparsity=0.5, method="wanda", min_params=0,
                             calib=tmp_path / "c.npz", batch=4)
    v = report.verify
    assert v["source"].startswith("8 calibration samples from") and "assumed_dims" not in v
    assert v["inputs"] == {"x": [4, 3, 9, 20]}  # the samples' own size, not symbolic dims set to 1
    # the numbers are those of the first 8 samples
    from helpers import run

    dense = np.concatenate([run(_conv_model(["N", 3, "H", "W"]), {"x": x[i:i + 4]})[0] for i in (0, 4)])
    pruned = np.concatenate([run(str(tmp_path / "out" / "model.onnx"), {"x": x[i:i + 4]})[0] for i in (0, 4)])
    assert v["max_abs_diff"] == pytest.approx(float(np.abs(dense - pruned).max()), rel=1e-6)


def test_symbolic_dims_without_shape_are_said_loudly(tmp_path, caplog):
    model = _save(_conv_model(["N", 3, "H", "W"]), tmp_path / "m.onnx")
    with caplog.at_level(logging.WARNING, logger="sparsec"):
        guessed = sparsec.compile(model, output=tmp_path / "a", nm="2:4", min_params=0, nm_everywhere=True)
    assert guessed.verify["assumed_dims"] == {"x": [2, 3]}
    assert any("input x has symbolic dims 2, 3" in r.getMessage() for r in caplog.records)
    given = sparsec.compile(model, output=tmp_path / "b", nm="2:4", min_params=0, nm_everywhere=True,
                            shapes={"x": (2, 3, 9, 20)})
    assert "assumed_dims" not in given.verify and given.verify["inputs"] == {"x": [2, 3, 9, 20]}
    result = compile_cli(tmp_path / "m.onnx", "--nm", "2:4", "--min-params", "0", "--nm-everywhere",
                         "-o", tmp_path / "c", "-q")
    assert result.exit_code == 0 and "verify ASSUMED: input x dims 2, 3 set to 1" in result.stdout


def test_a_constant_side_output_is_named_but_does_not_void_the_verification(tmp_path):
    model = _byte_model()  # add the informative logits of ranged bytes and a side output that stays zero
    model.graph.output.append(helper.make_tensor_value_info("xr", TensorProto.FLOAT, ["N", 16]))
    model.graph.node[1].input[1] = "offset_big"
    model.graph.initializer.append(numpy_helper.from_array(np.array(1000.0, np.float32), "offset_big"))
    model.graph.node.insert(1, helper.make_node("Sub", ["xf", "offset"], ["xs2"], name="sub2"))
    model.graph.node[4].input[0] = "xs2"  # logits read x - 100; xr = Relu(x - 1000) is zero on bytes
    report = sparsec.compile(_save(model, tmp_path / "m.onnx"), output=tmp_path / "out", sparsity=0.5,
                             min_params=0, calib_range={"bytes": (0, 256)})
    v = report.verify
    assert v["informative"] is True and "reason" not in v
    assert v["uninformative_outputs"] == {"xr": "is all zeros"}
    from sparsec.core.report import summary_table

    text = summary_table(report)
    assert "verify: dense output xr is all zeros on these inputs; not counted in the cosine" in text
    logits = next(o for o in v["outputs"] if o["name"] == "logits")
    assert f"min output cosine {logits['cosine']:.4f}" in text
