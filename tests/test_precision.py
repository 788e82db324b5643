"""fp16/bf16 conversion: valid graphs, float32 I/O, exact zeros and 2:4 groups kept, small drift."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparsec.errors import SparsecError
from sparsec.runtime.lowp_support import lowp_unsupported_ops
from sparsec.runtime.precision import convert_precision
from sparsec.runtime.precision_drift import can_run_on_cpu, precision_drift

# fp16 keeps 11 significant bits (relative step 2**-11 ~ 4.9e-4); a few layers of accumulation
# on O(1..10) activations stay well inside these bounds, while a wrong cast or dropped op does not.
RTOL, ATOL = 1e-2, 1e-2
# Weight operand and its Polygraphy 2:4 axis (Conv axis 1, MatMul B axis 0, Gemm transB axis 1).
AXES = {"Wc": 1, "Wm": 0, "Wg": 1}


def prune_24(arr: np.ndarray, axis: int) -> np.ndarray:
    """Zero the two smallest |w| of every 4 consecutive values along ``axis``."""
    moved = np.moveaxis(arr.copy(), axis, -1)
    groups = moved.reshape(-1, 4)
    np.put_along_axis(groups, np.argsort(np.abs(groups), axis=1)[:, :2], 0.0, axis=1)
    return np.moveaxis(groups.reshape(moved.shape), -1, axis)


def is_24(arr: np.ndarray, axis: int) -> bool:
    groups = np.moveaxis(arr, axis, -1).reshape(-1, 4)
    return bool(np.all(np.count_nonzero(groups, axis=1) <= 2))


def mixed_model(opset: int = 17) -> onnx.ModelProto:
    """Conv -> MatMul -> decomposed LayerNorm -> LayerNormalization -> Gemm -> Cast -> Max.

    Nodes are unnamed (the converter's cast names used to clash), ``ln`` is a graph output also
    used inside the graph, ``out`` comes from a blocked op (Max), ``bias`` feeds a blocked Min and
    an unblocked Add, and ``x`` feeds two nodes.
    """
    rng = np.random.default_rng(0)
    w = {
        "Wc": prune_24(rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3, 1),
        "Wm": prune_24(rng.standard_normal((32, 16)).astype(np.float32) * 0.3, 0),
        "Wg": prune_24(rng.standard_normal((32, 16)).astype(np.float32) * 0.3, 1),
        "bc": np.zeros(8, np.float32),
        "two": np.array(2.0, np.float32),
        "eps": np.array(1e-5, np.float32),
        "gam": np.ones(16, np.float32),
        "bet": np.zeros(16, np.float32),
        "bias": rng.standard_normal(32).astype(np.float32),
    }
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits.append(numpy_helper.from_array(np.array([2, -1], np.int64), "shp"))
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "Wc", "bc"], ["c"], pads=[1, 1, 1, 1]),
        n("Relu", ["c"], ["r"]),
        n("ReduceMean", ["x"], ["xm"], axes=[1, 2, 3], keepdims=0),  # second consumer of x
        n("GlobalAveragePool", ["r"], ["p"]),
        n("Reshape", ["p", "shp"], ["f"]),
        n("Concat", ["f", "f", "f", "f"], ["f4"], axis=1),
        n("MatMul", ["f4", "Wm"], ["m"]),
        n("ReduceMean", ["m"], ["mu"], axes=[-1]),
        n("Sub", ["m", "mu"], ["d"]),
        n("Pow", ["d", "two"], ["sq"]),
        n("ReduceMean", ["sq"], ["var"], axes=[-1]),
        n("Add", ["var", "eps"], ["ve"]),
        n("Sqrt", ["ve"], ["sd"]),
        n("Div", ["d", "sd"], ["nrm"]),
        n("LayerNormalization", ["nrm", "gam", "bet"], ["ln"], axis=-1),
        n("Gemm", ["ln", "Wg"], ["gm"], transB=1),
        n("Add", ["gm", "bias"], ["gb"]),
        n("Min", ["gb", "bias"], ["gmin"]),
        n("Cast", ["gmin"], ["gc"], to=TensorProto.FLOAT),
        n("Max", ["gc", "gc"], ["out"]),
    ]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "mixed",
        [helper.make_tensor_value_info("x", f32, [2, 4, 6, 6])],
        [
            helper.make_tensor_value_info("out", f32, [2, 32]),
            helper.make_tensor_value_info("ln", f32, [2, 16]),
            helper.make_tensor_value_info("xm", f32, [2]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_model(opset: int) -> onnx.ModelProto:
    w = prune_24(np.random.default_rng(1).standard_normal((8, 8, 1, 1)).astype(np.float32), 1)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "Wc"], ["y"], name="conv")],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4, 4])],
        [numpy_helper.from_array(w, "Wc")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def feeds(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((2, 4, 6, 6)).astype(np.float32)}


def inits(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


@pytest.fixture(scope="module")
def dense() -> onnx.ModelProto:
    return mixed_model()


@pytest.fixture(scope="module")
def fp16(dense) -> onnx.ModelProto:
    return convert_precision(dense, "fp16")


@pytest.fixture(scope="module")
def bf16(dense) -> onnx.ModelProto:
    return convert_precision(dense, "bf16")


def test_fp32_returns_model_unchanged_and_unknown_precision_fails(dense):
    assert convert_precision(dense, "fp32") is dense
    with pytest.raises(SparsecError, match="unknown precision"):
        convert_precision(dense, "int8")


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_converted_model_is_valid_clean_and_keeps_float32_io(dense, name, request):
    model = request.getfixturevalue(name)
    onnx.checker.check_model(model, full_check=True)
    used = {i for node in model.graph.node for i in node.input}
    assert sorted(t.name for t in model.graph.initializer if t.name not in used) == []
    assert len(inits(model)) == len(model.graph.initializer) <= len(dense.graph.initializer)
    names = [n.output[0] for n in model.graph.node]
    assert len(names) == len(set(names))
    io = list(model.graph.input) + list(model.graph.output)
    assert {v.type.tensor_type.elem_type for v in io} == {TensorProto.FLOAT}
    assert [o.name for o in model.graph.output] == [o.name for o in dense.graph.output]


def test_fp16_outputs_close_to_fp32(dense, fp16):
    for seed in range(3):
        drift = precision_drift(dense, fp16, feeds(seed))
        assert drift["runnable"] and drift["reason"] is None
        assert set(drift["outputs"]) == {"out", "ln", "xm"}
        ref = onnx_run(dense, feeds(seed))
        got = onnx_run(fp16, feeds(seed))
        for a, b in zip(ref, got, strict=True):
            np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)
        assert drift["max_abs"] == max(
            float(np.max(np.abs(a - b))) for a, b in zip(ref, got, strict=True)
        )


def onnx_run(model: onnx.ModelProto, x: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, x)


@pytest.mark.parametrize("name,dtype", [("fp16", np.float16), ("bf16", ml_dtypes.bfloat16)])
def test_zeros_and_24_pattern_survive(dense, name, dtype, request):
    model = request.getfixturevalue(name)
    before, after = inits(dense), inits(model)
    for wname, axis in AXES.items():
        if after[wname].data_type == TensorProto.FLOAT:  # bf16 Conv at opset 17 stays fp32
            continue
        orig = numpy_helper.to_array(before[wname])
        got = numpy_helper.to_array(after[wname])
        assert got.dtype == dtype
        assert np.array_equal(got == 0, orig == 0), wname
        assert is_24(got.astype(np.float32), axis), wname


def test_fp16_keeps_norm_variance_fp32_but_not_layernormalization(fp16):
    types = {k: t.data_type for k, t in inits(fp16).items()}
    assert types["two"] == types["eps"] == TensorProto.FLOAT  # Pow exponent, eps: fp32 branch
    assert types["Wm"] == types["gam"] == types["Wc"] == TensorProto.FLOAT16
    producer = {o: node for node in fp16.graph.node for o in node.output}
    pow_node = next(node for node in fp16.graph.node if node.op_type == "Pow")
    assert producer[pow_node.input[0]].op_type == "Cast"  # fp16 d -> fp32 before squaring
    ln = next(node for node in fp16.graph.node if node.op_type == "LayerNormalization")
    assert producer[ln.input[0]].op_type != "Cast"


def test_fp16_retypes_original_cast_and_shares_blocked_initializer(fp16):
    casts = [n for n in fp16.graph.node if n.op_type == "Cast" and n.input[0] == "gmin"]
    assert [helper.get_node_attr_value(c, "to") for c in casts] == [TensorProto.FLOAT16]
    assert inits(fp16)["bias"].data_type == TensorProto.FLOAT16  # one copy, cast for Min
    assert sum(t.name.startswith("bias") for t in fp16.graph.initializer) == 1


def test_bf16_types_and_values_match_ml_dtypes_rounding(dense, bf16):
    before = inits(dense)
    for name, t in inits(bf16).items():
        if t.data_type != TensorProto.BFLOAT16:
            continue
        want = numpy_helper.to_array(before[name]).astype(ml_dtypes.bfloat16)
        got = numpy_helper.to_array(t)
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16)), name
    all_types = {t.data_type for t in bf16.graph.initializer}
    all_types |= {v.type.tensor_type.elem_type for v in bf16.graph.value_info}
    all_types |= {
        helper.get_node_attr_value(n, "to") for n in bf16.graph.node if n.op_type == "Cast"
    }
    assert TensorProto.FLOAT16 not in all_types and TensorProto.BFLOAT16 in all_types
    assert inits(bf16)["Wm"].data_type == inits(bf16)["Wg"].data_type == TensorProto.BFLOAT16


def test_bf16_conv_needs_opset_22():
    assert lowp_unsupported_ops(conv_model(17), "bf16") == ["Conv"]
    assert lowp_unsupported_ops(conv_model(17), "fp16") == []
    low17 = convert_precision(conv_model(17), "bf16")
    assert inits(low17)["Wc"].data_type == TensorProto.FLOAT
    low22 = convert_precision(conv_model(22), "bf16")
    assert lowp_unsupported_ops(conv_model(22), "bf16") == []
    assert inits(low22)["Wc"].data_type == TensorProto.BFLOAT16


@pytest.mark.filterwarnings("ignore:the float32 number")
def test_bf16_tiny_values_only_add_zeros():
    model = conv_model(22)
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w.flat[1::4] = np.float32(1e-45)  # fp32 subnormal, below bf16's smallest subnormal
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "Wc"))
    got = numpy_helper.to_array(convert_precision(model, "bf16").graph.initializer[0])
    assert np.all(got[w == 0] == 0)
    assert np.count_nonzero(got) < np.count_nonzero(w)


def test_cpu_runnability_is_reported_not_raised(fp16, bf16, dense):
    assert can_run_on_cpu(fp16) == (True, "")
    ok, reason = can_run_on_cpu(bf16)
    assert ok or reason  # ORT 1.32 CPU lacks bf16 MatMul/Relu kernels: a one-line reason
    drift = precision_drift(dense, bf16, feeds(0))
    assert drift["runnable"] is ok and (drift["reason"] is None) is ok
    broken = helper.make_model(
        helper.make_graph(
            [helper.make_node("NoSuchOp", ["x"], ["y"], domain="nowhere")],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        ),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("nowhere", 1)],
    )
    ok, reason = can_run_on_cpu(broken)
    assert not ok and "\n" not in reason and reason


def test_already_converted_model_is_rejected(fp16):
    with pytest.raises(SparsecError, match="already has fp16/bf16"):
        convert_precision(fp16, "bf16")


def small(nodes, outputs, inputs=(("x", TensorProto.FLOAT),)) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(2).standard_normal((4, 4)).astype("f4"), "W")
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info(n, t, [2, 4]) for n, t in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in outputs],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


n = helper.make_node
CONVERTER_TRAPS = {
    # the model's own Cast feeds a graph output and a MatMul (lost output / int input before)
    "cast_output": small(
        [n("Cast", ["i"], ["ci"], to=TensorProto.FLOAT), n("MatMul", ["ci", "W"], ["y"])],
        ["y", "ci"],
        inputs=(("i", TensorProto.INT64),),
    ),
    # a blocked op's output is a graph output and is read by an unblocked op
    "blocked_output_read": small(
        [n("MatMul", ["x", "W"], ["m"]), n("Max", ["m", "x"], ["mx"]), n("Relu", ["mx"], ["y"])],
        ["y", "mx"],
    ),
    # RMSNorm written as x*x: the variance branch must stay fp32
    "rmsnorm": small(
        [
            n("Mul", ["x", "x"], ["sq"]),
            n("ReduceMean", ["sq"], ["ms"], axes=[-1]),
            n("Sqrt", ["ms"], ["r"]),
            n("Div", ["x", "r"], ["nr"]),
            n("MatMul", ["nr", "W"], ["y"]),
        ],
        ["y"],
    ),
}


@pytest.mark.parametrize("name", sorted(CONVERTER_TRAPS))
def test_converter_traps_give_valid_close_models(name):
    model = CONVERTER_TRAPS[name]
    low = convert_precision(model, "fp16")
    assert [o.name for o in low.graph.output] == [o.name for o in model.graph.output]
    assert {o.type.tensor_type.elem_type for o in low.graph.output} == {TensorProto.FLOAT}
    rng = np.random.default_rng(3)
    x = {
        i.name: rng.integers(0, 9, (2, 4)).astype(np.int64)
        if i.type.tensor_type.elem_type == TensorProto.INT64
        else rng.standard_normal((2, 4)).astype(np.float32)
        for i in model.graph.input
    }
    for a, b in zip(onnx_run(model, x), onnx_run(low, x), strict=True):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)
    if name == "rmsnorm":  # x*x reads the float32 graph input directly, no fp16 detour
        assert [list(m.input) for m in low.graph.node if m.op_type == "Mul"] == [["x", "x"]]
    convert_precision(model, "bf16")  # full_check inside; raises on an invalid graph


def test_external_weights_are_rejected_with_a_hint():
    model = conv_model(17)
    model.graph.initializer[0].data_location = TensorProto.EXTERNAL
    with pytest.raises(SparsecError, match="load_external_data=True"):
        convert_precision(model, "fp16")
