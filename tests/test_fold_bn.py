"""BatchNorm folding: folded models match the unfused ones in onnxruntime, nothing else changes.

Each case is a tiny model with non-trivial BN statistics (negative γ, μ ≠ 0, σ² ≠ 1), so a fold on
the wrong axis, a lost bias or a forgotten Gemm beta shows up in the outputs, not only in shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import random_feeds, run
from onnx import TensorProto, helper, numpy_helper

from models import GOLDEN
from sparsec.channels.fold_bn import FoldBatchNormPass
from sparsec.core.pipeline import PassContext, PassResult
from sparsec.core.tensors import TensorStore

Case = tuple[onnx.ModelProto, dict[str, tuple[int, ...]], int, str | None]
SLOW = ("transformer", "minilm", "bert")  # torch exports: minutes, and no BatchNormalization


def _init(name: str, values: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, np.float32), name)


def _bn(x: str, y: str, name: str, c: int, inits: list, rng: np.random.Generator) -> onnx.NodeProto:
    """A BN whose statistics make every term of the fold matter; its parameters go to `inits`."""
    values = {"scale": rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c), "bias": rng.standard_normal(c),
              "mean": rng.standard_normal(c) * 0.5, "var": rng.uniform(0.2, 2.0, c)}
    inits += [_init(f"{name}.{k}", v) for k, v in values.items()]
    return helper.make_node("BatchNormalization", [x, *(f"{name}.{k}" for k in values)], [y], name,
                            epsilon=1e-3)


def _model(nodes: list, inputs: dict[str, tuple], outputs: list[str], inits: list) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def conv(op: str = "Conv", cin: int = 4, cout: int = 6, group: int = 1, bias: bool = False) -> Case:
    rng = np.random.default_rng(1)
    shape = (cout, cin // group, 3, 3) if op == "Conv" else (cin, cout // group, 3, 3)
    inits = [_init("w", rng.standard_normal(shape) * 0.3)] + ([_init("b", rng.standard_normal(cout))] * bias)
    nodes = [helper.make_node(op, ["x", "w", *(["b"] * bias)], ["c"], "conv", group=group, pads=[1] * 4),
             _bn("c", "y", "bn", cout, inits, rng)]
    return _model(nodes, {"x": (2, cin, 6, 6)}, ["y"], inits), {"x": (2, cin, 6, 6)}, 1, None


def gemm(trans_b: int = 0, c_shape: tuple[int, ...] | None = None, beta: float = 1.0) -> Case:
    rng = np.random.default_rng(2)
    inits = [_init("w", rng.standard_normal((7, 5) if trans_b else (5, 7)) * 0.4)]
    if c_shape is not None:
        inits.append(_init("c0", rng.standard_normal(c_shape)))
    ins = ["x", "w", *(["c0"] * (c_shape is not None))]
    nodes = [helper.make_node("Gemm", ins, ["g"], "gemm", transB=trans_b, beta=beta, alpha=1.5),
             _bn("g", "y", "bn", 7, inits, rng)]
    return _model(nodes, {"x": (3, 5)}, ["y"], inits), {"x": (3, 5)}, 1, None


def matmul(rank: int = 2, via_transpose: bool = False) -> Case:
    rng = np.random.default_rng(3)
    shape = (3, 5) if rank == 2 else (2, 3, 5)
    inits = [_init("w", rng.standard_normal((7, 5) if via_transpose else (5, 7)) * 0.4)]
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], "wt", perm=[1, 0])] if via_transpose else []
    nodes += [helper.make_node("MatMul", ["x", "wt" if via_transpose else "w"], ["m"], "mm"),
              _bn("m", "y", "bn", shape[1] if rank == 3 else 7, inits, rng)]
    kept = "rank 3" if rank == 3 else None
    return _model(nodes, {"x": shape}, ["y"], inits), {"x": shape}, int(rank == 2), kept


def _extend(nodes: list, inits: list, outputs: list[str]) -> onnx.ModelProto:
    """The plain Conv+BN case with more nodes, rebuilt so shapes are inferred again."""
    base = conv()[0].graph
    return _model([*base.node, *nodes], {"x": (2, 4, 6, 6)}, outputs, [*base.initializer, *inits])


def after_relu() -> Case:
    rng, inits = np.random.default_rng(4), []
    base = conv()[0].graph
    nodes = [base.node[0], helper.make_node("Relu", ["c"], ["r"], "relu"), _bn("r", "y", "bn", 6, inits, rng)]
    return _model(nodes, {"x": (2, 4, 6, 6)}, ["y"], [base.initializer[0], *inits]), {"x": (2, 4, 6, 6)}, 0, \
        "comes from Relu"


def two_consumers() -> Case:
    model = _extend([helper.make_node("Relu", ["c"], ["r"], "relu")], [], ["y", "r"])
    return model, {"x": (2, 4, 6, 6)}, 0, "another consumer"


def shared_weight() -> Case:
    rng, inits = np.random.default_rng(4), []
    more = [helper.make_node("Conv", ["x", "w"], ["c2"], "conv2", pads=[1] * 4),
            _bn("c2", "y2", "bn2", 6, inits, rng)]
    return _extend(more, inits, ["y", "y2"]), {"x": (2, 4, 6, 6)}, 0, "shared"


def bn_chain() -> Case:
    rng, inits = np.random.default_rng(5), []
    return _extend([_bn("y", "z", "bn2", 6, inits, rng)], inits, ["z"]), {"x": (2, 4, 6, 6)}, 2, None


def paddle(bias: bool = False) -> Case:
    """Paddle's exporter stores every weight, BN statistics included, as a Constant node."""
    rng, params = np.random.default_rng(6), []
    consts = [("w", rng.standard_normal((6, 4, 3, 3)) * 0.3)] + [("b", rng.standard_normal(6))] * bias
    nodes = [helper.make_node("Constant", [], [n], f"{n}_const", value=_init(f"{n}_value", v))
             for n, v in consts]
    nodes.append(helper.make_node("Conv", ["x", *(n for n, _ in consts)], ["c"], "conv", pads=[1] * 4))
    bn = _bn("c", "y", "bn", 6, params, rng)
    nodes += [helper.make_node("Constant", [], [p.name], f"{p.name}_const", value=p) for p in params]
    nodes.append(bn)
    return _model(nodes, {"x": (1, 4, 5, 5)}, ["y"], []), {"x": (1, 4, 5, 5)}, 1, None


CASES: dict[str, Callable[[], Case]] = {
    "conv": conv, "conv-bias": lambda: conv(bias=True), "grouped": lambda: conv(group=2),
    "depthwise": lambda: conv(cin=6, group=6), "convT": lambda: conv("ConvTranspose", bias=True),
    "convT-groups2": lambda: conv("ConvTranspose", group=2), "gemm": gemm, "gemm-transB": lambda: gemm(1),
    "gemm-C": lambda: gemm(0, (7,)), "gemm-transB-C-beta": lambda: gemm(1, (1, 7), beta=0.5),
    "gemm-scalar-C-beta": lambda: gemm(0, (1,), beta=-2.0), "gemm-row-C": lambda: gemm(1, (3, 1), 0.7),
    "matmul": matmul, "matmul-transpose": lambda: matmul(via_transpose=True),
    "matmul-rank3": lambda: matmul(3),
    "after-relu": after_relu, "two-consumers": two_consumers, "shared-weight": shared_weight,
    "chain": bn_chain, "paddle": paddle, "paddle-bias": lambda: paddle(bias=True),
}


def _fold(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassResult]:
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    return folded, FoldBatchNormPass().run(PassContext(folded, TensorStore(Path("."))))


def _check_folded(model: onnx.ModelProto, folded: onnx.ModelProto, result: PassResult, feeds: dict) -> None:
    """Full checker, same outputs, no dead initializers, and every untouched node byte-identical."""
    onnx.checker.check_model(folded, full_check=True)
    for want, got in zip(run(model, feeds), run(folded, feeds), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    used = {i for n in folded.graph.node for i in n.input} | {o.name for o in folded.graph.output}
    assert [t.name for t in folded.graph.initializer if t.name not in used] == []
    assert {o.name for o in folded.graph.output} == {o.name for o in model.graph.output}
    touched = {name for pair in result.details["folded"] for name in pair}
    producers = [n for n in model.graph.node if n.name in touched]
    touched |= {n.name for n in model.graph.node if n.op_type == "Constant"  # a Constant-node weight
                and any(n.output[0] in p.input for p in producers)}
    after = {n.name: n.SerializeToString() for n in folded.graph.node}
    for node in model.graph.node:
        if node.name in touched:
            continue
        if node.op_type == "Constant" and node.name not in after:  # a BN statistic that is dead now
            assert all(o.startswith("bn") for o in node.output)
            continue
        assert after[node.name] == node.SerializeToString(), node.name


@pytest.mark.parametrize("name", CASES)
def test_fold(name: str) -> None:
    model, shapes, n_folded, kept = CASES[name]()
    folded, result = _fold(model)
    assert result.name == "fold-bn" and result.modified == (n_folded > 0)
    assert len(result.details["folded"]) == n_folded
    ops = [n.op_type for n in folded.graph.node]
    if kept is None:
        assert result.details["kept"] == [] and "BatchNormalization" not in ops
    else:
        assert [why for _, why in result.details["kept"] if kept in why], result.details
        assert ops.count("BatchNormalization") == len(result.details["kept"]) > 0
    _check_folded(model, folded, result, random_feeds(model, shapes, seed=7))
    if n_folded == 0:
        assert folded.SerializeToString() == model.SerializeToString()


def test_fold_rewrites_in_place_and_keeps_names() -> None:
    model, shapes, _, _ = conv(bias=True)
    folded, result = _fold(model)
    assert result.details["folded"] == [("bn", "conv")]
    (node,) = folded.graph.node
    assert list(node.input) == ["x", "w", "b"] and list(node.output) == ["y"]  # bias written in place
    assert "c" not in {v.name for v in folded.graph.value_info}
    model, shapes, _, _ = conv()
    folded, _ = _fold(model)
    assert list(folded.graph.node[0].input) == ["x", "w", "conv.bias_folded"]


def test_paddle_constant_weight_written_into_constant_node() -> None:
    model, shapes, _, _ = paddle()
    folded, _ = _fold(model)
    assert [n.name for n in folded.graph.node] == ["w_const", "conv"]
    before = numpy_helper.to_array(model.graph.node[0].attribute[0].t)
    after = numpy_helper.to_array(folded.graph.node[0].attribute[0].t)
    assert after.dtype == before.dtype and after.shape == before.shape and not np.allclose(after, before)


def test_matmul_gets_an_add_with_the_bn_output_name() -> None:
    model, _, _, _ = matmul()
    folded, _ = _fold(model)
    assert [(n.op_type, list(n.input), list(n.output)) for n in folded.graph.node] == [
        ("MatMul", ["x", "w"], ["m"]), ("Add", ["m", "mm.bias_folded"], ["y"])]


def test_gemm_beta_folded_into_c() -> None:
    model, _, _, _ = gemm(1, (1, 7), beta=0.5)
    folded, _ = _fold(model)
    assert "beta" not in {a.name for a in folded.graph.node[0].attribute}


def test_training_mode_bn_is_kept_and_model_untouched() -> None:
    model, _, _, _ = conv()
    model.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1))
    folded, result = _fold(model)
    assert not result.modified and result.details["folded"] == []
    ((bn, why),) = result.details["kept"]
    assert bn == "bn" and why.startswith("training mode")
    assert folded.SerializeToString() == model.SerializeToString()


def _golden(name: str) -> onnx.ModelProto:
    built = GOLDEN[name]()
    return getattr(built, "model", built)  # some builders return the model with its data


@pytest.mark.parametrize("name", [n for n in GOLDEN if not any(s in n.lower() for s in SLOW)])
def test_golden(name: str) -> None:
    model = _golden(name)
    shapes = {i.name: tuple(d.dim_value or 2 for d in i.type.tensor_type.shape.dim)
              for i in model.graph.input}
    folded, result = _fold(model)
    had_bn = any(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert result.modified == bool(result.details["folded"]) and (had_bn or not result.modified)
    # a colleague's model may hold a BN that must stay; each one left is reported with its reason
    left = [n.name for n in folded.graph.node if n.op_type == "BatchNormalization"]
    assert left == [bn for bn, _ in result.details["kept"]]
    if name in ("cnn", "example"):  # every BN there follows a lone Conv
        assert left == [] and result.modified
    _check_folded(model, folded, result, random_feeds(model, shapes, seed=3))
    if not had_bn:
        assert folded.SerializeToString() == model.SerializeToString()
