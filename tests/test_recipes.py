"""Recipes: one compile runs any combination of stages in the fixed order, each stage on the graph the
previous one left, each structural step checked by its own oracle."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import sparsec
from sparsec.recipes import ORDER, STAGE_NAMES, options_from, stages_for

SHAPES = {"input_ids": (2, 12), "attention_mask": (2, 12)}
ORACLE_RTOL = 1e-5


def trt_axis(node: onnx.NodeProto, weight: str) -> int:
    """TensorRT's N:M axis, worked out here from the op (not from sparsec's report)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        return 1
    if node.op_type == "Gemm":
        return 1 if attrs.get("transB", 0) else 0
    return 0 if node.input[1] == weight else 1  # MatMul X @ W reduces W's axis 0


def assert_nm_on_trt_axes(path, n: int = 2, m: int = 4) -> int:
    """Every weight the final model's Conv/Gemm/MatMul read directly that holds any zero group is checked:
    at most n non-zeros in every m consecutive weights along TensorRT's axis. Returns how many held."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    checked = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        for name in node.input[1:2] if node.op_type != "MatMul" else node.input:
            w = inits.get(name)
            if w is None or w.ndim < 2:
                continue
            axis = trt_axis(node, name)
            if w.shape[axis] % m or np.count_nonzero(w) > w.size * n / m:
                continue  # a dense layer (stem, classifier left dense): nothing claimed
            groups = np.moveaxis(w, axis, -1).reshape(-1, w.shape[axis] // m, m)
            assert (np.count_nonzero(groups, axis=-1) <= n).all(), f"{name} breaks {n}:{m} on axis {axis}"
            checked += 1
    return checked


def oracle_within(report, rtol: float = ORACLE_RTOL) -> None:
    masked = report.verify["masked"]
    for out in masked["outputs"]:
        assert out["max_abs_diff"] <= rtol * max(out["max_abs_dense"], 1.0), out
    step = next(s for s in report.steps if s["name"] in ("channels", "transformer"))
    assert step["oracle"]["max_abs_diff"] == masked["max_abs_diff"]


def test_order_is_one_table():
    assert STAGE_NAMES == ("transformer", "channels", "fold-bn", "weights", "precision", "encode")
    assert [s.name for s in stages_for(options_from({"channels": 0.3, "nm": "2:4", "precision": "fp16"}))] \
        == ["channels", "fold-bn", "weights", "precision", "encode"]
    assert [s.name for s in stages_for(options_from({"heads": 0.25, "nm": "2:4"}))] == \
        ["transformer", "weights", "encode"]
    assert all(callable(s.step) and s.what for s in ORDER)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_channels_fold_bn_then_2_4(tmp_path, precision):
    from models import GOLDEN

    src = tmp_path / "resnet.onnx"
    onnx.save(GOLDEN["resnet"](), src)
    report = sparsec.compile(src, output=tmp_path / "o", channels=0.3, fold_bn=True, nm="2:4",
                             precision=precision)
    names = ["channels", "fold-bn", "weights"] + (["precision"] if precision == "fp16" else []) + ["encode"]
    assert [s["name"] for s in report.steps] == names
    oracle_within(report)
    assert report.channels["removed"] > 0
    out = onnx.load(str(tmp_path / "o" / "model.onnx"))
    assert not any(n.op_type == "BatchNormalization" for n in out.graph.node)
    pruned = [la for la in report.layers if la.pattern == "2:4"]
    assert len(pruned) >= 5 and assert_nm_on_trt_axes(tmp_path / "o" / "model.onnx") >= len(pruned)
    # the weights stage read the smaller graph: its layers have the kept channel counts (multiples of 4)
    assert all(la.shape[1] % 4 == 0 for la in pruned if la.op == "Conv")
    assert report.options["round_to"] == 4
    assert report.verify["outputs"] and report.verify["max_abs_diff"] > 0  # dense vs final, reported
    assert report.encoding["totals"]["tensors"] == len({la.weight for la in pruned})
    assert report.steps[0]["totals"]["weights_after"] < report.steps[0]["totals"]["params"]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_heads_ffn_then_sparsegpt_2_4(tmp_path, transformer_models, precision):
    src = tmp_path / "t.onnx"
    onnx.save(transformer_models["dynamo"], src)
    report = sparsec.compile(src, output=tmp_path / "o", heads=0.25, ffn=0.25, nm="2:4", method="sparsegpt",
                             calib_random=8, calib_range={"input_ids": (0, 100)}, shapes=SHAPES,
                             min_params=0, precision=precision)
    assert [s["name"] for s in report.steps][:2] == ["transformer", "weights"]
    oracle_within(report)
    blocks = report.transformer["blocks"]
    assert sum(b["heads_before"] - b["heads_after"] for b in blocks) > 0
    assert all(b["ffn_after"] < b["ffn_before"] for b in blocks)
    pruned = [la for la in report.layers if la.pattern == "2:4"]
    assert pruned and all(la.method == "sparsegpt" for la in pruned)
    # SparseGPT calibrated on the pruned graph: the FFN layers have their kept widths
    widths = {la.shape[0] for la in pruned} | {la.shape[1] for la in pruned}
    assert {b["ffn_after"] for b in blocks} <= widths
    assert assert_nm_on_trt_axes(tmp_path / "o" / "model.onnx") >= len({la.weight for la in pruned})
    assert report.verify["outputs"][0]["cosine"] > 0.5


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_fold_bn_alone(tmp_path, precision):
    from models import GOLDEN

    src = tmp_path / "resnet.onnx"
    onnx.save(GOLDEN["resnet"](), src)
    report = sparsec.compile(src, output=tmp_path / "o", fold_bn=True, precision=precision)
    assert [s["name"] for s in report.steps][0] == "fold-bn" and report.steps[0]["modified"]
    assert report.nothing_pruned is None
    out = onnx.load(str(tmp_path / "o" / "model.onnx"))
    assert not any(n.op_type == "BatchNormalization" for n in out.graph.node)
    tol = 1e-4 if precision == "fp32" else 5e-2
    for o in report.verify["outputs"]:
        assert o["max_abs_diff"] <= tol * max(o["max_abs_dense"], 1.0)


def test_report_carries_the_recipe_it_ran(tmp_path):
    from models import example_path

    report = sparsec.compile(example_path(), output=tmp_path / "o", channels=0.3, nm="2:4")
    stages = [next(iter(s)) for s in report.recipe["stages"]]
    assert stages == ["channels", "fold-bn", "weights", "encode"]
    weights = report.recipe["stages"][2]["weights"]
    assert weights["nm"] == "2:4" and weights["method"] == "magnitude" and "block_size" in weights
    assert report.as_dict()["recipe"] == report.recipe and report.as_dict()["steps"] == report.steps


def test_no_fold_bn_is_recorded(tmp_path):
    from models import example_path

    report = sparsec.compile(example_path(), output=tmp_path / "o", channels=0.3, fold_bn=False)
    assert {"fold-bn": {"fold_bn": False}} in report.recipe["stages"]
    assert [s["name"] for s in report.steps] == ["channels"]


def test_unknown_keyword_is_one_line(tmp_path):
    from models import example_path

    with pytest.raises(sparsec.SparsecError, match="unknown option 'nn'"):
        sparsec.compile(example_path(), output=tmp_path / "o", nn="2:4")
    with pytest.raises(sparsec.SparsecError, match=r"channels=1\.0 is out of range"):
        sparsec.compile(example_path(), output=tmp_path / "o", channels=1.0, nm="2:4")


def test_structural_oracle_on_external_data_reads_the_rewritten_weights(tmp_path):
    """The step's oracle snapshot must see the pass's rewrites of external weights (pending in the
    tensor store), not the values still in the .data file."""
    from models import GOLDEN

    src = tmp_path / "resnet.onnx"
    onnx.save(GOLDEN["resnet"](), src, save_as_external_data=True, all_tensors_to_one_file=True,
              location="resnet.onnx.data", size_threshold=0)
    report = sparsec.compile(src, output=tmp_path / "o", channels=0.3, nm="2:4")
    oracle_within(report)
    assert report.channels["removed"] > 0
