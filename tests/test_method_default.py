"""--method left unset: SparseGPT with calibration data (the measured best at every N:M pattern,
bench/RESULTS.md), magnitude without; the report says it was a default, an explicit --method wins."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper
from pass_helpers import make_model

import sparsec


def _setup(tmp_path):
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], "fc1"),
             helper.make_node("Relu", ["h"], ["r"], "relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], "fc2")]
    onnx.save(make_model(nodes, {"x": ("N", 16)}, ["y"], {"w1": rng.standard_normal((16, 32)),
                                                           "w2": rng.standard_normal((32, 8))}),
              tmp_path / "m.onnx")
    x = rng.standard_normal((64, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)


def _weights(tmp_path, out, **kw) -> dict:
    report = sparsec.compile(tmp_path / "m.onnx", output=tmp_path / out, nm="2:4", min_params=0,
                             quiet=True, **kw).as_dict()
    return next(s for s in report["steps"] if s["name"] == "weights")


def test_sparsegpt_by_default_with_calibration_data(tmp_path):
    _setup(tmp_path)
    step = _weights(tmp_path, "out", calib=tmp_path / "calib.npz")
    assert " by sparsegpt " in step["plan"]
    assert step["defaults"] == {"method": "sparsegpt (default: calibration data given)"}
    assert "sparsegpt" in step["passes"]


def test_magnitude_without_data_and_explicit_method_wins(tmp_path):
    _setup(tmp_path)
    plain = _weights(tmp_path, "plain")
    assert " by magnitude " in plain["plan"]
    assert plain["defaults"] == {"method": "magnitude (default: no calibration data)"}
    asked = _weights(tmp_path, "asked", calib=tmp_path / "calib.npz", method="wanda")
    assert " by wanda " in asked["plan"] and "defaults" not in asked


def test_kept_widths_are_multiples_of_8_by_default(tmp_path):
    """--round-to left unset: every cut layer keeps a multiple of 8 channels (the fast-kernel widths);
    with --nm a multiple of lcm(8, M)."""
    from models import example_path

    report = sparsec.compile(example_path(), output=tmp_path / "o", channels=0.3, quiet=True)
    cut = [s for s in report.channels["sources"] if s["kept"] != s["channels"]]
    assert cut and all(s["kept"] % 8 == 0 for s in cut)
    assert report.options["round_to"] == 8
    nm = sparsec.compile(example_path(), output=tmp_path / "n", channels=0.3, nm="4:16", quiet=True)
    assert nm.options["round_to"] == 16
