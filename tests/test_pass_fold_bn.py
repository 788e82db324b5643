"""fold-bn: Conv→BatchNormalization becomes one Conv with the same outputs; nothing else changes."""

from __future__ import annotations

import numpy as np
from helpers import graph_lines, run
from onnx import helper
from pass_helpers import context, make_model, run_pass, weights

from sparsec.channels.fold_bn import FoldBatchNormPass


def _bn_inits(rng, c: int, name: str) -> dict:
    return {f"{name}.scale": rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c),
            f"{name}.bias": rng.standard_normal(c), f"{name}.mean": rng.standard_normal(c) * 0.5,
            f"{name}.var": rng.uniform(0.2, 2.0, c)}


def _bn(x: str, y: str, name: str):
    params = [f"{name}.{k}" for k in ("scale", "bias", "mean", "var")]
    return helper.make_node("BatchNormalization", [x, *params], [y], name, epsilon=1e-3)


def conv_bn_relu_bn():
    """Conv→BN→Relu→BN: the first BN folds into the Conv, the second has no producer to fold into."""
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((6, 4, 3, 3)) * 0.3, **_bn_inits(rng, 6, "bn1"),
             **_bn_inits(rng, 6, "bn2")}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], "conv", pads=[1] * 4), _bn("c", "b", "bn1"),
             helper.make_node("Relu", ["b"], ["r"], "relu"), _bn("r", "y", "bn2")]
    return make_model(nodes, {"x": (2, 4, 6, 6)}, ["y"], inits)


def test_conv_bn_folds_and_outputs_match():
    model = conv_bn_relu_bn()
    ctx = context(model)
    result = run_pass(FoldBatchNormPass(), ctx)
    assert result.modified and result.details["folded"] == [("bn1", "conv")]
    assert [bn for bn, _ in result.details["kept"]] == ["bn2"]
    assert [line.split(" (")[0] for line in graph_lines(ctx.model)] == [
        "Conv conv", "Relu relu", "BatchNormalization bn2"]
    conv = ctx.model.graph.node[0]
    assert len(conv.input) == 3 and weights(ctx.model)[conv.input[1]].shape == (6, 4, 3, 3)
    assert not any(k.startswith("bn1.") for k in weights(ctx.model))  # no dead initializer left
    x = {"x": np.random.default_rng(1).standard_normal((2, 4, 6, 6)).astype(np.float32)}
    want = run(model, x)[0]
    np.testing.assert_allclose(run(ctx.model, x)[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_nothing_to_fold_is_not_modified():
    model = conv_bn_relu_bn()
    ctx = context(model)
    run_pass(FoldBatchNormPass(), ctx)
    before = ctx.model.SerializeToString()
    again = run_pass(FoldBatchNormPass(), ctx)
    assert not again.modified and again.details["folded"] == []
    assert ctx.model.SerializeToString() == before
