"""Heads and FFN neurons: attention found in both exporters and MiniLM-like graphs, oracles hold."""

import numpy as np
import onnx
import pytest
from helpers import run

import sparsec
from sparsec.transformer.attention import find_attention
from sparsec.transformer.transformer_plan import choose_heads, cost_model

SHAPES = {"input_ids": (2, 12), "attention_mask": (2, 12)}


def feeds(batch, length, seed=0, pad=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, length), np.int64)
    if pad:
        mask[1:, -pad:] = 0
    return {"input_ids": rng.integers(0, 100, (batch, length)).astype(np.int64), "attention_mask": mask}


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_attention_found_in_both_exporters(transformer_models, exporter):
    analysis = find_attention(transformer_models[exporter])
    assert [(b.heads, b.kv_heads, b.head_dim) for b in analysis.blocks] == [(4, 4, 16)] * 2
    assert not analysis.unexplained
    weights = {t.name: tuple(t.dims) for t in transformer_models[exporter].graph.initializer}
    for b in analysis.blocks:
        assert weights[b.q.weight] == (64, 64) and weights[b.o.weight] == (64, 64)
        assert b.q.bias is not None and b.o.bias is not None


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("kwargs", [{"heads": 0.5}, {"ffn": 0.5}, {"heads": 0.25, "ffn": 0.4},
                                    {"heads_per_layer": 1}])
def test_heads_and_ffn_equal_the_masked_dense_model(tmp_path, transformer_models, exporter, kwargs):
    src = tmp_path / "t.onnx"
    onnx.save(transformer_models[exporter], src)
    report = sparsec.compile(src, output=tmp_path / "o", min_params=0, shapes=SHAPES, **kwargs)
    pruned = onnx.load(tmp_path / "o" / "model.onnx")
    onnx.checker.check_model(pruned, full_check=True)
    assert report.verify["masked"]["max_abs_diff"] < 1e-5
    assert report.verify["max_abs_diff"] > 1e-3
    blocks = report.transformer["blocks"]
    if "heads" in kwargs or "heads_per_layer" in kwargs:
        assert all(b["heads_after"] >= 1 for b in blocks)
        assert sum(b["heads_before"] - b["heads_after"] for b in blocks) > 0
    if "heads_per_layer" in kwargs:
        assert [b["heads_after"] for b in blocks] == [1, 1]
    if "ffn" in kwargs:
        assert all(b["ffn_after"] < b["ffn_before"] == 128 for b in blocks)
    cm = report.transformer["cost_model"]
    # 2 layers of B·L·(4E² + 2·E·F) + 2·B·L²·E with B=2, L=12, E=64, F=128
    assert cm["after"] < cm["before"] == 2 * (2 * 12 * (4 * 64 * 64 + 2 * 64 * 128) + 2 * 2 * 144 * 64)
    for batch, length, pad in ((1, 5, 0), (3, 9, 3)):  # other batch sizes, lengths and padding
        f = feeds(batch, length, pad=pad)
        assert run(str(tmp_path / "o" / "model.onnx"), f)[0].shape == (batch, length, 64)


def test_ratio_zero_leaves_outputs_equal(tmp_path, transformer_models):
    src = tmp_path / "t.onnx"
    onnx.save(transformer_models["dynamo"], src)
    report = sparsec.compile(src, output=tmp_path / "o", heads=0.0, ffn=0.0, shapes=SHAPES, min_params=0)
    assert report.verify["max_abs_diff"] == 0.0
    assert all(b["heads_after"] == 4 and b["ffn_after"] == 128 for b in report.transformer["blocks"])


def test_calibrated_head_scores(tmp_path, transformer_models):
    src = tmp_path / "t.onnx"
    onnx.save(transformer_models["torchscript"], src)
    report = sparsec.compile(src, output=tmp_path / "o", heads=0.5, calib_random=8,
                             calib_range={"input_ids": (0, 100)}, shapes=SHAPES, min_params=0)
    assert report.transformer["head_scores"] == "calibration"
    assert report.verify["masked"]["max_abs_diff"] < 1e-5


def test_choose_heads_keeps_one_per_layer_and_ranks_globally():
    scores = {"a": np.array([1.0, 2.0, 3.0, 4.0]), "b": np.array([10.0, 1.0, 1.0, 1.0])}
    removed = choose_heads(scores, 0.75, None)
    assert all(len(v) < 4 for v in removed.values())
    assert sum(len(v) for v in removed.values()) == 6
    assert 0 not in removed["b"]  # b's strongest head is far above its layer mean


def test_unmatched_softmax_is_reported_and_left_alone(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], name="lonely")], "g", [x], [y])
    src = tmp_path / "s.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    info = sparsec.inspect(src)
    assert info.unexplained_softmax and info.unexplained_softmax[0]["node"] == "lonely"
    with pytest.raises(sparsec.SparsecError, match="no attention block"):
        sparsec.compile(src, output=tmp_path / "o", heads=0.5)
    assert not (tmp_path / "o").exists()


def test_cost_model_formula():
    class B:
        name, heads, head_dim = "b", 4, 16

    assert cost_model([B()], {}, 2, 10, 64) == 12 * 2 * 10 * 64 * 64 + 2 * 2 * 100 * 64
    assert cost_model([B()], {"b": 128}, 2, 10, 64, {"b": (0, 1)}) == (
        2 * 10 * (4 * 64 * 32 + 2 * 64 * 128) + 2 * 2 * 100 * 32)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_token_keep_one_equals_dense(tmp_path, transformer_models, exporter):
    src = tmp_path / "t.onnx"
    onnx.save(transformer_models[exporter], src)
    sparsec.compile(src, output=tmp_path / "o", tokens=1.0, tokens_from=1, shapes=SHAPES)
    for batch, length, pad in ((1, 4, 0), (3, 11, 4)):
        f = feeds(batch, length, pad=pad)
        np.testing.assert_allclose(run(str(tmp_path / "o" / "model.onnx"), f)[0], run(str(src), f)[0],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_token_pruning_keeps_shapes_and_scatters_last_states(tmp_path, transformer_models, exporter):
    from sparsec.transformer.attention import find_attention

    dense = transformer_models[exporter]
    src = tmp_path / "t.onnx"
    onnx.save(dense, src)
    report = sparsec.compile(src, output=tmp_path / "o", tokens=0.5, tokens_from=1, shapes=SHAPES)
    assert [b["tokens_after"] for b in report.transformer["blocks"]] == [12, 6]
    assert report.transformer["cost_model"]["after"] < report.transformer["cost_model"]["before"]
    blocks = sorted(find_attention(dense).blocks, key=lambda b: b.softmax)
    cut = dense.graph.node[blocks[1].q.matmul].input[0]  # hidden state entering layer 2
    probe = onnx.ModelProto()
    probe.CopyFrom(dense)
    probe.graph.output.append(onnx.ValueInfoProto(name=cut))
    for batch, length, pad in ((1, 6, 0), (2, 9, 3), (4, 16, 5)):
        f = feeds(batch, length, seed=batch, pad=pad)
        out = run(str(tmp_path / "o" / "model.onnx"), f)[0]
        assert out.shape == (batch, length, 64)
        hidden = run(probe, f)[1]
        kept = int(np.ceil(0.5 * length))
        for b in range(batch):
            same = np.isclose(out[b], hidden[b], atol=1e-5).all(axis=1)
            assert same.sum() == length - kept  # pruned tokens keep their state at the cut
            assert not same[0]  # the first token is always kept and computed further


def test_tokens_from_must_leave_a_later_layer(tmp_path, transformer_models):
    src = tmp_path / "t.onnx"
    onnx.save(transformer_models["dynamo"], src)
    with pytest.raises(sparsec.SparsecError, match="tokens_from=2"):
        sparsec.compile(src, output=tmp_path / "o", tokens=0.5, tokens_from=2)
    with pytest.raises(sparsec.SparsecError, match="tokens=0.0"):
        sparsec.compile(src, output=tmp_path / "o", tokens=0.0)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_ffn_at_batch_one(tmp_path, transformer_models, exporter):
    """Batch-1 shapes leave some ranks to inference: the FFN axis must still be the last."""
    src = tmp_path / "t.onnx"
    onnx.save(transformer_models[exporter], src)
    report = sparsec.compile(src, output=tmp_path / "o", ffn=0.5,
                             shapes={"input_ids": (1, 12), "attention_mask": (1, 12)})
    assert report.verify["masked"]["max_abs_diff"] < 1e-5
    assert all(b["ffn_after"] < 128 for b in report.transformer["blocks"])


@pytest.fixture(scope="module")
def gqa_models():
    from models.gqa import build_gqa

    return {e: build_gqa(exporter=e) for e in ("dynamo", "torchscript")}


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("kwargs", [{"heads": 0.5}, {"heads_per_layer": 2}, {"heads_per_layer": 1}])
def test_grouped_query_attention_without_biases(tmp_path, gqa_models, exporter, kwargs):
    model = gqa_models[exporter]
    analysis = find_attention(model)
    assert [(b.heads, b.kv_heads, b.head_dim) for b in analysis.blocks] == [(4, 2, 16)]
    assert analysis.blocks[0].q.bias is None
    src = tmp_path / "g.onnx"
    onnx.save(model, src)
    shapes = {"x": (2, 7, 64)}
    report = sparsec.compile(src, output=tmp_path / "o", shapes=shapes, **kwargs)
    assert report.verify["masked"]["max_abs_diff"] < 1e-5
    block = report.transformer["blocks"][0]
    assert block["heads_after"] == 2  # a whole group (2 query heads + their K/V head) goes;
    # heads_per_layer=1 rounds up to the one group that must stay
    weights = {t.name: tuple(t.dims) for t in onnx.load(tmp_path / "o" / "model.onnx").graph.initializer}
    assert weights[analysis.blocks[0].k.weight][1] == 16  # one K/V head left
    assert weights[analysis.blocks[0].q.weight][1] == 32
    x = np.random.default_rng(0).standard_normal((3, 9, 64)).astype(np.float32)
    assert run(str(tmp_path / "o" / "model.onnx"), {"x": x})[0].shape == (3, 9, 64)


def fused_attention_model(seed=0, e=64, heads=4):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((e, 3 * e)) * 0.2).astype(np.float32), "qkv_w"),
             numpy_helper.from_array((rng.standard_normal(3 * e) * 0.1).astype(np.float32), "qkv_b"),
             numpy_helper.from_array((rng.standard_normal((e, e)) * 0.2).astype(np.float32), "o_w"),
             numpy_helper.from_array((rng.standard_normal(e) * 0.1).astype(np.float32), "o_b")]
    nodes = [helper.make_node("Attention", ["x", "qkv_w", "qkv_b"], ["ctx"], name="fused_attention",
                              domain="com.microsoft", num_heads=heads),
             helper.make_node("MatMul", ["ctx", "o_w"], ["o"], name="o_proj"),
             helper.make_node("Add", ["o", "o_b"], ["y"], name="o_bias")]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", e]) for n in ("x", "y")]
    graph = helper.make_graph(nodes, "g", io[:1], io[1:], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


def test_fused_com_microsoft_attention(tmp_path):
    model = fused_attention_model()
    analysis = find_attention(model)
    assert [(b.name, b.heads, b.head_dim) for b in analysis.blocks] == [("fused_attention", 4, 16)]
    src = tmp_path / "f.onnx"
    onnx.save(model, src)
    report = sparsec.compile(src, output=tmp_path / "o", heads=0.5, shapes={"x": (2, 6, 64)})
    assert report.verify["masked"]["max_abs_diff"] < 1e-5
    pruned = onnx.load(tmp_path / "o" / "model.onnx")
    node = next(n for n in pruned.graph.node if n.op_type == "Attention")
    assert next(a.i for a in node.attribute if a.name == "num_heads") == 2
    dims = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    assert dims["qkv_w"] == (64, 96) and dims["qkv_b"] == (96,) and dims["o_w"] == (32, 64)
    x = np.random.default_rng(1).standard_normal((3, 5, 64)).astype(np.float32)
    assert run(str(tmp_path / "o" / "model.onnx"), {"x": x})[0].shape == (3, 5, 64)


def separate_attention_model(op: str, seed=0, e=64, heads=4):
    """Q/K/V projections feeding com.microsoft MultiHeadAttention or ONNX Attention (opset 23)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    for p in ("q", "k", "v"):
        inits += [numpy_helper.from_array((rng.standard_normal((e, e)) * 0.2).astype(np.float32), f"{p}_w"),
                  numpy_helper.from_array((rng.standard_normal(e) * 0.1).astype(np.float32), f"{p}_b")]
        nodes += [helper.make_node("MatMul", ["x", f"{p}_w"], [f"{p}_mm"], name=f"{p}_proj"),
                  helper.make_node("Add", [f"{p}_mm", f"{p}_b"], [p], name=f"{p}_bias")]
    inits.append(numpy_helper.from_array((rng.standard_normal((e, e)) * 0.2).astype(np.float32), "o_w"))
    if op == "MultiHeadAttention":
        nodes.append(helper.make_node(op, ["q", "k", "v"], ["ctx"], name="mha", domain="com.microsoft",
                                      num_heads=heads))
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    else:
        nodes.append(helper.make_node(op, ["q", "k", "v"], ["ctx"], name="mha", q_num_heads=heads,
                                      kv_num_heads=heads))
        opsets = [helper.make_opsetid("", 23)]
    nodes.append(helper.make_node("MatMul", ["ctx", "o_w"], ["y"], name="o_proj"))
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", e]) for n in ("x", "y")]
    return helper.make_model(helper.make_graph(nodes, "g", io[:1], io[1:], inits), opset_imports=opsets)


@pytest.mark.parametrize("op", ["MultiHeadAttention", "Attention"])
def test_attention_ops_with_separate_projections(tmp_path, op):
    model = separate_attention_model(op)
    analysis = find_attention(model)
    assert [(b.heads, b.head_dim) for b in analysis.blocks] == [(4, 16)]
    src = tmp_path / "a.onnx"
    onnx.save(model, src)
    report = sparsec.compile(src, output=tmp_path / "o", heads=0.5, shapes={"x": (2, 6, 64)})
    assert report.verify["masked"]["max_abs_diff"] < 1e-5
    node = next(n for n in onnx.load(tmp_path / "o" / "model.onnx").graph.node if n.name == "mha")
    assert {a.name: a.i for a in node.attribute} == (
        {"num_heads": 2} if op == "MultiHeadAttention" else {"q_num_heads": 2, "kv_num_heads": 2})
