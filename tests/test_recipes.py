"""Recipes: one compile runs any combination of stages in the fixed order, each stage on the graph the
previous one left, each structural step checked by its own oracle."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import sparsec
from sparsec.core.options import (
    RECIPE_OPTIONS,
    ChannelsOptions,
    CorrectOptions,
    EncodeOptions,
    FoldBNOptions,
    Method,
    PrecisionOptions,
    TransformerOptions,
    WeightsOptions,
    declared,
)
from sparsec.recipes import ORDER, STAGE_NAMES, Stage, options_from, stages_for
from sparsec.recipes.step_oracle import FOLD_RTOL
from sparsec.recipes.step_plans import WeightsPlan

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


def weights_step_reported(step: dict) -> None:
    """The weights step's oracle: dense-before vs pruned-after on the same inputs; pruning changes the
    outputs (diff > 0) but keeps their direction."""
    oracle = step["oracle"]
    assert oracle["against"].startswith("the graph before this step")
    assert oracle["max_abs_diff"] > 0 and 0.5 < oracle["cosine"] <= 1.0 + 1e-9


def precision_step_reported(step: dict) -> None:
    """The precision step's oracle: fp32 before conversion vs the converted graph (the drift)."""
    oracle = step["oracle"]
    assert oracle["max_abs_diff"] > 0 and oracle["max_rel_diff"] <= 5e-2 and oracle["cosine"] > 0.999
    assert step["plan"].startswith("convert to fp16, ") and "kept in fp32" in step["plan"]


def test_order_is_one_table():
    assert STAGE_NAMES == ("transformer", "channels", "fold-bn", "weights", "correct", "precision", "encode")
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
    report = sparsec.compile(src, output=tmp_path / "o", channels=0.3, round_to=1, fold_bn=True, nm="2:4",
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
    steps = {s["name"]: s for s in report.steps}
    assert steps["fold-bn"]["oracle"]["max_rel_diff"] <= FOLD_RTOL  # folding is exact, step by step
    weights_step_reported(steps["weights"])
    if precision == "fp16":
        precision_step_reported(steps["precision"])


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_heads_ffn_then_sparsegpt_2_4(tmp_path, transformer_models, precision):
    src = tmp_path / "t.onnx"
    onnx.save(transformer_models["dynamo"], src)
    report = sparsec.compile(src, output=tmp_path / "o", heads=0.25, ffn=0.25, round_to=1, nm="2:4",
                             method="sparsegpt",
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
    steps = {s["name"]: s for s in report.steps}
    weights_step_reported(steps["weights"])
    if precision == "fp16":
        precision_step_reported(steps["precision"])


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
    fold = report.steps[0]["oracle"]  # the fold alone, before any conversion
    assert fold["tolerance"] == FOLD_RTOL and 0.0 <= fold["max_rel_diff"] <= FOLD_RTOL
    assert report.steps[0]["plan"] == "fold 6 of 6 BatchNormalization, keep 0"
    if precision == "fp16":
        precision_step_reported(report.steps[1])


def test_report_carries_the_recipe_it_ran(tmp_path):
    from models import example_path

    report = sparsec.compile(example_path(), output=tmp_path / "o", channels=0.3, round_to=1, nm="2:4")
    stages = [next(iter(s)) for s in report.recipe["stages"]]
    assert stages == ["channels", "fold-bn", "weights", "encode"]
    weights = report.recipe["stages"][2]["weights"]
    assert weights["nm"] == "2:4" and weights["method"] == "magnitude" and "block_size" in weights
    assert report.as_dict()["recipe"] == report.recipe and report.as_dict()["steps"] == report.steps


def test_no_fold_bn_is_recorded(tmp_path):
    from models import example_path

    report = sparsec.compile(example_path(), output=tmp_path / "o", channels=0.3, round_to=1, fold_bn=False)
    assert {"fold-bn": {"fold_bn": False}} in report.recipe["stages"]
    assert [s["name"] for s in report.steps] == ["channels"]


def test_unknown_keyword_is_one_line(tmp_path):
    from models import example_path

    with pytest.raises(sparsec.SparsecError, match="unknown option 'nn'"):
        sparsec.compile(example_path(), output=tmp_path / "o", nn="2:4")
    with pytest.raises(sparsec.SparsecError, match=r"channels=1\.0 is out of range"):
        sparsec.compile(example_path(), output=tmp_path / "o", channels=1.0, round_to=1, nm="2:4")


def test_structural_oracle_on_external_data_reads_the_rewritten_weights(tmp_path):
    """The step's oracle snapshot must see the pass's rewrites of external weights (pending in the
    tensor store), not the values still in the .data file."""
    from models import GOLDEN

    src = tmp_path / "resnet.onnx"
    onnx.save(GOLDEN["resnet"](), src, save_as_external_data=True, all_tensors_to_one_file=True,
              location="resnet.onnx.data", size_threshold=0)
    report = sparsec.compile(src, output=tmp_path / "o", channels=0.3, round_to=1, nm="2:4")
    oracle_within(report)
    assert report.channels["removed"] > 0


def test_choices_are_enums_written_as_plain_strings(tmp_path):
    from models import example_path

    options = options_from({"nm": "2:4", "method": "wanda", "calib_random": 2, "precision": "fp16"})
    assert options.method is Method.WANDA and options.method == "wanda" and f"{options.method}" == "wanda"
    assert options.of("weights").method is Method.WANDA
    report = sparsec.compile(example_path(), output=tmp_path / "o", nm="2:4", encode="bitmap")
    assert type(report.options["method"]) is str and type(report.options["encode"]) is str
    text = (tmp_path / "o" / "recipe.yaml").read_text()
    assert "method: magnitude" in text and "encode: bitmap" in text and "!!" not in text


@pytest.mark.parametrize(("keyword", "value", "choices"), [
    ("method", "obs", "magnitude, wanda, sparsegpt"), ("group", "row", "output, layer, input"),
    ("precision", "int4", "fp32, fp16, bf16"), ("encode", "zip", "auto, none, dense"),
])
def test_a_bad_choice_is_refused_by_the_api(tmp_path, keyword, value, choices):
    from models import example_path

    with pytest.raises(sparsec.SparsecError, match=rf"{keyword}='{value}' is unknown") as info:
        sparsec.compile(example_path(), output=tmp_path / "o", nm="2:4", **{keyword: value})
    assert choices in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "o").exists()


def test_each_recipe_options_object_holds_only_its_fields():
    options = options_from({"channels": 0.3, "nm": "2:4", "precision": "fp16", "seed": 2})
    seen: set[str] = set()
    for cls in RECIPE_OPTIONS:
        part = options.of(cls.stage)
        names = {f.name for f in dataclasses.fields(part)}
        assert type(part) is cls and names == {f.name for f in declared(cls.stage)}
        assert not names & seen  # declared once
        seen |= names
        for name in names:
            assert getattr(part, name) == getattr(options, name)
    assert seen == {f.name for f in declared()}
    assert options.of("channels").round_to == 8  # lcm(8, M): the cross-recipe default reaches the stage
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.of("weights").nm = None  # type: ignore[misc]


def test_each_step_receives_only_its_own_options():
    from types import SimpleNamespace

    options = options_from({"heads": 0.25, "nm": "2:4", "precision": "fp16"})
    seen = []
    for stage in ORDER:
        Stage(stage.name, stage.runs, lambda run, opts: seen.append(type(opts)) or {}, stage.what).apply(
            SimpleNamespace(options=options))
    assert seen == [TransformerOptions, ChannelsOptions, FoldBNOptions, WeightsOptions, CorrectOptions,
                    PrecisionOptions, EncodeOptions]


@pytest.mark.parametrize(("make", "needle"), [
    (lambda: WeightsOptions(sparsity=1.5), "--sparsity 1.5 is out of range"),
    (lambda: WeightsOptions(method="obs"), "--method 'obs' is unknown"),
    (lambda: ChannelsOptions(channel_score="l3"), "--channel-score 'l3' is unknown"),
    (lambda: ChannelsOptions(recover=True), "--recover refits layers after --channels"),
    (lambda: TransformerOptions(heads=0.2, heads_per_layer=2), "exclusive"),
    (lambda: EncodeOptions(rle_bits=0), "--rle-bits 0 is out of range"),
])
def test_each_recipe_validates_its_own_fields(make, needle):
    with pytest.raises(sparsec.SparsecError, match=needle):
        make()


def test_plans_print_their_summary(tmp_path):
    from models import GOLDEN
    from sparsec.core.report import summary_table

    plan = WeightsPlan("2:4", "magnitude", targets=5, skipped=4)
    assert str(plan) == plan.summary() == "2:4 by magnitude on 5 weights, 4 layers left dense"
    src = tmp_path / "resnet.onnx"
    onnx.save(GOLDEN["resnet"](), src)
    report = sparsec.compile(src, output=tmp_path / "o", channels=0.3, round_to=1, nm="2:4")
    plans = {s["name"]: s["plan"] for s in report.steps}
    removed = report.channels["removed"]
    assert plans["channels"].startswith(f"remove {removed} of {report.channels['removable']} removable ")
    assert plans["fold-bn"] == "fold 6 of 6 BatchNormalization, keep 0"
    pruned = len({la.weight for la in report.layers if la.pattern == "2:4"})
    assert plans["weights"].startswith(f"2:4 by magnitude on {pruned} weights")
    assert plans["encode"].startswith(f"encode {pruned} tensors")
    text = summary_table(report)
    assert [line.split(":")[0] for line in text.splitlines() if line.startswith("step ")] == \
        ["step channels", "step fold-bn", "step weights", "step encode"]
    assert "step fold-bn: fold 6 of 6 BatchNormalization, keep 0; oracle vs before: max |diff|" in text


def test_a_wrong_fold_is_refused_by_its_oracle(tmp_path, monkeypatch):
    """A fold that changes the outputs (here: a folded weight scaled by 1.01 afterwards) must not be
    written: the fold-bn step's own oracle compares it with the graph before it."""
    from models import GOLDEN
    from sparsec.channels.fold_bn import FoldBatchNormPass
    from sparsec.recipes import steps

    class SkewedFold(FoldBatchNormPass):
        def run(self, ctx):
            result = super().run(ctx)
            conv = next(n for n in ctx.model.graph.node if n.op_type == "Conv")
            tensor = next(t for t in ctx.model.graph.initializer if t.name == conv.input[1])
            ctx.store.write(tensor, ctx.store.read(tensor) * 1.01)
            return result

    monkeypatch.setattr(steps, "FoldBatchNormPass", SkewedFold)
    src = tmp_path / "resnet.onnx"
    onnx.save(GOLDEN["resnet"](), src)
    with pytest.raises(sparsec.SparsecError, match="BatchNorm folding changed the outputs"):
        sparsec.compile(src, output=tmp_path / "o", channels=0.3, round_to=1, nm="2:4")
    assert not (tmp_path / "o").exists()


def test_ffn_keeps_its_channel_shaping_in_the_recipe(tmp_path, transformer_models):
    """--ffn reads --round-to (a channels-stage option): recipe.yaml must carry it, or --recipe would
    reproduce a different compile."""
    from sparsec.recipes.recipe_file import read_recipe

    src = tmp_path / "t.onnx"
    onnx.save(transformer_models["dynamo"], src)
    report = sparsec.compile(src, output=tmp_path / "o", ffn=0.25, round_to=8, shapes=SHAPES,
                             calib_range={"input_ids": (0, 100)})
    again = options_from(read_recipe(tmp_path / "o" / "recipe.yaml", STAGE_NAMES))
    assert again.round_to == 8 and again.as_dict() == report.options
    assert [s["name"] for s in report.steps] == ["transformer"]
