"""precision: weights become fp16, graph inputs and outputs stay fp32, outputs stay close."""

from __future__ import annotations

import numpy as np
import onnx
from helpers import run
from pass_helpers import context, mlp, mlp_numpy, run_pass, weights

from sparsec.runtime.precision_pass import PrecisionPass


def test_fp16_converts_weights_and_keeps_the_interface():
    model = mlp()
    ctx = context(model)
    result = run_pass(PrecisionPass("fp16"), ctx)
    assert result.modified and result.details == {"precision": "fp16"}
    onnx.checker.check_model(ctx.model, full_check=True)
    assert {t.name: t.data_type for t in ctx.model.graph.initializer} == {
        "w1": onnx.TensorProto.FLOAT16, "b1": onnx.TensorProto.FLOAT16, "w2": onnx.TensorProto.FLOAT16}
    io = [*ctx.model.graph.input, *ctx.model.graph.output]
    assert {v.name: v.type.tensor_type.elem_type for v in io} == {"x": 1, "y": 1}
    ops = [n.op_type for n in ctx.model.graph.node]
    assert ops.count("Cast") == 2 and ops[0] == ops[-1] == "Cast"  # in to fp16, out to fp32
    assert [o for o in ops if o != "Cast"] == ["MatMul", "Add", "Relu", "MatMul"]
    assert ctx.facts["model_before_precision"].graph.initializer[0].data_type == onnx.TensorProto.FLOAT
    x = np.random.default_rng(2).standard_normal((4, 16)).astype(np.float32)
    want = mlp_numpy(weights(model), x)
    np.testing.assert_allclose(run(ctx.model, {"x": x})[0], want, rtol=1e-2, atol=2e-2 * np.abs(want).max())


def test_zeros_stay_zeros():
    model = mlp()
    w = next(t for t in model.graph.initializer if t.name == "w1")
    values = onnx.numpy_helper.to_array(w).copy()
    values[::2] = 0.0
    w.CopyFrom(onnx.numpy_helper.from_array(values, "w1"))
    ctx = context(model)
    run_pass(PrecisionPass("fp16"), ctx)
    np.testing.assert_array_equal(weights(ctx.model)["w1"] == 0, values == 0)
