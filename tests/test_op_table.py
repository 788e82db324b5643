"""Per-op knowledge lives in one table: a weight op registered there is a layer, a channel producer
and consumer, a BatchNorm fold target; an op in no table blocks its channels; edits are typed and
name their nodes, so they survive a node inserted before them."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import run
from onnx import helper, numpy_helper

from sparsec.channels import channel_rules
from sparsec.channels.channel_analysis import analyse_channels
from sparsec.channels.channel_state import ConsumerCut, Edit, ProducerCut
from sparsec.channels.compensation import compute_compensation
from sparsec.channels.fold_bn import FoldBatchNormPass, FoldPlan, plan_fold
from sparsec.channels.prune_channels import PruneChannelsPass
from sparsec.core.graph_index import GraphIndex
from sparsec.core.layers import find_layers
from sparsec.core.names import node_ids
from sparsec.core.op_table import WEIGHT_OPS, WeightAxes, WeightOp
from sparsec.core.pipeline import PassContext
from sparsec.core.shapes import fixed_input_shapes, infer_shapes
from sparsec.core.tensors import TensorStore

F = onnx.TensorProto.FLOAT


def _model(nodes, inits, inputs, outputs, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    opsets = [helper.make_opsetid("", 17), *(helper.make_opsetid(d, 1) for d in domains)]
    return helper.make_model(graph, opset_imports=opsets)


def test_register_refuses_duplicates():
    with pytest.raises(ValueError, match="weight op for Conv is already registered"):
        WEIGHT_OPS.register("Conv", WeightOp("Conv"))
    with pytest.raises(ValueError, match="channel rule for Relu is already registered"):
        channel_rules.register("Relu", channel_rules.unary)
    with pytest.raises(ValueError, match="MatMul is a weight op"):  # its channels come from the op table
        channel_rules.register("MatMul", channel_rules.unary)
    with pytest.raises(ValueError):  # a batch with one duplicate registers nothing
        WEIGHT_OPS.register(("FreshOp", "Gemm"), WeightOp("FreshOp"))
    assert "FreshOp" not in WEIGHT_OPS


def _dense(node, k: int) -> WeightAxes:
    """FakeDense(X, W, b) = X @ Wᵀ + b with W[N, K]: reduction axis 1, outputs on axis 0."""
    return WeightAxes(k, 1, 0, -1, -1, bias=2)


@pytest.fixture
def fake_dense():
    WEIGHT_OPS.register("FakeDense", WeightOp("FakeDense", (1,), ("X", "W", "B"), _dense))
    yield
    WEIGHT_OPS.unregister("FakeDense")


def _fake_net(rng):
    """x[2,8] → FakeDense d1 (W1[16,8]) → Relu → FakeDense d2 (W2[4,16]); and d1 → BN (for fold)."""
    inits = {"w1": rng.standard_normal((16, 8)), "b1": rng.standard_normal(16) + 1.0,
             "w2": rng.standard_normal((4, 16)), "b2": rng.standard_normal(4)}
    nodes = [helper.make_node("FakeDense", ["x", "w1", "b1"], ["h"], "d1", domain="test"),
             helper.make_node("Relu", ["h"], ["r"], "relu"),
             helper.make_node("FakeDense", ["r", "w2", "b2"], ["y"], "d2", domain="test")]
    return _model(nodes, inits, [helper.make_tensor_value_info("x", F, [2, 8])],
                  [helper.make_tensor_value_info("y", F, [2, 4])], ["test"])


def _numpy_forward(model, x):
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    h = np.maximum(x @ w[model.graph.node[0].input[1]].T + w[model.graph.node[0].input[2]], 0)
    return h @ w[model.graph.node[2].input[1]].T + w[model.graph.node[2].input[2]]


def test_a_registered_weight_op_is_a_layer_a_channel_source_and_is_sliced(fake_dense):
    rng = np.random.default_rng(0)
    model = _fake_net(rng)
    layers = {la.name: la for la in find_layers(model).layers}
    assert {n: (la.reduction_axis, la.output_axis, la.shape) for n, la in layers.items()} == {
        "d1": (1, 0, (16, 8)), "d2": (1, 0, (4, 16))}
    shapes = {"x": (2, 8), "h": (2, 16), "r": (2, 16), "y": (2, 4)}
    analysis = analyse_channels(model, shapes)
    assert [(s.name, s.channels) for s in analysis.sources] == [("d1", 16), ("d2", 4)]
    cuts = {(type(a).__name__, a.node, a.input, a.axis) for a in analysis.actions}
    assert cuts == {("ProducerCut", "d1", 1, 0), ("ConsumerCut", "d2", 1, 1), ("ProducerCut", "d2", 1, 0)}
    assert all(isinstance(a, Edit) for a in analysis.actions)
    # d1's channels are removable; d2's reach the graph output
    d1 = next(s for s in analysis.sources if s.name == "d1")
    removable = {int(analysis.root[e]) for e in range(d1.first, d1.first + 16)} - set(analysis.untouchable)
    assert len(removable) == 16
    removed = frozenset(range(d1.first, d1.first + 16, 3))  # 6 of 16 channels, filters zeroed below
    masked = onnx.ModelProto()
    masked.CopyFrom(model)
    w1 = next(t for t in masked.graph.initializer if t.name == "w1")
    zeroed = numpy_helper.to_array(w1).copy()
    zeroed[sorted(e - d1.first for e in removed)] = 0
    w1.CopyFrom(numpy_helper.from_array(zeroed, "w1"))
    # the removed channels carry relu(b1) into d2: the compensation the oracle would measure
    b1 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b1"))
    constants = {("d2", e - d1.first): float(max(b1[e - d1.first], 0.0)) for e in removed}
    ctx = PassContext(_copy(model), TensorStore(Path(".")))
    PruneChannelsPass(analysis, removed, constants).run(ctx)
    shapes_after = {t.name: tuple(t.dims) for t in ctx.model.graph.initializer}
    assert shapes_after == {"w1": (10, 8), "b1": (10,), "w2": (4, 10), "b2": (4,)}
    x = rng.standard_normal((2, 8))
    np.testing.assert_allclose(_numpy_forward(ctx.model, x), _numpy_forward(masked, x), rtol=1e-5, atol=1e-5)


def test_a_registered_weight_op_takes_a_batchnorm_fold(fake_dense):
    model = _fake_net(np.random.default_rng(1))
    bn_inits = [numpy_helper.from_array(np.full(16, v, np.float32), f"bn.{k}")
                for k, v in (("s", 2.0), ("b", 0.5), ("m", 0.1), ("v", 1.0))]
    model.graph.initializer.extend(bn_inits)
    bn = helper.make_node("BatchNormalization", ["h", "bn.s", "bn.b", "bn.m", "bn.v"], ["hb"], "bn")
    model.graph.node.insert(1, bn)
    model.graph.node[2].input[0] = "hb"
    index = GraphIndex(model.graph)
    assert plan_fold(index, model.graph.node[1], {}) == "FakeDense output rank is unknown (run shape " \
        "inference first)"  # out_axis -1 is BatchNorm's axis 1 only at rank 2
    plan = plan_fold(index, model.graph.node[1], {"h": 2})
    assert isinstance(plan, FoldPlan), plan
    assert plan.producer.name == "d1" and (plan.channels.axis, plan.channels.count) == (0, 16)
    x = np.random.default_rng(4).standard_normal((2, 8))
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    h = (x @ w["w1"].T + w["b1"] - w["bn.m"]) / np.sqrt(w["bn.v"] + 1e-5) * w["bn.s"] + w["bn.b"]
    want = np.maximum(h, 0) @ w["w2"].T + w["b2"]
    model.graph.value_info.append(helper.make_tensor_value_info("h", F, [2, 16]))
    ctx = PassContext(_copy(model), TensorStore(Path(".")))
    assert FoldBatchNormPass().run(ctx).details["folded"] == [("bn", "d1")]
    assert [n.op_type for n in ctx.model.graph.node] == ["FakeDense", "Relu", "FakeDense"]
    np.testing.assert_allclose(_numpy_forward(ctx.model, x), want, rtol=1e-5, atol=1e-5)
    WEIGHT_OPS.unregister("FakeDense")  # out of the table: not foldable, said with the reason
    try:
        why = plan_fold(index, model.graph.node[1], {})
        assert isinstance(why, str) and "comes from FakeDense" in why
        assert not find_layers(model).layers
    finally:
        WEIGHT_OPS.register("FakeDense", WeightOp("FakeDense", (1,), ("X", "W", "B"), _dense))


def test_an_op_in_no_table_blocks_its_group():
    """conv1 → Mystery (unknown) → conv2: conv1's channels cannot be followed, so none may go."""
    rng = np.random.default_rng(2)
    inits = {"w1": rng.standard_normal((8, 3, 1, 1)), "w2": rng.standard_normal((4, 8, 1, 1))}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], "conv1"),
             helper.make_node("Mystery", ["a"], ["b"], "mystery", domain="test"),
             helper.make_node("Conv", ["b", "w2"], ["y"], "conv2")]
    model = _model(nodes, inits, [helper.make_tensor_value_info("x", F, [1, 3, 4, 4])],
                   [helper.make_tensor_value_info("y", F, [1, 4, 4, 4])], ["test"])
    shapes = {"x": (1, 3, 4, 4), "a": (1, 8, 4, 4), "b": (1, 8, 4, 4), "y": (1, 4, 4, 4)}
    analysis = analyse_channels(model, shapes)
    conv1 = next(s for s in analysis.sources if s.name == "conv1")
    reasons = {analysis.untouchable.get(int(analysis.root[e])) for e in range(conv1.first, conv1.first + 8)}
    assert reasons == {"mystery (Mystery) is not in the channel table"}
    assert not any(isinstance(a, ConsumerCut) for a in analysis.actions)  # conv2 reads nothing removable


def test_node_ids_are_unique_and_keep_names():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"], "Relu_0"),
             helper.make_node("Relu", ["b"], ["c"], "dup"), helper.make_node("Relu", ["c"], ["d"], "dup"),
             helper.make_node("Relu", ["d"], ["y"])]
    model = _model(nodes, {}, [helper.make_tensor_value_info("x", F, [1])],
                   [helper.make_tensor_value_info("y", F, [1])])
    assert node_ids(model.graph) == ["Relu_0_1", "Relu_0", "dup", "dup_1", "Relu_4"]


def _copy(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def test_edits_find_their_nodes_by_name_after_a_node_is_inserted():
    """The plan is made on the dense graph; the graph the pass edits has an Identity in front. An edit
    that named its node by position would slice the wrong node's weights."""
    rng = np.random.default_rng(3)
    inits = {"w1": rng.standard_normal((8, 16)), "b1": rng.standard_normal(16),
             "w2": rng.standard_normal((16, 4)), "b2": rng.standard_normal(4)}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], "g1"),
             helper.make_node("Relu", ["h"], ["r"], "relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], "g2")]
    model = _model(nodes, inits, [helper.make_tensor_value_info("x", F, [2, 8])],
                   [helper.make_tensor_value_info("y", F, [2, 4])])
    fixed = fixed_input_shapes(model, {})
    analysis = analyse_channels(model, infer_shapes(model, fixed))
    assert {a.node for a in analysis.actions if isinstance(a, ProducerCut)} == {"g1", "g2"}
    g1 = next(s for s in analysis.sources if s.name == "g1")
    removed = frozenset(range(g1.first, g1.first + 16, 2))
    comp = compute_compensation(model, TensorStore(Path(".")), analysis, removed, fixed)
    edited = _copy(model)
    edited.graph.node.insert(0, helper.make_node("Identity", ["x"], ["x_id"], "front"))
    edited.graph.node[1].input[0] = "x_id"
    ctx = PassContext(edited, TensorStore(Path(".")))
    PruneChannelsPass(analysis, removed, comp.constants).run(ctx)
    onnx.checker.check_model(ctx.model, full_check=True)
    x = {"x": rng.standard_normal((2, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(ctx.model, x)[0], run(comp.masked, x)[0], rtol=1e-5, atol=1e-5)
    shapes = {t.name: tuple(t.dims) for t in ctx.model.graph.initializer}
    assert shapes["w1"] == (8, 8) and shapes["w2"] == (8, 4)
