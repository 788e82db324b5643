"""Calibration data conventions (samples along a dynamic batch axis or on a leading sample axis),
negative dims as dynamic, and scalar constants in the calibration graph (issue 9: classes 1, 2 and 6)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import sparsec
from sparsec.core.shapes import fixed_input_shapes
from sparsec.errors import SparsecError
from sparsec.runtime.calib_data import input_specs, open_calibration


def _identity(shape: list, elem: int = TensorProto.FLOAT) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", elem, shape)],
                              [helper.make_tensor_value_info("y", elem, shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


DYNAMIC = input_specs(_identity(["N", 3, 4]))
FIXED = input_specs(_identity([1, 3, 4]))


def _rows(n: int) -> np.ndarray:
    return np.arange(n * 12, dtype=np.float32).reshape(n, 3, 4)


def _fed(data, batch: int) -> np.ndarray:
    return np.concatenate([b["x"] for b in data.batches(batch)])


@pytest.mark.parametrize("layout", ["npz", "npy"])
def test_samples_along_the_dynamic_batch_axis_are_read_as_samples(tmp_path, layout):
    x = _rows(5)  # [N, 3, 4] for a model input [N, 3, 4]: rank r, samples on the batch axis
    if layout == "npz":
        np.savez(tmp_path / "c.npz", x=x)
        path = tmp_path / "c.npz"
    else:
        np.save(tmp_path / "x.npy", x)
        path = tmp_path
    data = open_calibration(DYNAMIC, path=path)
    assert data.num_samples == 5
    assert [b["x"].shape for b in data.batches(2)] == [(2, 3, 4), (2, 3, 4), (1, 3, 4)]
    np.testing.assert_array_equal(_fed(data, 2), x)
    # the leading-sample-axis layout (rank r+1) still gives the same feeds
    np.savez(tmp_path / "lead.npz", x=x[:, None])
    np.testing.assert_array_equal(_fed(open_calibration(DYNAMIC, path=tmp_path / "lead.npz"), 2), x)


def test_fixed_batch_needs_a_sample_axis_and_says_so(tmp_path):
    np.savez(tmp_path / "c.npz", x=_rows(1))  # rank r while the batch dim is fixed: ambiguous, refused
    with pytest.raises(SparsecError, match=r"^x in .*c\.npz has rank 3, expected 4 for model shape "
                                           r"\[1, 3, 4\] plus a sample axis"):
        open_calibration(FIXED, path=tmp_path / "c.npz")
    np.savez(tmp_path / "ok.npz", x=_rows(3)[:, None])
    data = open_calibration(FIXED, path=tmp_path / "ok.npz")
    assert [b["x"].shape for b in data.batches(8)] == [(1, 3, 4)] * 3


class _Reader:
    def __init__(self, feeds):
        self.feeds = list(feeds)

    def get_next(self):
        return self.feeds.pop(0) if self.feeds else None


def test_reader_feeds_of_rank_r_plus_1_carry_samples_on_the_leading_axis():
    x = _rows(4)[:, None]  # a fixed-batch model's samples, stacked: [4, 1, 3, 4]
    data = open_calibration(FIXED, reader=_Reader([{"x": x[:3]}, {"x": x[3:]}]))
    assert data.num_samples == 4
    np.testing.assert_array_equal(np.stack(list(b["x"] for b in data.batches(8))), x)


def _paddle_model() -> onnx.ModelProto:
    """A Conv whose input dims are written as dim_value -1, as older Paddle exports do."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32),
                                "w")
    conv = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")
    graph = helper.make_graph([conv], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, -1, -1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 8, -1, -1])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_negative_dims_are_dynamic(tmp_path):
    model = _paddle_model()
    assert fixed_input_shapes(model, {"x": (1, 3, 6, 10)}) == {"x": (1, 3, 6, 10)}
    assert input_specs(model)[0].shape == (None, 3, None, None)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(1).standard_normal((4, 3, 6, 10)).astype(np.float32))
    report = sparsec.compile(tmp_path / "m.onnx", output=tmp_path / "out", sparsity=0.5, method="wanda",
                             calib=tmp_path / "c.npz", shapes={"x": (1, 3, 6, 10)}, min_params=0)
    assert report.layers[0].pattern != "dense" and report.layers[0].calib_samples == 4
    assert report.layers[0].macs_dense == 6 * 10 * 8 * 27  # E·F·|W| at the --shape given, not at -1
    assert report.verify["inputs"] == {"x": [4, 3, 6, 10]}  # verified on the calibration samples


def _pooler_model(hidden: int = 32) -> onnx.ModelProto:
    """BERT's pooler: the CLS row taken with a scalar Gather index, then Gemm and Tanh (rank-2 activation)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((hidden, hidden)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((hidden, hidden)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "b2"),
             numpy_helper.from_array(np.array(0, np.int64), "cls_index")]  # a 0-d initializer
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="dense"),
             helper.make_node("Gather", ["h", "cls_index"], ["cls"], axis=1, name="take_cls"),
             helper.make_node("Gemm", ["cls", "w2", "b2"], ["p"], transB=1, name="pooler"),
             helper.make_node("Tanh", ["p"], ["pooled"], name="tanh")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", "seq", hidden]),
         helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_pooler_gemm_after_a_scalar_gather_calibrates(tmp_path, method):
    onnx.save(_pooler_model(), tmp_path / "m.onnx")
    x = np.random.default_rng(2).standard_normal((6, 5, 32)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x[:, None])  # leading sample axis: the layout every version reads
    report = sparsec.compile(tmp_path / "m.onnx", output=tmp_path / "out", sparsity=0.5, method=method,
                             calib=tmp_path / "c.npz", min_params=0)
    pooler = next(la for la in report.layers if la.name == "pooler")
    assert pooler.pattern != "dense" and pooler.calib_samples == 6
    assert 0.0 < pooler.rel_error < 1.0
    if method == "wanda":  # its statistics are exactly ‖X_j‖ of the CLS rows: check the score's effect
        cls = (x @ onnx.numpy_helper.to_array(_pooler_model().graph.initializer[0]))[:, 0]
        w2 = onnx.numpy_helper.to_array(_pooler_model().graph.initializer[1])
        score = np.abs(w2) * np.linalg.norm(cls, axis=0)[None, :]
        keep = score >= np.median(score, axis=1, keepdims=True)
        pruned = onnx.load(tmp_path / "out" / "model.onnx")
        got = next(numpy_helper.to_array(t) for t in pruned.graph.initializer if t.name == "w2")
        np.testing.assert_array_equal(got != 0, keep)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["verify"]["informative"] is True
