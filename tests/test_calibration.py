"""In-graph statistics, Wanda and SparseGPT against direct numpy computations on activations."""

import numpy as np
import onnx
import pytest
from helpers import initializers, reference_nm_mask, run

import sparsec
from models import GOLDEN
from sparsec.core.layers import find_layers
from sparsec.core.tensors import TensorStore
from sparsec.runtime.calib_data import input_specs, open_calibration
from sparsec.runtime.calibrate import CalibrationSettings, collect_stats
from sparsec.runtime.instrument import activation_of
from sparsec.weights.masks import unstructured_mask

SHAPES = {"weight_paths": {"x": (2, 8, 32), "ids": (2, 8)}, "cnn": {"image": (1, 3, 32, 32)},
          "gemm_transb": {"x": (4, 64)}, "mlp": {"x": (3, 32)}}


def calib_file(tmp_path, name, model, samples=6, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in input_specs(model):
        shape = (samples, *SHAPES[name][spec.name])
        arrays[spec.name] = (rng.integers(0, 40, shape) if spec.dtype == np.int64
                             else rng.standard_normal(shape)).astype(spec.dtype)
    path = tmp_path / f"{name}_calib.npz"
    np.savez(path, **arrays)
    return path, arrays


def exposed(model, feeds, names):
    """Run with extra graph outputs: the slow, obvious way to see activations."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for n in names:
        if n not in have:
            probe.graph.output.append(onnx.ValueInfoProto(name=n))
    outs = run(probe, feeds)
    return dict(zip([o.name for o in probe.graph.output], outs, strict=True))


def direct_stats(model, arrays, layer):
    """Σx² per channel and XᵀX from the exposed activation of every sample."""
    node = model.graph.node[layer.node_index]
    trans = tuple(next((a.i for a in node.attribute if a.name == k), 0) for k in ("transA", "transB"))
    tensor, axis = activation_of(layer, node, trans)
    n = len(next(iter(arrays.values())))
    xs = [exposed(model, {k: v[i] for k, v in arrays.items()}, [tensor])[tensor] for i in range(n)]
    rows = np.concatenate([np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]) for x in xs])
    rows = rows.astype(np.float64)
    return (rows**2).sum(0), rows.T @ rows, rows


def stats_for(model, path, batch, gram=True):
    layers = list(find_layers(model).layers)
    data = open_calibration(input_specs(model), path=path)
    settings = CalibrationSettings(data=data, batch=batch, progress=False)
    names = {la.name for la in layers} if gram else set()
    return layers, collect_stats(model, TensorStore(path.parent), layers, settings, names)


@pytest.mark.parametrize("name", ["weight_paths", "cnn", "gemm_transb"])
def test_in_graph_statistics_equal_exposed_activations(tmp_path, name):
    model = GOLDEN[name]()
    path, arrays = calib_file(tmp_path, name, model)
    layers, stats = stats_for(model, path, batch=4)
    assert stats.samples == 6
    for layer in layers:
        sumsq, gram, rows = direct_stats(model, arrays, layer)
        got = stats.layers[layer.name]
        np.testing.assert_allclose(got.sumsq, sumsq, rtol=1e-5, atol=1e-6, err_msg=layer.name)
        assert got.rows == rows.shape[0]
        np.testing.assert_allclose(got.sums, rows.sum(0), rtol=1e-4, atol=1e-4, err_msg=layer.name)
        np.testing.assert_allclose(got.gram, gram, rtol=1e-4, atol=1e-4, err_msg=layer.name)


def test_streaming_accumulation_equals_one_shot(tmp_path):
    model = GOLDEN["weight_paths"]()
    path, _ = calib_file(tmp_path, "weight_paths", model, samples=7)
    _, one = stats_for(model, path, batch=7)
    _, streamed = stats_for(model, path, batch=2)
    for name, s in one.layers.items():
        np.testing.assert_allclose(streamed.layers[name].sumsq, s.sumsq, rtol=1e-6)
        np.testing.assert_allclose(streamed.layers[name].gram, s.gram, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pattern", [{"nm": "2:4"}, {"sparsity": 0.5}])
def test_wanda_masks_equal_numpy_on_exposed_activations(tmp_path, pattern):
    model = GOLDEN["mlp"]()
    src = tmp_path / "mlp.onnx"
    onnx.save(model, src)
    path, arrays = calib_file(tmp_path, "mlp", model)
    report = sparsec.compile(src, output=tmp_path / "o", method="wanda", calib=path, min_params=0,
                             **pattern)
    pruned = initializers(onnx.load(tmp_path / "o" / "model.onnx"))
    dense = initializers(model)
    for layer in find_layers(model).layers:
        sumsq, _, _ = direct_stats(model, arrays, layer)
        w = dense[layer.weight]
        score = np.abs(w) * np.sqrt(sumsq).reshape([-1 if a == layer.reduction_axis else 1
                                                    for a in range(w.ndim)])
        if "nm" in pattern:
            keep = reference_nm_mask(score, 2, 4, layer.reduction_axis)
        else:
            keep = unstructured_mask(score, 0.5, "output", output_axis=layer.output_axis,
                                     reduction_axis=layer.reduction_axis)
        np.testing.assert_array_equal(pruned[layer.weight] != 0, keep & (w != 0), err_msg=layer.name)
    entry = report.layers[0]
    assert entry.method == "wanda" and entry.calib_samples == 6 and 0 < entry.rel_error < 1


def output_error(model, weights, arrays, layer):
    _, _, rows = direct_stats(model, arrays, layer)
    w = weights[layer.weight].astype(np.float64)
    w2 = np.moveaxis(w, layer.reduction_axis, -1).reshape(-1, w.shape[layer.reduction_axis])
    return w2, rows


@pytest.mark.parametrize("pattern", [{"nm": "2:4"}, {"sparsity": 0.5}])
def test_sparsegpt_reconstructs_better_than_wanda(tmp_path, pattern):
    model = GOLDEN["gemm_transb"]()
    src = tmp_path / "g.onnx"
    onnx.save(model, src)
    path, arrays = calib_file(tmp_path, "gemm_transb", model, samples=16)
    errors = {}
    for method in ("wanda", "sparsegpt"):
        report = sparsec.compile(src, output=tmp_path / method, method=method, calib=path,
                                 min_params=0, **pattern)
        pruned = initializers(onnx.load(tmp_path / method / "model.onnx"))
        layer = next(la for la in find_layers(model).layers if la.name == "gemm_transb")
        w, rows = output_error(model, initializers(model), arrays, layer)
        w_hat, _ = output_error(model, pruned, arrays, layer)
        errors[method] = np.linalg.norm(rows @ (w - w_hat).T) / np.linalg.norm(rows @ w.T)
        entry = next(e for e in report.layers if e.name == "gemm_transb")
        if method == "sparsegpt":
            assert entry.rel_error_basis == "gram"
            assert entry.rel_error == pytest.approx(errors[method], rel=1e-3)
    assert errors["sparsegpt"] < errors["wanda"]


def test_instrumentation_never_reaches_the_output(tmp_path):
    model = GOLDEN["cnn"]()
    src = tmp_path / "cnn.onnx"
    onnx.save(model, src)
    before = src.read_bytes()
    path, _ = calib_file(tmp_path, "cnn", model)
    sparsec.compile(src, output=tmp_path / "o", nm="2:4", method="sparsegpt", calib=path)
    out = onnx.load(tmp_path / "o" / "model.onnx")
    assert src.read_bytes() == before
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert not any("sparsec_stat" in n.name for n in out.graph.node)
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]


def test_sequential_calibrates_once_per_depth_level(tmp_path):
    model = GOLDEN["mlp"]()
    src = tmp_path / "mlp.onnx"
    onnx.save(model, src)
    path, arrays = calib_file(tmp_path, "mlp", model)
    report = sparsec.compile(src, output=tmp_path / "o", nm="2:4", method="wanda", calib=path,
                             min_params=0, sequential=True)
    calibrations = [p for p in report.passes if p["name"] == "calibrate"]
    assert [p["level"] for p in calibrations] == [0, 1, 2]  # fc0, fc1, head: three levels
    pruned = initializers(onnx.load(tmp_path / "o" / "model.onnx"))
    # fc1 must be scored on activations of the model whose fc0 is already pruned
    partial = onnx.ModelProto()
    partial.CopyFrom(model)
    for t in partial.graph.initializer:
        if t.name == "fc0.weight":
            t.CopyFrom(onnx.numpy_helper.from_array(pruned["fc0.weight"], t.name))
    layer = next(la for la in find_layers(model).layers if la.name == "fc1_matmul")
    sumsq, _, _ = direct_stats(partial, arrays, layer)
    w = initializers(model)["fc1.weight"]
    keep = reference_nm_mask(np.abs(w) * np.sqrt(sumsq)[:, None], 2, 4, 0)
    np.testing.assert_array_equal(pruned["fc1.weight"] != 0, keep)


def test_reader_with_get_next(tmp_path):
    model = GOLDEN["mlp"]()
    src = tmp_path / "mlp.onnx"
    onnx.save(model, src)
    batches = [{"x": np.random.default_rng(i).standard_normal((2, 32)).astype(np.float32)}
               for i in range(3)]

    class Reader:
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    report = sparsec.compile(src, output=tmp_path / "o", nm="2:4", method="wanda", calib=Reader(),
                             min_params=0)
    assert report.layers[0].calib_samples == 6
    assert report.options["calib"] == "Reader"


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"method": "wanda"}, "needs calibration data"),
    ({"owl": True, "calib_random": 4}, "owl=True"),
    ({"method": "wanda", "calib_random": 4, "providers": ("cuda",)}, "CUDAExecutionProvider"),
    ({"method": "wanda", "calib_random": 4, "damp": 0}, "damp=0"),
])
def test_calibration_option_errors(tmp_path, kwargs, needle):
    src = tmp_path / "mlp.onnx"
    onnx.save(GOLDEN["mlp"](), src)
    args = {"nm": "2:4", **kwargs}
    with pytest.raises(sparsec.SparsecError, match=needle.replace("-", "\\-")):
        sparsec.compile(src, output=tmp_path / "o", **args)
    assert not (tmp_path / "o").exists()


def test_calibration_data_mismatch_names_the_input(tmp_path):
    src = tmp_path / "mlp.onnx"
    onnx.save(GOLDEN["mlp"](), src)
    np.savez(tmp_path / "bad.npz", y=np.zeros((4, 32), np.float32))
    with pytest.raises(sparsec.SparsecError, match="x"):
        sparsec.compile(src, output=tmp_path / "o", nm="2:4", method="wanda", calib=tmp_path / "bad.npz")
    assert not (tmp_path / "o").exists()


def test_cli_calibrated_compile_with_random_data(tmp_path, transformer_models):
    import json

    from click.testing import CliRunner

    from sparsec.cli import cli

    src = tmp_path / "enc.onnx"
    onnx.save(transformer_models["torchscript"], src)
    args = ["compile", str(src), "--nm", "2:4", "--method", "sparsegpt", "--calib-random", "6",
            "--calib-range", "input_ids=0,100", "--shape", "input_ids=1,9",
            "--shape", "attention_mask=1,9", "--batch", "4", "--sequential", "--min-params", "0",
            "-o", str(tmp_path / "o"), "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    pruned = [e for e in report["layers"] if e["skipped_reason"] is None]
    assert len(pruned) == 12 and {e["method"] for e in pruned} == {"sparsegpt"}
    assert all(e["rel_error_basis"] == "gram" and e["calib_samples"] == 6 for e in pruned)
    levels = [p["level"] for p in report["passes"] if p["name"] == "calibrate"]
    assert levels == sorted(set(levels)) and len(levels) == 8  # q|k|v, o, ffn1, ffn2 per layer
    bad = CliRunner().invoke(cli, ["compile", str(src), "--nm", "2:4", "--method", "wanda",
                                   "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "needs calibration data" in bad.stderr


def im2col(x: np.ndarray, r: int, s: int, stride: int, pad: int) -> np.ndarray:
    """Patches [N·E·F, R·S·C] in (r, s, c) order, the obvious way."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, c, h, w = x.shape
    rows = []
    for b in range(n):
        for i in range(0, h - r + 1, stride):
            for j in range(0, w - s + 1, stride):
                rows.append(x[b, :, i:i + r, j:j + s].transpose(1, 2, 0).ravel())
    return np.array(rows, dtype=np.float64)


def test_conv_patch_gram_equals_im2col(tmp_path):
    model = GOLDEN["example"]()
    path, arrays = calib_file(tmp_path, "cnn", model, samples=3)
    layers = list(find_layers(model).layers)
    conv1 = next(la for la in layers if la.name == "conv1")  # 3x3, stride 2, pad 1
    data = open_calibration(input_specs(model), path=path)
    stats = collect_stats(model, TensorStore(path.parent), layers,
                          CalibrationSettings(data=data, batch=2, progress=False), {"conv1"})
    node = model.graph.node[conv1.node_index]
    x = np.concatenate([exposed(model, {"image": arrays["image"][i]}, [node.input[0]])[node.input[0]]
                        for i in range(3)])
    patches = im2col(x, 3, 3, stride=2, pad=1)
    got = stats.patches["conv1"]
    assert got.rows == len(patches)
    np.testing.assert_allclose(got.gram, patches.T @ patches, rtol=1e-4, atol=1e-3)


def test_sparsegpt_on_kxk_conv_keeps_tensorrt_layout_and_beats_wanda(tmp_path):
    src = tmp_path / "ex.onnx"
    model = GOLDEN["example"]()
    onnx.save(model, src)
    path, _ = calib_file(tmp_path, "cnn", model, samples=16)
    errors = {}
    for method in ("wanda", "sparsegpt"):
        report = sparsec.compile(src, output=tmp_path / method, nm="2:4", method=method, calib=path,
                                 bias_correct=False)  # the pruning methods alone (correction: on for wanda)
        errors[method] = report.verify["max_abs_diff"]
        weights = initializers(onnx.load(tmp_path / method / "model.onnx"))
        for e in report.layers:
            if e.skipped_reason is None and e.op == "Conv":
                w = weights[e.weight]
                groups = np.moveaxis(w, 1, -1).reshape(-1, 4)  # along C for each (m, r, s)
                assert ((groups != 0).sum(axis=1) <= 2).all()
                if method == "sparsegpt":
                    assert e.rel_error_basis == "gram (im2col)" and e.note is None
    assert errors["sparsegpt"] < errors["wanda"]
