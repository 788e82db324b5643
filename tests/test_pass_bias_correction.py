"""Bias correction (the correct stage): each pruned layer gets back the dense per-channel output mean on
the calibration data, folded into its bias (Conv B, Gemm C, the Add after a MatMul, or a new one)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import graph_lines, initializers, run
from onnx import helper
from pass_helpers import make_model

import sparsec
from sparsec.errors import SparsecError


def _calib(tmp_path, shape, seed=1, mean=1.0):
    x = (np.random.default_rng(seed).standard_normal(shape) + mean).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    return x


def _compile(tmp_path, model, out="out", **kw):
    onnx.save(model, tmp_path / "m.onnx")
    return sparsec.compile(tmp_path / "m.onnx", output=tmp_path / out, nm="2:4", calib=tmp_path / "calib.npz",
                           min_params=0, force=True, quiet=True, **kw)


def _linear():
    """x [N, 16] → MatMul(w) → Add(b) → y: one linear layer, its bias in the Add after it."""
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((16, 8)), "b": rng.standard_normal(8) * 0.1}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], "fc"),
             helper.make_node("Add", ["h", "b"], ["y"], "bias")]
    return make_model(nodes, {"x": ("N", 16)}, ["y"], inits)


def test_linear_model_mean_exact_in_expectation(tmp_path):
    model = _linear()
    x = _calib(tmp_path, (64, 16))
    dense_mean = run(model, {"x": x})[0].astype(np.float64).mean(0)
    _compile(tmp_path, model, "plain", bias_correct=False)  # on by default with calibration data
    plain_mean = run(str(tmp_path / "plain" / "model.onnx"), {"x": x})[0].mean(0)
    assert np.abs(plain_mean - dense_mean).max() > 0.1  # pruning alone moves the mean
    report = _compile(tmp_path, model, bias_correct=True).as_dict()
    out = tmp_path / "out" / "model.onnx"
    np.testing.assert_allclose(run(str(out), {"x": x})[0].astype(np.float64).mean(0), dense_mean,
                               rtol=1e-5, atol=1e-5)
    # the shift is (W − Ŵ)ᵀ·E[X], folded into the Add's constant; the pruned weight keeps its 2:4 zeros
    w, w_hat = initializers(model)["w"], initializers(onnx.load(out))["w"]
    b, b_hat = initializers(model)["b"], initializers(onnx.load(out))["b"]
    np.testing.assert_allclose(b_hat - b, x.astype(np.float64).mean(0) @ (w - w_hat), rtol=1e-4, atol=1e-5)
    assert (w_hat.reshape(4, 4, 8) != 0).sum(1).max() <= 2
    step = next(s for s in report["steps"] if s["name"] == "correct")
    assert [s["name"] for s in report["steps"]][:2] == ["weights", "correct"]
    assert step["modified"] and step["layers"][0]["layer"] == "fc" and step["layers"][0]["where"] == "add"
    assert step["layers"][0]["shift_norm"] == pytest.approx(np.linalg.norm(b_hat - b), rel=1e-4)
    assert step["oracle"]["max_mean_gap"] < 1e-5


def test_conv_with_padding_gets_a_bias_matching_the_mean(tmp_path):
    """Zero padding: border pixels see fewer inputs; the bias holds the exact average shift per channel."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], "conv", pads=[1, 1, 1, 1])]
    model = make_model(nodes, {"x": ("N", 8, 6, 6)}, ["y"], {"w": rng.standard_normal((4, 8, 3, 3))})
    x = _calib(tmp_path, (16, 8, 6, 6), mean=0.7)
    report = _compile(tmp_path, model, bias_correct=True).as_dict()
    out = onnx.load(tmp_path / "out" / "model.onnx")
    assert [n.input[2] for n in out.graph.node] == ["conv.bias_corrected"]  # a new Conv B
    dense = run(model, {"x": x})[0].astype(np.float64).mean((0, 2, 3))
    np.testing.assert_allclose(run(out, {"x": x})[0].astype(np.float64).mean((0, 2, 3)), dense,
                               rtol=1e-5, atol=1e-5)
    assert next(s for s in report["steps"] if s["name"] == "correct")["layers"][0]["where"] == "new bias"


def test_conv_with_a_shared_bias_gets_an_add_after_it(tmp_path):
    """Two Convs read one bias (PaddleOCR exports do): neither may change it, so each gets an Add of a
    [C, 1, 1] constant after it, under its output name (a [C] constant would broadcast on W)."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["x", "w1", "b"], ["c1"], "conv1", pads=[1] * 4),
             helper.make_node("Conv", ["x", "w2", "b"], ["c2"], "conv2", pads=[1] * 4),
             helper.make_node("Add", ["c1", "c2"], ["y"], "sum")]
    model = make_model(nodes, {"x": ("N", 8, 5, 5)}, ["y"], {
        "w1": rng.standard_normal((4, 8, 3, 3)), "w2": rng.standard_normal((4, 8, 3, 3)),
        "b": rng.standard_normal(4)})
    x = _calib(tmp_path, (16, 8, 5, 5), mean=0.5)
    report = _compile(tmp_path, model, bias_correct=True).as_dict()
    out = onnx.load(tmp_path / "out" / "model.onnx")
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(out, strict_mode=True), full_check=True)
    assert [r["where"] for r in next(s for s in report["steps"] if s["name"] == "correct")["layers"]] == [
        "new add", "new add"]
    adds = [n for n in out.graph.node if n.op_type == "Add" and n.output[0] in ("c1", "c2")]
    assert [list(initializers(out)[n.input[1]].shape) for n in adds] == [[4, 1, 1], [4, 1, 1]]
    means = [run(m, {"x": x})[0].astype(np.float64).mean((0, 2, 3)) for m in (out, model)]
    np.testing.assert_allclose(means[0], means[1], rtol=1e-5, atol=1e-4)


def test_gemm_without_c_and_matmul_without_add(tmp_path):
    """Gemm (transB) gets a C input; a MatMul with no Add after it gets one, under its output name.
    --sequential: the output mean behind the Relu is exact only when measured level by level (without it
    the shift comes from the dense input means: tests/test_bias_correct_default.py)."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], "gemm", transB=1),
             helper.make_node("Relu", ["h"], ["r"], "relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], "mm")]
    model = make_model(nodes, {"x": ("N", 16)}, ["y"], {"w1": rng.standard_normal((32, 16)),
                                                         "w2": rng.standard_normal((32, 8))})
    x = _calib(tmp_path, (64, 16))
    _compile(tmp_path, model, bias_correct=True, sequential=True)
    out = onnx.load(tmp_path / "out" / "model.onnx")
    assert [line.split(" (")[0] for line in graph_lines(out)][-1].startswith("Add")
    assert out.graph.output[0].name == "y" and len(out.graph.node[0].input) == 3
    np.testing.assert_allclose(run(out, {"x": x})[0].astype(np.float64).mean(0),
                               run(model, {"x": x})[0].astype(np.float64).mean(0), rtol=1e-5, atol=1e-4)


def test_composes_with_sequential_and_writes_the_recipe(tmp_path):
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], "fc1"),
             helper.make_node("Relu", ["h"], ["r"], "relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], "fc2")]
    model = make_model(nodes, {"x": ("N", 16)}, ["y"], {"w1": rng.standard_normal((16, 32)),
                                                         "w2": rng.standard_normal((32, 8))})
    x = _calib(tmp_path, (64, 16))
    report = _compile(tmp_path, model, method="sparsegpt", sequential=True, bias_correct=True).as_dict()
    assert {"correct": {"bias_correct": True, "bn_reestimate": False, "correct_samples": 64}} \
        in report["recipe"]["stages"]
    step = next(s for s in report["steps"] if s["name"] == "correct")
    assert [r["layer"] for r in step["layers"]] == ["fc1", "fc2"]
    pruned = run(str(tmp_path / "out" / "model.onnx"), {"x": x})[0].astype(np.float64)
    np.testing.assert_allclose(pruned.mean(0), run(model, {"x": x})[0].astype(np.float64).mean(0),
                               rtol=1e-5, atol=1e-4)


def test_needs_calibration_data(tmp_path):
    onnx.save(_linear(), tmp_path / "m.onnx")
    with pytest.raises(SparsecError, match="bias_correct needs calibration data"):
        sparsec.compile(tmp_path / "m.onnx", output=tmp_path / "o", nm="2:4", bias_correct=True)
