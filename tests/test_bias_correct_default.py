"""Bias correction by default: on with calibration data for magnitude and wanda (measured: large gains),
off without data (a default, not an error), for sparsegpt (gain within noise) and with --no-bias-correct;
measured on the first --correct-samples calibration samples (the stage's cost grows with them)."""

from __future__ import annotations

import json

import numpy as np
import onnx
from click.testing import CliRunner
from helpers import run
from onnx import helper
from pass_helpers import make_model

import sparsec
from sparsec.cli import cli


def _mlp():
    """x [N, 16] → fc1 → Relu → fc2 → y: the second layer's input mean moves when the first is pruned."""
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], "fc1"),
             helper.make_node("Relu", ["h"], ["r"], "relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], "fc2")]
    return make_model(nodes, {"x": ("N", 16)}, ["y"], {"w1": rng.standard_normal((16, 32)),
                                                        "w2": rng.standard_normal((32, 8))})


def _setup(tmp_path):
    x = (np.random.default_rng(1).standard_normal((96, 16)) + 1.0).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    onnx.save(_mlp(), tmp_path / "m.onnx")
    return x


def _compile(tmp_path, out, **kw):
    kw.setdefault("method", "magnitude")  # with calibration data the default method is sparsegpt
    return sparsec.compile(tmp_path / "m.onnx", output=tmp_path / out, nm="2:4", min_params=0, force=True,
                           quiet=True, **kw).as_dict()


def _step(report):
    return next((s for s in report["steps"] if s["name"] == "correct"), None)


def _mean(model, x):
    given = model if isinstance(model, onnx.ModelProto) else str(model)
    return run(given, {"x": x})[0].astype(np.float64).mean(0)


def test_on_by_default_with_calibration_data(tmp_path):
    x = _setup(tmp_path)
    report = _compile(tmp_path, "out", calib=tmp_path / "calib.npz")
    step = _step(report)
    assert [s["name"] for s in report["steps"]][:2] == ["weights", "correct"]
    assert "bias correction on (default with calibration data, kept if held-back" in step["plan"]
    guard = step["guard"]  # the last quarter of the 96 samples, never measured by the correction
    assert guard["held_back_samples"] == 24 and guard["kept"]
    assert guard["cosine_with"] >= guard["cosine_without"]
    assert [r["layer"] for r in step["layers"]] == ["fc1", "fc2"] and step["levels"] == 2
    assert step["samples"] == 64  # --correct-samples' default, of the 96 given
    assert {"correct": {"bias_correct": True, "bn_reestimate": False, "correct_samples": 64}} \
        in report["recipe"]["stages"]
    # exact on the samples it measured, level by level (behind the Relu too)
    np.testing.assert_allclose(_mean(tmp_path / "out" / "model.onnx", x[:64]), _mean(_mlp(), x[:64]),
                               rtol=1e-5, atol=1e-4)
    plain = _compile(tmp_path, "plain", calib=tmp_path / "calib.npz", bias_correct=False)
    assert _step(plain) is None
    gaps = [np.abs(_mean(tmp_path / d / "model.onnx", x) - _mean(_mlp(), x)).max() for d in ("out", "plain")]
    assert gaps[0] < 0.5 * gaps[1]  # on all 96 samples too
    wanda = _step(_compile(tmp_path, "wanda", calib=tmp_path / "calib.npz", method="wanda"))
    assert wanda is not None and "default" in wanda["plan"]


def test_correct_samples_bounds_the_measurement(tmp_path):
    x = _setup(tmp_path)
    step = _step(_compile(tmp_path, "out", calib=tmp_path / "calib.npz", correct_samples=16))
    assert step["samples"] == 16
    np.testing.assert_allclose(_mean(tmp_path / "out" / "model.onnx", x[:16]), _mean(_mlp(), x[:16]),
                               rtol=1e-5, atol=1e-4)


def test_off_without_data_for_sparsegpt_and_when_asked(tmp_path):
    _setup(tmp_path)
    assert _step(_compile(tmp_path, "nodata")) is None  # a default, not an error
    assert _step(_compile(tmp_path, "gpt", calib=tmp_path / "calib.npz", method="sparsegpt")) is None
    asked = _step(_compile(tmp_path, "gpt2", calib=tmp_path / "calib.npz", method="sparsegpt",
                           bias_correct=True))
    assert asked is not None and "default" not in asked["plan"]
    res = CliRunner().invoke(cli, ["compile", str(tmp_path / "m.onnx"), "--nm", "2:4", "--min-params", "0",
                                   "--calib", str(tmp_path / "calib.npz"), "--no-bias-correct", "--json",
                                   "-o", str(tmp_path / "cli"), "--force"])
    assert res.exit_code == 0, res.output
    assert "correct" not in [s["name"] for s in json.loads(res.stdout)["steps"]]


def test_a_default_correction_that_hurts_held_back_samples_is_left_out(tmp_path):
    """Fit samples centred at +3, held-back samples at -3: matching the fit mean moves the held-back
    outputs the wrong way, so the default correction is measured, left out and said; --bias-correct
    still forces it."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], "fc")]
    onnx.save(make_model(nodes, {"x": ("N", 16)}, ["y"], {"w": rng.standard_normal((16, 8))}),
              tmp_path / "m.onnx")
    x = 0.3 * rng.standard_normal((32, 16)) + np.where(np.arange(32)[:, None] < 24, 3.0, -3.0)
    np.savez(tmp_path / "calib.npz", x=x.astype(np.float32))
    report = _compile(tmp_path, "out", calib=tmp_path / "calib.npz")
    step = _step(report)
    guard = step["guard"]
    assert guard["held_back_samples"] == 8 and not guard["kept"]
    assert guard["cosine_with"] < guard["cosine_without"]
    assert step["nothing"].startswith("default bias correction left out: on 8 held-back")
    assert not step["modified"]
    _compile(tmp_path, "plain", calib=tmp_path / "calib.npz", bias_correct=False)
    forced = _compile(tmp_path, "forced", calib=tmp_path / "calib.npz", bias_correct=True)
    outs = {d: run(str(tmp_path / d / "model.onnx"), {"x": x[24:].astype(np.float32)})[0]
            for d in ("out", "plain", "forced")}
    np.testing.assert_array_equal(outs["out"], outs["plain"])  # nothing of the correction written
    assert "guard" not in _step(forced) and np.abs(outs["forced"] - outs["plain"]).max() > 0.1


def test_a_default_correction_deeper_than_its_budget_is_left_out_and_said(tmp_path):
    """One onnxruntime pass per depth level: a 34-layer chain is past DEFAULT_MAX_LEVELS, so the default
    is left out with the reason (no pass runs); --bias-correct still corrects every layer."""
    from sparsec.recipes.correct_step import DEFAULT_MAX_LEVELS

    rng = np.random.default_rng(4)
    depth = DEFAULT_MAX_LEVELS + 2
    nodes, inits, x = [], {}, "x"
    for i in range(depth):
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], f"fc{i}"),
                  helper.make_node("Relu", [f"h{i}"], [f"r{i}"], f"relu{i}")]
        inits[f"w{i}"], x = rng.standard_normal((8, 8)) / np.sqrt(8), f"r{i}"
    onnx.save(make_model(nodes, {"x": ("N", 8)}, [x], inits), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 8)).astype(np.float32) + 1.0)
    step = _step(_compile(tmp_path, "out", calib=tmp_path / "calib.npz", method="wanda"))
    assert step["passes"] == [] and not step["modified"]
    assert step["skipped"].startswith(f"default bias correction left out: the pruned layers lie at {depth} ")
    forced = _step(_compile(tmp_path, "forced", calib=tmp_path / "calib.npz", method="wanda",
                            bias_correct=True))
    assert forced["levels"] == depth and len(forced["layers"]) == depth
