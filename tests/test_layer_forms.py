"""Layer forms exporters emit: weights shared through Identity, QDQ (int8) weights, integer ops,
and models with nothing to prune."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import sparsec
from sparsec.core.layers import find_layers
from sparsec.weights.masks import satisfies_nm
from tests.cli_helpers import compile_cli
from tests.helpers import initializers

OPSET = 17


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _save(model: onnx.ModelProto, tmp_path, name: str = "m.onnx"):
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


# --- weights shared through Identity -------------------------------------------------------------


def _tied(second_reads_transposed: bool = False) -> onnx.ModelProto:
    """One weight W [64, 32] read by two MatMuls, each through its own Identity (torch's export of
    a reused layer); optionally the second through a Transpose instead (a different layout)."""
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    second = (helper.make_node("Transpose", ["W"], ["W_b"], name="t_b", perm=[1, 0])
              if second_reads_transposed else helper.make_node("Identity", ["W"], ["W_b"], name="id_b"))
    x2_shape = [1, 32] if second_reads_transposed else [1, 64]
    nodes = [helper.make_node("Identity", ["W"], ["W_a"], name="id_a"), second,
             helper.make_node("MatMul", ["x", "W_a"], ["ya"], name="mm_a"),
             helper.make_node("MatMul", ["x2", "W_b"], ["yb"], name="mm_b")]
    return _model(nodes, [_vi("x", [1, 64]), _vi("x2", x2_shape)],
                  [_vi("ya", [1, 32]), _vi("yb", [1, 64 if second_reads_transposed else 32])],
                  [numpy_helper.from_array(w, "W")])


def test_weight_shared_through_identities_is_pruned_once(tmp_path):
    analysis = find_layers(_tied())
    assert sorted(la.name for la in analysis.layers) == ["mm_a", "mm_b"]
    assert analysis.skipped == ()
    report = sparsec.compile(str(_save(_tied(), tmp_path)), nm="2:4", output=str(tmp_path / "out"))
    assert report.totals["layers_pruned"] == 2
    assert report.totals["params"] == 64 * 32  # counted once
    out = onnx.load(str(tmp_path / "out" / "model.onnx"))
    w = initializers(out)["W"]
    assert satisfies_nm(w, 2, 4, 0)
    assert np.count_nonzero(w) == w.size // 2
    assert [n.op_type for n in out.graph.node] == ["Identity", "Identity", "MatMul", "MatMul"]


def test_weight_shared_in_two_layouts_stays_dense():
    analysis = find_layers(_tied(second_reads_transposed=True))
    assert analysis.layers == ()
    assert {s.name for s in analysis.skipped} == {"mm_a", "mm_b"}
    assert all("different layouts" in s.reason for s in analysis.skipped)


# --- nothing to prune --------------------------------------------------------------------------


def _small_matmul() -> onnx.ModelProto:
    w = np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32)
    return _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [_vi("x", [1, 16])],
                  [_vi("y", [1, 8])], [numpy_helper.from_array(w, "W")])


def _matmul_integer() -> onnx.ModelProto:
    """Dynamic quantization's form (onnxruntime quantize_dynamic): DynamicQuantizeLinear + MatMulInteger."""
    w = np.random.default_rng(2).integers(-100, 100, (64, 32)).astype(np.int8)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dq_x"),
             helper.make_node("MatMulInteger", ["xq", "Wq", "xz", "wz"], ["acc"], name="mmi"),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["accf", "xs"], ["y"], name="rescale")]
    return _model(nodes, [_vi("x", [1, 64])], [_vi("y", [1, 32])],
                  [numpy_helper.from_array(w, "Wq"), numpy_helper.from_array(np.int8(0), "wz")])


def _no_layers() -> onnx.ModelProto:
    return _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [_vi("x", [1, 4])],
                  [_vi("y", [1, 4])], [])


@pytest.mark.parametrize("build, args, why", [
    (_small_matmul, ["--method", "wanda", "--calib-random", "4"],
     "0 of 1 layers prunable (below --min-params 256: 1)"),
    (_small_matmul, [], "0 of 1 layers prunable (below --min-params 256: 1)"),
    (_matmul_integer, [], "0 of 1 layers prunable (integer op: 1)"),
    (_no_layers, ["--method", "sparsegpt", "--calib-random", "2"],
     "the model has no Conv, ConvTranspose, Gemm or MatMul with a constant weight"),
])
def test_nothing_to_prune_is_one_line_and_the_report_matches_the_files(tmp_path, build, args, why):
    out = tmp_path / "out"
    result = compile_cli(_save(build(), tmp_path), "--nm", "2:4", *args, "-o", out)
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines == [f"sparsec: nothing pruned: {why}"]
    report = json.loads((out / "report.json").read_text())
    assert report["nothing_pruned"] == f"nothing pruned: {why}"
    assert report["passes"] == []  # no calibration ran
    assert "skipped" in report["encoding"]
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "recipe.yaml", "report.json"]


def test_integer_ops_are_listed_as_skipped():
    analysis = find_layers(_matmul_integer())
    assert analysis.layers == ()
    (skip,) = analysis.skipped
    assert (skip.name, skip.op, skip.weight) == ("mmi", "MatMulInteger", "Wq")
    assert "QDQ" in skip.reason


# --- QDQ weights -------------------------------------------------------------------------------


def _qdq_matmul(wq: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int = 1,
                transpose: bool = False) -> onnx.ModelProto:
    """x @ DequantizeLinear(Wq) (optionally through a Transpose), per-channel along `axis`."""
    k = wq.shape[1] if transpose else wq.shape[0]
    n = wq.shape[0] if transpose else wq.shape[1]
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "Ws", "Wz"], ["Wd"], name="dq", axis=axis)]
    if transpose:
        nodes.append(helper.make_node("Transpose", ["Wd"], ["Wt"], name="t", perm=[1, 0]))
    nodes.append(helper.make_node("MatMul", ["x", "Wt" if transpose else "Wd"], ["y"], name="mm"))
    return _model(nodes, [_vi("x", [2, k])], [_vi("y", [2, n])],
                  [numpy_helper.from_array(wq, "Wq"), numpy_helper.from_array(scale, "Ws"),
                   numpy_helper.from_array(zero, "Wz")])


def _asymmetric_uint8(rng, k=32, n=16):
    wq = rng.integers(0, 256, (k, n)).astype(np.uint8)
    zero = rng.integers(100, 156, n).astype(np.uint8)
    scale = rng.uniform(0.01, 0.1, n).astype(np.float32)
    return wq, scale, zero


def test_qdq_weight_is_masked_to_its_zero_point_by_dequantized_magnitude(tmp_path):
    rng = np.random.default_rng(3)
    wq, scale, zero = _asymmetric_uint8(rng)
    model = _qdq_matmul(wq, scale, zero)
    (layer,) = find_layers(model).layers
    assert (layer.weight, layer.reduction_axis) == ("Wq", 0)
    report = sparsec.compile(str(_save(model, tmp_path)), nm="2:4", output=str(tmp_path / "out"),
                             min_params=0)
    out = onnx.load(str(tmp_path / "out" / "model.onnx"))
    got = initializers(out)["Wq"]
    assert got.dtype == np.uint8
    real = (wq.astype(np.int32) - zero) * scale
    want_keep = np.zeros(wq.shape, dtype=bool)
    for g in range(0, wq.shape[0], 4):  # top 2 of |real| in each group of 4 along K
        order = np.argsort(-np.abs(real[g:g + 4]), axis=0, kind="stable")[:2]
        np.put_along_axis(want_keep[g:g + 4], order, True, axis=0)
    np.testing.assert_array_equal(got, np.where(want_keep, wq, zero))
    assert satisfies_nm(got, 2, 4, 0, zero=zero.reshape(1, -1))
    (entry,) = report.layers
    assert entry.skipped_reason is None and entry.pattern == "2:4"
    assert entry.nonzeros == int(np.count_nonzero(got != zero)) <= wq.size // 2
    # the pruned model computes x @ (real with removed weights at exactly 0); onnxruntime's
    # optimizer would fuse DequantizeLinear+MatMul into an integer kernel, so run it unfused
    x = rng.standard_normal((2, 32)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    (y,) = ort.InferenceSession(out.SerializeToString(), opts, providers=["CPUExecutionProvider"]
                                ).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ np.where(want_keep, real, 0.0), rtol=1e-5, atol=1e-5)
    assert report.verify["max_abs_diff"] > 0


def test_qdq_int8_conv_from_quantize_static_is_pruned(tmp_path):
    """What users run: onnxruntime's quantize_static with QuantFormat.QDQ on a float model."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(4)
    w1 = (rng.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32)
    w2 = (rng.standard_normal((16, 10)) * 0.2).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "W2"], ["y"], name="fc")]
    float_model = _model(nodes, [_vi("x", [1, 8, 6, 6])], [_vi("y", [1, 10])],
                         [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    src = _save(float_model, tmp_path, "float.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.data = iter([{"x": rng.standard_normal((1, 8, 6, 6)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.data, None)

    qdq = tmp_path / "qdq.onnx"
    quantize_static(str(src), str(qdq), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QInt8)
    layers = {la.name: la for la in find_layers(onnx.load(str(qdq))).layers}
    assert {la.source.dequant is not None for la in layers.values()} == {True}
    out = tmp_path / "out"
    result = compile_cli(qdq, "--nm", "2:4", "--min-params", "0", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["totals"]["layers_pruned"] == 2
    pruned = initializers(onnx.load(str(out / "model.onnx")))
    conv_w = pruned[layers["conv"].weight]
    assert conv_w.dtype == np.int8 and satisfies_nm(conv_w, 2, 4, 1)  # symmetric int8: zero point 0
    assert np.count_nonzero(conv_w) <= conv_w.size // 2
    assert report["verify"]["outputs"][0]["cosine"] > 0.5
    assert (out / "weights.sparsec").is_file()


def test_qdq_through_transpose_prunes_along_the_stored_axis_the_layer_reduces(tmp_path):
    rng = np.random.default_rng(5)
    wq = rng.integers(-127, 128, (16, 32)).astype(np.int8)  # stored [N, K], read transposed
    scale = rng.uniform(0.01, 0.1, 16).astype(np.float32)
    model = _qdq_matmul(wq, scale, np.zeros(16, np.int8), axis=0, transpose=True)
    (layer,) = find_layers(model).layers
    assert layer.shape == (32, 16) and layer.reduction_axis == 0
    sparsec.compile(str(_save(model, tmp_path)), nm="2:4", output=str(tmp_path / "out"), min_params=0)
    got = initializers(onnx.load(str(tmp_path / "out" / "model.onnx")))["Wq"]
    assert satisfies_nm(got, 2, 4, 1) and not satisfies_nm(got, 2, 4, 0)
    np.testing.assert_array_equal(got[got != 0], wq[got != 0])  # kept integers bit for bit


def test_qdq_wanda_and_sparsegpt(tmp_path):
    rng = np.random.default_rng(6)
    wq, scale, zero = _asymmetric_uint8(rng, 64, 32)
    path = _save(_qdq_matmul(wq, scale, zero), tmp_path)
    wanda = sparsec.compile(str(path), sparsity=0.5, method="wanda", calib_random=8,
                            output=str(tmp_path / "w"), min_params=0)
    (entry,) = wanda.layers
    assert entry.method == "wanda" and entry.nonzeros == wq.size // 2
    assert 0 < entry.rel_error < 1
    gpt = sparsec.compile(str(path), nm="2:4", method="sparsegpt", calib_random=8,
                          output=str(tmp_path / "s"), min_params=0)
    (entry,) = gpt.layers
    assert entry.pattern == "2:4" and "requantization" in entry.note
    got = initializers(onnx.load(str(tmp_path / "s" / "model.onnx")))["Wq"]
    kept = got != zero
    np.testing.assert_array_equal(got[kept], wq[kept])


def test_inspect_counts_zero_points_as_zeros(tmp_path):
    wq = np.full((8, 4), 128, np.uint8)
    wq[::4] = 7  # one non-zero per 4 along K
    info = sparsec.inspect(str(_save(_qdq_matmul(wq, np.full(4, 0.1, np.float32),
                                                 np.full(4, 128, np.uint8)), tmp_path)))
    (layer,) = info.layers
    assert layer.nonzeros == 8 and layer.satisfies["2:4"] and layer.satisfies["4:8"]


def test_fake_quantized_float_weight_is_pruned_as_a_float(tmp_path):
    """pytorch-quantization / ModelOpt export: float W -> QuantizeLinear -> DequantizeLinear -> MatMul.
    A pruned +0.0 quantizes to the zero point and dequantizes to exactly 0."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    nodes = [helper.make_node("QuantizeLinear", ["W", "s", "z"], ["Wq"], name="q", axis=1),
             helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["Wd"], name="dq", axis=1),
             helper.make_node("MatMul", ["x", "Wd"], ["y"], name="mm")]
    model = _model(nodes, [_vi("x", [2, 32])], [_vi("y", [2, 16])],
                   [numpy_helper.from_array(w, "W"), numpy_helper.from_array(scale, "s"),
                    numpy_helper.from_array(np.zeros(16, np.int8), "z")])
    (layer,) = find_layers(model).layers
    assert layer.weight == "W" and layer.source.dequant is None
    report = sparsec.compile(str(_save(model, tmp_path)), nm="2:4", output=str(tmp_path / "out"),
                             min_params=0)
    assert report.totals["layers_pruned"] == 1
    got = initializers(onnx.load(str(tmp_path / "out" / "model.onnx")))["W"]
    assert satisfies_nm(got, 2, 4, 0) and np.count_nonzero(got) == w.size // 2
    np.testing.assert_array_equal(got[got != 0], w[got != 0])
