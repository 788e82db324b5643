"""Channel removal: the smaller model equals the dense model with the same filters zeroed."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import run

import sparsec
from models import GOLDEN
from sparsec.channels.channel_analysis import analyse_channels
from sparsec.channels.compensation import compute_compensation
from sparsec.channels.prune_channels import PruneChannelsPass
from sparsec.core.pipeline import PassContext
from sparsec.core.shapes import fixed_input_shapes, infer_shapes
from sparsec.core.tensors import TensorStore

EXACT = ["mlp", "gemm_transb"]  # every consumer is a Gemm/MatMul: compensation is exact


def prune_random(model: onnx.ModelProto, seed: int, fraction: float = 0.4, compensate: bool = True):
    """Remove a random subset of removable channels; return pruned and masked models."""
    fixed = fixed_input_shapes(model, {})
    analysis = analyse_channels(model, infer_shapes(model, fixed))
    classes = [c for c in analysis.classes() if c not in analysis.untouchable]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(classes, size=int(len(classes) * fraction), replace=False) if classes else []
    by_class = analysis.classes()
    removed = frozenset(e for c in chosen for e in by_class[int(c)])
    store = TensorStore(Path("."))
    comp = compute_compensation(model, store, analysis, removed, fixed)
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    ctx = PassContext(pruned, TensorStore(Path(".")))
    PruneChannelsPass(analysis, removed, comp.constants if compensate else {}).run(ctx)
    return ctx.model, comp, analysis, removed


def feeds_for(model, batch=2, seed=1):
    rng = np.random.default_rng(seed)
    out = {}
    for inp in model.graph.input:
        dims = [d.dim_value or batch for d in inp.type.tensor_type.shape.dim]
        out[inp.name] = rng.standard_normal(dims).astype(np.float32)
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name", EXACT)
def test_oracle_exact_for_gemm_and_matmul_consumers(name, seed):
    model = GOLDEN[name]()
    pruned, comp, _, removed = prune_random(model, seed)
    assert removed
    onnx.checker.check_model(pruned, full_check=True)
    feeds = feeds_for(model)
    for got, want in zip(run(pruned, feeds), run(comp.masked, feeds), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", ["cnn", "example"])
def test_oracle_exact_on_convnets_border_included(name, seed):
    model = GOLDEN[name]()
    pruned, comp, analysis, removed = prune_random(model, seed)
    onnx.checker.check_model(pruned, full_check=True)
    feeds = {k: v[:1] for k, v in feeds_for(model).items()}
    dense_out = run(model, feeds)[0]
    got, want = run(pruned, feeds)[0], run(comp.masked, feeds)[0]
    assert got.shape == dense_out.shape  # graph outputs never change shape
    # padded k×k convs get an exact border correction: every pixel, the border included
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    assert not comp.varying


def test_zero_filters_are_removed_exactly(tmp_path):
    model = GOLDEN["mlp"]()
    inits = {t.name: t for t in model.graph.initializer}
    w = onnx.numpy_helper.to_array(inits["fc0.weight"]).copy()
    b = onnx.numpy_helper.to_array(inits["fc0.bias"]).copy()
    w[:, :16] = 0.0
    b[:16] = 0.0
    inits["fc0.weight"].CopyFrom(onnx.numpy_helper.from_array(w, "fc0.weight"))
    inits["fc0.bias"].CopyFrom(onnx.numpy_helper.from_array(b, "fc0.bias"))
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    report = sparsec.compile(src, channels=16 / (64 + 32), round_to=1, channels_per_layer_max=0.25,
                             output=tmp_path / "o", min_params=0)
    source = next(s for s in report.channels["sources"] if s["name"] == "fc0_matmul")
    assert source["kept"] == 48
    assert report.verify["max_abs_diff"] < 1e-5  # dense == pruned: the removed channels were dead
    assert report.verify["masked"]["max_abs_diff"] < 1e-5


def test_cascade_updates_every_consumer_and_reports_blocked_groups(tmp_path):
    src = tmp_path / "cnn.onnx"
    onnx.save(GOLDEN["cnn"](), src)
    report = sparsec.compile(src, channels=0.5, round_to=1, output=tmp_path / "o", min_params=0)
    model = onnx.load(tmp_path / "o" / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)  # folded
    groups = report.channels["groups"]
    blocked = [g for g in groups if g["untouchable"]]
    assert any("grp_conv" in r for g in blocked for r in g["untouchable"])
    assert any("graph output" in r for g in blocked for r in g["untouchable"])
    kept = {s["name"]: s["kept"] for s in report.channels["sources"]}
    assert kept["conv2_conv"] == 32 and kept["head_gemm"] == 10  # untouchable groups stay whole
    assert kept["stem_conv"] < 16
    assert report.totals["macs_nonzero"] < report.totals["macs_dense"]
    dense_max = report.verify["outputs"][0]["max_abs_dense"]
    assert not report.channels["compensation"]["inexact_consumers"]
    assert report.verify["masked"]["max_abs_diff"] <= 1e-6 * max(1.0, dense_max)


def test_round_to_and_per_layer_cap(tmp_path):
    src = tmp_path / "mlp.onnx"
    onnx.save(GOLDEN["mlp"](hidden=(64, 48)), src)
    report = sparsec.compile(src, channels=0.6, round_to=8, output=tmp_path / "o", min_params=0)
    for s in report.channels["sources"]:
        if s["kept"] != s["channels"]:
            assert s["kept"] % 8 == 0 and s["kept"] >= 8
    capped = sparsec.compile(src, channels=0.9, round_to=1, channels_per_layer_max=0.25,
                             output=tmp_path / "c", min_params=0)
    for s in capped.channels["sources"]:
        assert s["channels"] - s["kept"] <= int(0.25 * s["channels"])


@pytest.mark.parametrize("score", ["l1", "l2", "bn"])
def test_channel_scores_run_and_prune(tmp_path, score):
    src = tmp_path / "cnn.onnx"
    onnx.save(GOLDEN["cnn"](), src)
    report = sparsec.compile(src, channels=0.3, round_to=1, channel_score=score, output=tmp_path / "o",
                             min_params=0)
    assert report.channels["removed"] > 0
    assert report.options["channel_score"] == score


def test_act_score_and_recover_use_calibration(tmp_path):
    src = tmp_path / "mlp.onnx"
    onnx.save(GOLDEN["mlp"](hidden=(64, 64)), src)
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((512, 1, 32)).astype(np.float32))
    plain = sparsec.compile(src, channels=0.5, round_to=1, channel_score="act", calib=calib, recover=False,
                            output=tmp_path / "a", min_params=0)  # with data the refit is the default
    recovered = sparsec.compile(src, channels=0.5, round_to=1, channel_score="act", calib=calib, recover=True,
                                output=tmp_path / "r", min_params=0)
    assert plain.channels["removed"] == recovered.channels["removed"] > 0
    rec = recovered.channels["recovery"]
    assert rec and all(r["error_after"] < r["error_before"] for r in rec)
    feeds = {"x": np.random.default_rng(5).standard_normal((32, 32)).astype(np.float32)}
    dense = run(str(src), feeds)[0]
    err_plain = np.linalg.norm(run(str(tmp_path / "a" / "model.onnx"), feeds)[0] - dense)
    err_rec = np.linalg.norm(run(str(tmp_path / "r" / "model.onnx"), feeds)[0] - dense)
    assert err_rec < err_plain


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"channels": 1.0}, "channels=1.0 is out of range"),
    ({"channels": -0.1}, "channels=-0.1 is out of range"),
    ({"channels": 0.5, "heads": 0.25}, "are exclusive"),
    ({"channels": 0.5, "channel_score": "act"}, "need calibration data"),
    ({"channels": 0.5, "round_to": 0}, "round_to=0"),
])
def test_structured_option_errors(tmp_path, kwargs, needle):
    src = tmp_path / "m.onnx"
    onnx.save(GOLDEN["mlp"](), src)
    with pytest.raises(sparsec.SparsecError, match=needle.replace("-", "\\-")):
        sparsec.compile(src, output=tmp_path / "o", **kwargs)
    assert not (tmp_path / "o").exists()


def test_ratio_near_one_keeps_a_channel_everywhere(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(GOLDEN["mlp"](), src)
    report = sparsec.compile(src, channels=0.999, round_to=1, output=tmp_path / "o", min_params=0)
    assert all(s["kept"] >= 1 for s in report.channels["sources"])
    assert report.verify["masked"]["max_abs_diff"] < 1e-4


def test_nothing_prunable_succeeds_unchanged(tmp_path):
    src = tmp_path / "w.onnx"
    onnx.save(GOLDEN["weight_paths"](), src)
    report = sparsec.compile(src, channels=0.5, round_to=1, output=tmp_path / "o", min_params=0)
    assert report.channels["removed"] == 0
    assert report.verify["max_abs_diff"] == 0.0


# consumers whose removed input is not one constant (reported as inexact_consumers)
INEXACT = {"mobilenetv3": {"/block1/project/project.0/Conv", "/block2/project/project.0/Conv"},
           "unet": {"/dec1/dec1.0/Conv"}}
STRUCTURED = ["resnet", "mobilenetv3", "c2f", "unet", "structured_mlp", "reshape_gemm"]


@pytest.mark.parametrize("name", STRUCTURED)
def test_structured_golden_models_cascade(tmp_path, name):
    dense = GOLDEN[name]()
    src = tmp_path / f"{name}.onnx"
    onnx.save(dense, src)
    report = sparsec.compile(src, channels=0.4, round_to=1, output=tmp_path / "o", min_params=0)
    pruned = onnx.load(tmp_path / "o" / "model.onnx")
    onnx.checker.check_model(pruned, full_check=True)
    assert report.channels["removed"] > 0
    assert report.totals["macs_nonzero"] < 0.8 * report.totals["macs_dense"]
    kinds = {n.op_type for n in dense.graph.node} - {"BatchNormalization"}
    border = {"Shape", "Slice", "Concat", "ConstantOfShape", "Add"}  # exact padded-border compensation
    assert {n.op_type for n in pruned.graph.node} <= kinds | border
    assert kinds <= {n.op_type for n in pruned.graph.node}  # nothing but BN disappears
    v = report.verify
    assert v["outputs"][0]["name"] == dense.graph.output[0].name
    scale = v["outputs"][0]["max_abs_dense"]
    inexact = report.channels["compensation"]["inexact_consumers"]
    # only models whose removed channels vary over positions before a consumer (squeeze-excite's
    # global pool, ConvTranspose taps) are inexact, and the report names those consumers
    assert bool(inexact) == (name in INEXACT), inexact
    assert v["masked"]["max_abs_diff"] <= (0.05 * scale if inexact else 1e-5 * max(1.0, scale))


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("name", ["c2f", "unet", "mobilenetv3"])
def test_random_channel_choices_on_structured_models(name, seed):
    model = GOLDEN[name]()
    pruned, comp, _, removed = prune_random(model, seed, fraction=0.5)
    bare, _, _, _ = prune_random(model, seed, fraction=0.5, compensate=False)
    assert removed
    onnx.checker.check_model(pruned, full_check=True)
    feeds = {"x": feeds_for(model)["x"][:1]}
    want = run(comp.masked, feeds)[0]
    error = np.abs(run(pruned, feeds)[0] - want).max()
    assert error < np.abs(run(bare, feeds)[0] - want).max()  # compensation always helps
    if name in INEXACT:  # the removed channels vary before these consumers: named, bounded loosely
        assert set(comp.varying) == INEXACT[name]
        if name != "unet":  # ConvTranspose consumers get the tap average only: measured, not bounded
            assert error <= 0.05 * np.abs(want).max()
    else:
        np.testing.assert_allclose(run(pruned, feeds)[0], want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_split_and_slice_bounds_follow_the_kept_channels(tmp_path):
    src = tmp_path / "c2f.onnx"
    onnx.save(GOLDEN["c2f"](), src)
    sparsec.compile(src, channels=0.5, round_to=1, output=tmp_path / "o", min_params=0)
    model = onnx.load(tmp_path / "o" / "model.onnx")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    split = next(n for n in model.graph.node if n.op_type == "Split")
    sizes = inits[split.input[1]]
    producer = {o: n for n in model.graph.node for o in n.output}
    inferred = onnx.shape_inference.infer_shapes(model)
    dims = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
            for vi in inferred.graph.value_info}
    assert sum(sizes) == dims[split.input[0]][1]
    assert producer[split.input[0]] is not None


def _opset7_cnn() -> onnx.ModelProto:
    """Conv -> BatchNorm (β > 0) -> Relu -> padded 3×3 Conv at opset 7, as old Paddle exports write it."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    arrays = {"w1": rng.standard_normal((8, 3, 3, 3)), "w2": rng.standard_normal((4, 8, 3, 3)),
              "gamma": rng.uniform(0.5, 1.5, 8), "beta": rng.uniform(0.5, 1.0, 8),
              "mean": rng.standard_normal(8) * 0.1, "var": rng.uniform(0.5, 1.5, 8)}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()]
    bn_inputs = ["c1", "gamma", "beta", "mean", "var"]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("BatchNormalization", bn_inputs, ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", kernel_shape=[3, 3], pads=[1] * 4)]
    graph = helper.make_graph(nodes, "opset7_cnn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, "h", "w"])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=4)


def test_border_correction_at_opset_7(tmp_path):
    """Below opset 10 Slice takes attributes and below 9 there is no ConstantOfShape: the correction
    of a padded consumer must still load, stay exact, and fold with the BatchNorm."""
    src = tmp_path / "m.onnx"
    onnx.save(_opset7_cnn(), src)
    report = sparsec.compile(src, output=tmp_path / "o", channels=0.5, round_to=1, min_params=0,
                             shapes={"x": (2, 3, 10, 12)})
    assert report.channels["removed"] == 4
    assert report.verify["masked"]["max_abs_diff"] < 1e-4 and report.verify["max_abs_diff"] > 1e-2
    pruned = onnx.load(tmp_path / "o" / "model.onnx")
    ops = {n.op_type for n in pruned.graph.node}
    assert pruned.opset_import[0].version == 7 and "Tile" in ops and "BatchNormalization" not in ops
    onnx.checker.check_model(pruned, full_check=True)
    x = np.random.default_rng(1).standard_normal((1, 3, 7, 9)).astype(np.float32)
    assert run(str(tmp_path / "o" / "model.onnx"), {"x": x})[0].shape == (1, 4, 7, 9)
