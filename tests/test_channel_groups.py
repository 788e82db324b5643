"""Channel groups are kept whole only for a real reason, and the report says which and why."""

import numpy as np
import onnx
import pytest
from helpers import run
from onnx import TensorProto, helper, numpy_helper

import sparsec


def _tensor(rng, name, shape, scale=0.5, offset=0.0):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale + offset).astype(np.float32), name)


def _model(nodes, inits, name):
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 8, 8])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def identity_constants_model(seed=0):
    """Conv → Mul by Identity(scale[1,8,1,1]) → Add Identity(Identity(shift)) → Relu → Conv (the
    decomposed BatchNorm some exporters write, its constants behind Identity)."""
    rng = np.random.default_rng(seed)
    inits = [_tensor(rng, "w1", (8, 3, 3, 3)), _tensor(rng, "b1", (8,)),
             _tensor(rng, "scale", (1, 8, 1, 1), 0.3, 1.0), _tensor(rng, "shift", (1, 8, 1, 1)),
             _tensor(rng, "w2", (4, 8, 1, 1)), _tensor(rng, "b2", (4,))]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["y1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Identity", ["scale"], ["scale_id"], name="scale_id"),
        helper.make_node("Mul", ["y1", "scale_id"], ["y2"], name="mul"),
        helper.make_node("Identity", ["shift"], ["shift_a"], name="shift_a"),
        helper.make_node("Identity", ["shift_a"], ["shift_b"], name="shift_b"),
        helper.make_node("Add", ["y2", "shift_b"], ["y3"], name="add"),
        helper.make_node("Relu", ["y3"], ["y4"], name="relu"),
        helper.make_node("Conv", ["y4", "w2", "b2"], ["out"], name="c2"),
    ]
    return _model(nodes, inits, "identity_constants")


def partial_shape_model(seed=0):
    """Conv output gated by a [1, 1, 8, ?] map: ONNX shape inference cannot settle its last dim
    (a Slice end computed by ReduceMax, then a Concat) but knows its channel dim is 1."""
    rng = np.random.default_rng(seed)
    inits = [_tensor(rng, "w1", (8, 3, 3, 3)), _tensor(rng, "b1", (8,)),
             _tensor(rng, "w2", (4, 8, 1, 1)), _tensor(rng, "b2", (4,)),
             numpy_helper.from_array(np.array([0], np.int64), "start"),
             numpy_helper.from_array(np.array([4], np.int64), "half"),
             numpy_helper.from_array(np.array([3], np.int64), "axis")]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["y1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["x"], ["m"], name="mean", axes=[1], keepdims=1),
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("ReduceMax", ["s"], ["end"], name="end", keepdims=1),
        helper.make_node("Slice", ["m", "start", "half", "axis"], ["left"], name="left"),
        helper.make_node("Slice", ["m", "half", "end", "axis"], ["right"], name="right"),
        helper.make_node("Concat", ["left", "right"], ["m2"], name="concat", axis=3),
        helper.make_node("Sigmoid", ["m2"], ["gate"], name="sigmoid"),
        helper.make_node("Mul", ["y1", "gate"], ["y2"], name="gated"),
        helper.make_node("Relu", ["y2"], ["y3"], name="relu"),
        helper.make_node("Conv", ["y3", "w2", "b2"], ["out"], name="c2"),
    ]
    return _model(nodes, inits, "partial_shape")


@pytest.mark.parametrize("build", [identity_constants_model, partial_shape_model],
                         ids=["identity-constants", "partial-shape"])
def test_group_is_removable_and_oracle_holds(tmp_path, build):
    model = build()
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    report = sparsec.compile(src, output=tmp_path / "o", channels=0.5, round_to=1, min_params=0)
    c1 = next(s for s in report.channels["sources"] if s["name"] == "c1")
    assert c1["channels"] == 8 and c1["kept"] == 4
    assert report.channels["removed"] == 4
    assert report.verify["masked"]["max_abs_diff"] < 1e-4
    pruned = onnx.load(tmp_path / "o" / "model.onnx")
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    assert run(pruned, feeds)[0].shape == run(model, feeds)[0].shape == (1, 4, 8, 8)
    sizes = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    assert sizes["w2"] == (4, 4, 1, 1)


def test_skipped_and_layers_agree(tmp_path):
    model = identity_constants_model()
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    report = sparsec.compile(src, output=tmp_path / "o", channels=0.5, round_to=1, min_params=0)
    cut = {la.name for la in report.layers if la.pattern == "channels"}
    whole = {la.name: la.skipped_reason for la in report.layers if la.pattern == "dense"}
    assert cut == {"c1", "c2"} and not whole  # c2 loses input channels: it is cut
    assert report.skipped == []
    # ratio 0: every layer is left whole, named with the reason
    report = sparsec.compile(src, output=tmp_path / "o2", channels=0.0, round_to=1, min_params=0)
    skipped = {s["name"]: s["reason"] for s in report.skipped}
    assert set(skipped) == {la.name for la in report.layers} == {"c1", "c2"}
    assert skipped["c2"].startswith("channels kept whole: reaches graph output out")
    assert skipped["c1"] == "none of its removable channels ranked among the lowest"
    assert all(la.skipped_reason == skipped[la.name] for la in report.layers)
