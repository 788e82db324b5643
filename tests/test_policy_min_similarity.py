"""--min-similarity: per-layer sensitivity on held-back calibration samples, the floor, the defaults."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import sparsec
from sparsec.cli import cli
from sparsec.recipes import options_from
from sparsec.weights.quality_policy import choose
from sparsec.weights.sensitivity import Sensitivity, similarity


def _robust(rng, k: int, n: int) -> np.ndarray:
    """2 large and 2 near-zero weights in every 4 along K: 2:4 removes almost nothing."""
    w = rng.normal(size=(k, n)).astype(np.float32)
    w[1::2] *= 1e-4
    return w


def _fragile(rng, k: int, n: int) -> np.ndarray:
    """Every weight of equal magnitude: 2:4 removes half of every output's signal."""
    return (np.sign(rng.normal(size=(k, n))) / np.sqrt(k)).astype(np.float32)


def _mlp(path) -> str:
    """x[N,16] -> fc1 (robust) -> Relu -> fc2 (fragile) -> Relu -> fc3 (robust) -> y[N,8]."""
    rng = np.random.default_rng(0)
    ws = {"w1": _robust(rng, 16, 64), "w2": _fragile(rng, 64, 64), "w3": _robust(rng, 64, 8)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("MatMul", ["r2", "w3"], ["y"], name="fc3")]
    graph = helper.make_graph(nodes, "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                              [numpy_helper.from_array(v, k) for k, v in ws.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return str(path)


def _calib(path, n: int = 32) -> str:
    x = np.random.default_rng(1).normal(size=(n, 16)).astype(np.float32)
    np.savez(path, x=x)
    return str(path)


def _held_back_similarity(dense: str, pruned: str, calib: str) -> float:
    x = np.load(calib)["x"][-8:]  # the last quarter of 32: what the policy held back
    a = ort.InferenceSession(dense, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    b = ort.InferenceSession(pruned, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.mean())


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_floor_holds_and_the_fragile_layer_stays_dense(tmp_path, method):
    model, calib = _mlp(tmp_path / "mlp.onnx"), _calib(tmp_path / "calib.npz")
    report = sparsec.compile(model, output=tmp_path / "out", nm="2:4", method=method, calib=calib,
                             min_similarity=0.99, bias_correct=False, min_params=0)
    step = next(s for s in report.steps if s["name"] == "weights")
    policy = step["policy"]
    assert policy["held_back_samples"] == 8 and policy["fit_samples"] == 24
    by_layer = {r["layers"][0]: r for r in policy["table"]}
    assert by_layer["fc2"]["sensitivity"] > 0.01  # fragile
    assert by_layer["fc1"]["sensitivity"] < 1e-3 and by_layer["fc3"]["sensitivity"] < 1e-3
    layers = {la.name: la for la in report.layers}
    assert layers["fc1"].pattern == "2:4" and layers["fc3"].pattern == "2:4"
    assert layers["fc2"].pattern == "dense"
    assert layers["fc2"].skipped_reason.startswith("sensitivity ") and "> remaining budget" in \
        layers["fc2"].skipped_reason
    measured = _held_back_similarity(model, str(tmp_path / "out" / "model.onnx"), calib)
    assert measured >= 0.99
    assert abs(measured - policy["final_similarity"]) < 1e-5
    out = onnx.load(str(tmp_path / "out" / "model.onnx"))
    w2 = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "w2"))
    assert np.count_nonzero(w2) == w2.size  # kept bit for bit dense


def test_without_the_policy_the_floor_is_missed(tmp_path):
    """The golden model needs the policy: plain 2:4 everywhere falls below 0.99."""
    model, calib = _mlp(tmp_path / "mlp.onnx"), _calib(tmp_path / "calib.npz")
    sparsec.compile(model, output=tmp_path / "out", nm="2:4", calib=calib, bias_correct=False, min_params=0,
                    method="magnitude")
    assert _held_back_similarity(model, str(tmp_path / "out" / "model.onnx"), calib) < 0.97


def test_a_floor_nothing_meets_prunes_nothing_and_says_so(tmp_path):
    model, calib = _mlp(tmp_path / "mlp.onnx"), _calib(tmp_path / "calib.npz")
    report = sparsec.compile(model, output=tmp_path / "out", nm="2:4", calib=calib, min_similarity=1.0,
                             bias_correct=False, min_params=0)
    assert report.nothing_pruned.startswith("nothing pruned: --min-similarity 1 leaves all 3")
    assert all(la.pattern == "dense" for la in report.layers)


def test_choice_backs_off_until_the_combined_floor_holds():
    table = [Sensitivity("a", ("a",), 100.0, 0.996), Sensitivity("b", ("b",), 100.0, 0.995)]
    calls = []

    def combined(chosen):  # the two interact: together far worse than the sum
        calls.append(chosen)
        return 0.95 if len(chosen) == 2 else 0.995

    plan = choose(table, 0.99, combined, 24, 8)
    assert plan.chosen == ("a",) and plan.similarity == pytest.approx(0.995, abs=1e-12)
    assert plan.dense["b"].startswith("backed off: the combined model's held-back similarity 0.95 < 0.99")
    assert calls == [("a", "b"), ("a",)]


def test_similarity_is_per_sample_cosine():
    a = [[np.array([[1.0, 0.0], [0.0, 2.0]])]]
    b = [[np.array([[1.0, 0.0], [2.0, 0.0]])]]
    assert similarity(a, b, [2]) == pytest.approx(0.5, abs=1e-12)
    assert similarity(a, a, [2]) == pytest.approx(1.0, abs=1e-12)


def test_inspect_sensitivity_prints_the_table(tmp_path):
    model, calib = _mlp(tmp_path / "mlp.onnx"), _calib(tmp_path / "calib.npz")
    result = CliRunner().invoke(cli, ["inspect", model, "--sensitivity", "--nm", "2:4", "--calib", calib,
                                      "--min-params", "0"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("layer"))
    rows = [line.split() for line in lines[header + 1:header + 4]]
    assert rows[0][0] == "fc2"  # most sensitive first
    assert float(rows[0][2]) > 0.01 and float(rows[1][2]) < 1e-3
    result = CliRunner().invoke(cli, ["inspect", model, "--sensitivity", "--nm", "2:4", "--calib", calib,
                                      "--min-params", "0", "--json"])
    table = json.loads(result.output)["sensitivity"]["table"]
    assert {r["layers"][0] for r in table} == {"fc1", "fc2", "fc3"}


def test_min_similarity_needs_data_and_a_pattern():
    with pytest.raises(sparsec.SparsecError, match="--min-similarity needs calibration data"):
        options_from({"nm": "2:4", "min_similarity": 0.99})
    with pytest.raises(sparsec.SparsecError, match="chooses which layers --nm/--sparsity prune"):
        options_from({"channels": 0.3, "min_similarity": 0.99, "calib_random": 8})
    with pytest.raises(sparsec.SparsecError, match="out of range"):
        options_from({"nm": "2:4", "min_similarity": 1.5, "calib_random": 8})


def test_channel_defaults_follow_the_data():
    plain = options_from({"channels": 0.3})
    assert (str(plain.channel_score), plain.recover) == ("l1", False)
    data = options_from({"channels": 0.3, "calib_random": 8})
    assert (str(data.channel_score), data.recover) == ("act", True)
    assert data.channel_defaults == {"channel_score": "act (default: calibration data given)",
                                     "recover": "on (default: calibration data given)",
                                     "round_to": "8 (default: widths fast kernels keep; --round-to 1: exact)"}
    asked = options_from({"channels": 0.3, "calib_random": 8, "channel_score": "l1", "recover": False,
                          "round_to": 1})
    assert (str(asked.channel_score), asked.recover, asked.round_to, asked.channel_defaults) \
        == ("l1", False, 1, {})


def test_channels_report_says_which_defaults_it_used(tmp_path):
    from models import example_path

    report = sparsec.compile(example_path(), output=tmp_path / "o", channels=0.3, calib_random=8)
    step = next(s for s in report.steps if s["name"] == "channels")
    assert step["defaults"] == {"channel_score": "act (default: calibration data given)",
                                "recover": "on (default: calibration data given)",
                                "round_to": "8 (default: widths fast kernels keep; --round-to 1: exact)"}
    assert report.options["channel_score"] == "act" and report.options["recover"] is True
    assert report.channels["recovery"]  # the refit ran
