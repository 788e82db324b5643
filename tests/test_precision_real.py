"""fp16 on real-model shapes: If/Loop bodies that read outer-scope tensors (silero-vad), Resize's
fp32-only scales/roi at every opset, and contrib ops whose schema takes float only (ddddocr)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparsec.runtime.lowp_support import lowp_unsupported_ops
from sparsec.runtime.precision import convert_precision

F = TensorProto.FLOAT
# fp16 keeps 11 significant bits; a few ops on O(1) values stay far inside this, a wrong or
# dropped op (or a branch reading the wrong tensor) does not.
RTOL, ATOL = 1e-2, 1e-2


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _check_close(dense: onnx.ModelProto, feeds_list: list[dict]) -> onnx.ModelProto:
    """Convert, check the result with the full checker and compare it with fp32 on every feed."""
    low = convert_precision(dense, "fp16")
    onnx.checker.check_model(low, full_check=True)
    assert [v.type.tensor_type.elem_type for v in low.graph.output] == [
        v.type.tensor_type.elem_type for v in dense.graph.output
    ]
    for feeds in feeds_list:
        for ref, got in zip(_run(dense, feeds), _run(low, feeds), strict=True):
            assert got.dtype == ref.dtype
            np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
    return low


def _branch(name: str, nodes: list, out: str) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, F, [1, 8])])


def if_model() -> onnx.ModelProto:
    """x -> MatMul(W) -> h; If(c) with branches that read, from the outer scope: an initializer
    only they use (``Wb``), a graph input no main node reads (``s``), a main-graph Cast output only
    they read (``hf``), and ``h``; one branch has its own Cast(to=FLOAT) and a Resize (fp32-only
    scales, blocked) reading outer tensors. silero-vad has all of these."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32) * 0.3, "W"),
        numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32) * 0.3, "Wb"),
        numpy_helper.from_array(np.array([1, 1, 1, 2], np.float32), "scales"),
        numpy_helper.from_array(np.array([1, 8], np.int64), "shp"),
    ]
    n = helper.make_node
    const = lambda name, arr: n("Constant", [], [name], name=name, value=numpy_helper.from_array(arr))  # noqa: E731
    then_b = _branch(
        "then_b",
        [
            const("axes01", np.array([0, 1], np.int64)),
            const("shp2", np.array([2, 8], np.int64)),
            n("MatMul", ["h", "Wb"], ["t1"], name="t_mm"),
            n("Cast", ["t1"], ["t2"], name="t_cast", to=F),
            n("Add", ["t2", "s"], ["t3"], name="t_add"),
            n("Unsqueeze", ["t3", "axes01"], ["t4"], name="t_unsq"),
            n("Resize", ["t4", "", "scales"], ["t5"], name="t_resize", mode="nearest"),
            n("Reshape", ["t5", "shp2"], ["t6"], name="t_rs"),
            n("ReduceMax", ["t6"], ["then_out"], name="t_max", axes=[0], keepdims=1),
        ],
        "then_out",
    )
    else_b = _branch("else_b", [n("Mul", ["hf", "h"], ["else_out"], name="e_mul")], "else_out")
    nodes = [
        n("MatMul", ["x", "W"], ["h0"], name="mm"),
        n("Reshape", ["h0", "shp"], ["h"], name="rs"),
        n("Cast", ["h"], ["hf"], name="own_cast", to=F),
        n("If", ["c"], ["y"], name="branch", then_branch=then_b, else_branch=else_b),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", F, [1, 8]),
            helper.make_tensor_value_info("s", F, [1, 8]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", F, [1, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _if_feeds(cond: bool) -> dict:
    rng = np.random.default_rng(1)
    return {
        "x": rng.standard_normal((1, 8)).astype(np.float32),
        "s": rng.standard_normal((1, 8)).astype(np.float32),
        "c": np.array(cond),
    }


def test_if_branches_reading_outer_scope_convert_and_match_fp32():
    dense = if_model()
    low = _check_close(dense, [_if_feeds(True), _if_feeds(False)])
    weights = {t.name: t.data_type for t in low.graph.initializer}
    assert weights["W"] == TensorProto.FLOAT16 and weights["Wb"] == TensorProto.FLOAT16


def loop_model() -> onnx.ModelProto:
    """A Loop whose body accumulates ``acc += x @ W`` with x, W read from the outer scope."""
    rng = np.random.default_rng(2)
    n = helper.make_node
    body = helper.make_graph(
        [
            n("Identity", ["cond_in"], ["cond_out"], name="b_id"),
            n("MatMul", ["x", "W"], ["xw"], name="b_mm"),
            n("Add", ["acc_in", "xw"], ["acc_out"], name="b_add"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", F, [1, 8]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", F, [1, 8]),
        ],
    )
    graph = helper.make_graph(
        [n("Loop", ["trip", "", "acc0"], ["y"], name="loop", body=body)],
        "g",
        [helper.make_tensor_value_info("x", F, [1, 8]), helper.make_tensor_value_info("acc0", F, [1, 8])],
        [helper.make_tensor_value_info("y", F, [1, 8])],
        [
            numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32) * 0.3, "W"),
            numpy_helper.from_array(np.array(3, np.int64), "trip"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_loop_body_reading_outer_input_and_weight():
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((1, 8)).astype(np.float32), "acc0": np.ones((1, 8), np.float32)}
    _check_close(loop_model(), [feeds])


def resize_model(opset: int) -> onnx.ModelProto:
    """Conv -> Cast(FLOAT) -> Resize with scales computed from the feature map's shape (Shape ->
    Cast(FLOAT) -> Div -> Mul, as TorchScript exports interpolate) and a Constant roi: Resize stays
    float32 (inputs and output), though the model's own Casts become fp16 casts."""
    rng = np.random.default_rng(4)
    n = helper.make_node
    const = lambda name, arr: n("Constant", [], [name], name=name, value=numpy_helper.from_array(arr))  # noqa: E731
    nodes = [
        n("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        n("Shape", ["c"], ["shp"], name="shape"),
        n("Cast", ["shp"], ["shpf"], name="cast", to=F),
        n("Div", ["shpf", "shpf"], ["ones"], name="div"),
        const("two", np.array([1, 1, 2, 2], np.float32)),
        n("Mul", ["ones", "two"], ["scales"], name="mul"),
        const("roi", np.zeros(8, np.float32)),
        n("Cast", ["c"], ["cf"], name="to_float", to=F),  # interpolate(x.to(torch.float32))
        n("Resize", ["cf", "roi", "scales"], ["r"], name="resize", mode="linear"),
        n("Relu", ["r"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", F, [1, 4, 16, 16])],
        [numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.3, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("opset", [11, 13, 18, 19, 21])
def test_resize_scales_and_roi_stay_float32(opset):
    feeds = {"x": np.random.default_rng(5).random((1, 4, 8, 8), np.float32)}
    low = _check_close(resize_model(opset), [feeds])
    resize = next(x for x in low.graph.node if x.op_type == "Resize")
    inferred = onnx.shape_inference.infer_shapes(low).graph.value_info
    types = {v.name: v.type.tensor_type.elem_type for v in inferred}
    assert [types[i] for i in resize.input] == [F, F, F]


def contrib_model() -> onnx.ModelProto:
    """x -> Relu -> com.microsoft DynamicQuantizeMatMul (A: float only) -> Relu, as ddddocr's
    quantized model has DynamicQuantizeLSTM: the onnx checker does not know these schemas."""
    rng = np.random.default_rng(6)
    n = helper.make_node
    inits = [
        numpy_helper.from_array(rng.integers(-100, 100, (8, 8)).astype(np.int8), "B"),
        numpy_helper.from_array(np.array([0.01], np.float32), "b_scale"),
        numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32) * 0.3, "W"),
    ]
    graph = helper.make_graph(
        [
            n("MatMul", ["x", "W"], ["h"], name="mm"),
            n("DynamicQuantizeMatMul", ["h", "B", "b_scale"], ["q"], name="dq", domain="com.microsoft"),
            n("Relu", ["q"], ["y"], name="relu"),
        ],
        "g",
        [helper.make_tensor_value_info("x", F, [1, 8])],
        [helper.make_tensor_value_info("y", F, [1, 8])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    return model


def test_contrib_op_without_fp16_kernel_stays_float32():
    dense = contrib_model()
    assert lowp_unsupported_ops(dense, "fp16") == ["DynamicQuantizeMatMul"]
    feeds = {"x": np.random.default_rng(7).standard_normal((1, 8)).astype(np.float32)}
    ref, got = _run(dense, feeds)[0], _run(convert_precision(dense, "fp16"), feeds)[0]
    # dynamic int8 quantization of A amplifies fp16 rounding of its input: one int8 step of A
    # times |B| * b_scale per term stays well under 0.1 here; a wrong type does not load at all.
    np.testing.assert_allclose(got, ref, rtol=0.05, atol=0.1)


def test_compile_refuses_a_converted_model_onnxruntime_rejects(tmp_path, monkeypatch):
    """The onnx checker does not know contrib schemas: if a conversion still feeds one fp16 (here
    the contrib table is switched off), compile fails and writes nothing instead of skipping verify."""
    import sparsec
    import sparsec.runtime.lowp_support as lowp_support
    from sparsec.errors import SparsecError

    path = tmp_path / "m.onnx"
    model = contrib_model()
    model.graph.initializer[2].CopyFrom(
        numpy_helper.from_array(np.random.default_rng(8).standard_normal((32, 32)).astype(np.float32), "W")
    )
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", F, [1, 32]))
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((32, 8), np.int8), "B"))
    onnx.save(model, path)
    sparsec.compile(path, nm="2:4", output=tmp_path / "ok", precision="fp16", min_params=0)
    assert (tmp_path / "ok" / "model.onnx").exists()
    monkeypatch.setattr(lowp_support, "_type_constraints", lambda *a: None)
    with pytest.raises(SparsecError, match="onnxruntime rejects"):
        sparsec.compile(path, nm="2:4", output=tmp_path / "bad", precision="fp16", min_params=0)
    assert not (tmp_path / "bad").exists()
