"""--permute: N:M channel permutation keeps the function exactly and never lowers the 2:4 kept score;
groups it cannot follow stay in order and are named with the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from pass_helpers import context, make_model, run_pass, targets

import sparsec
from models import GOLDEN
from sparsec.channels.permute_channels import PermuteChannelsPass
from sparsec.channels.permute_search import kept_score, search_order
from sparsec.core.graph_index import GraphIndex, to_effective
from sparsec.core.options import NMPattern
from sparsec.core.tensors import TensorStore
from sparsec.errors import SparsecError
from sparsec.runtime.session import make_session_from_proto, random_feeds
from sparsec.weights.prune_weights import PruneWeightsPass
from sparsec.weights.scores import as_rows

NM = NMPattern(2, 4)
EXACT = 1e-6  # relative to max(|y|, 1): a permutation only reorders float32 sums


def _outputs(model: onnx.ModelProto, feeds=None):
    session = make_session_from_proto(model)
    feeds = feeds if feeds is not None else random_feeds(session, {}, 0)
    return session.run(None, feeds), feeds


def _max_rel(model_a, model_b) -> float:
    a, feeds = _outputs(model_a)
    b, _ = _outputs(model_b, feeds)
    return max(float(np.max(np.abs(x - y))) / max(1.0, float(np.max(np.abs(x))))
               for x, y in zip(a, b, strict=True))


def _total_kept(model: onnx.ModelProto, tg) -> float:
    """The 2:4 kept |W| over every target, read from the graph (independent of the pass's report)."""
    index = GraphIndex(model.graph)
    total = 0.0
    for t in tg:
        la = t.layer
        if la.reduction_dim % 4:
            continue
        w = to_effective(TensorStore(Path(".")).read(index.constant(la.source)), la.source.steps)
        total += kept_score(as_rows(la, np.abs(w)), 2, 4)
    return total


def _permute(model, seconds: float = 0.3, **options):
    tg = targets(model, nm=NM, **options)
    ctx = context(model)
    result = run_pass(PermuteChannelsPass(tg, NM, seconds=seconds), ctx)
    return ctx.model, result, tg


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_permuted_dense_graph_equals_dense_on_every_golden_model(name):
    model = GOLDEN[name]()
    permuted, result, tg = _permute(model)
    assert _max_rel(model, permuted) <= EXACT
    before, after = _total_kept(model, tg), _total_kept(permuted, tg)
    assert after >= before * (1 - 1e-7)
    d = result.details
    assert result.modified == bool(d["permuted"])
    for row in d["permuted"]:
        assert row["kept_score_after"] > row["kept_score_before"] and row["seconds"] < 5.0
    if name in ("cnn", "example", "resnet", "mobilenetv3", "unet", "mlp"):
        assert result.modified and after > before * 1.003  # a real gain, not rounding


def _conv_chain(seed: int = 0, c: int = 16) -> onnx.ModelProto:
    """x → Conv(3→c) → BN → Relu → Conv(c→8, 3×3) → y; the second conv's big weights all sit in
    channels 0..c/4-1, so the identity order crowds them into the same 4-groups."""
    rng = np.random.default_rng(seed)
    w2 = rng.standard_normal((8, c, 3, 3)) * 0.05
    w2[:, : c // 4] *= 40.0
    inits = {"w1": rng.standard_normal((c, 3, 3, 3)), "b1": rng.standard_normal(c),
             "s": rng.uniform(0.5, 1.5, c), "bb": rng.standard_normal(c), "mu": rng.standard_normal(c),
             "var": rng.uniform(0.5, 2.0, c), "w2": w2, "b2": rng.standard_normal(8)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], "conv1", pads=[1] * 4),
             helper.make_node("BatchNormalization", ["h", "s", "bb", "mu", "var"], ["n"], "bn"),
             helper.make_node("Relu", ["n"], ["r"], "relu"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], "conv2", pads=[1] * 4)]
    return make_model(nodes, {"x": (2, 3, 8, 8)}, ["y"], inits)


def test_conv_bn_chain_spreads_big_channels_and_pruning_loses_less():
    model = _conv_chain()
    permuted, result, tg = _permute(model, nm_everywhere=True)
    (row,) = result.details["permuted"]
    assert row["producers"] == ["conv1"] and row["consumers"] == ["conv2"] and row["gain"] > 0.3
    assert _max_rel(model, permuted) <= EXACT
    ctx_a, ctx_b = context(model), context(permuted)
    run_pass(PruneWeightsPass(tg, nm=NM), ctx_a)
    run_pass(PruneWeightsPass(targets(permuted, nm=NM, nm_everywhere=True), nm=NM), ctx_b)
    dense, feeds = _outputs(model)
    err_a = np.linalg.norm(_outputs(ctx_a.model, feeds)[0][0] - dense[0])
    err_b = np.linalg.norm(_outputs(ctx_b.model, feeds)[0][0] - dense[0])
    assert err_b < 0.7 * err_a


def _ffn(seed: int = 0, d: int = 8, f: int = 32) -> onnx.ModelProto:
    """x → MatMul(up) → Add(b) → Gelu → MatMul(down) → Add(x): the residual stream is not permutable
    (x is a graph input), the hidden f channels between up and down are."""
    rng = np.random.default_rng(seed)
    down = rng.standard_normal((f, d)) * rng.uniform(0.05, 3.0, (f, 1))
    inits = {"up": rng.standard_normal((d, f)), "b": rng.standard_normal(f), "down": down}
    nodes = [helper.make_node("MatMul", ["x", "up"], ["h"], "up_proj"),
             helper.make_node("Add", ["h", "b"], ["hb"], "up_bias"),
             helper.make_node("Erf", ["hb"], ["g"], "act"),  # stands for GELU: elementwise
             helper.make_node("MatMul", ["g", "down"], ["o"], "down_proj"),
             helper.make_node("Add", ["o", "x"], ["y"], "residual")]
    return make_model(nodes, {"x": (4, 6, d)}, ["y"], inits)


def test_ffn_down_projection_is_permuted_and_the_input_projection_is_named():
    model = _ffn()
    permuted, result, _ = _permute(model)
    d = result.details
    assert [r["consumers"] for r in d["permuted"]] == [["down_proj"]]
    assert {"layer": "up_proj", "reason": d["not_permuted"][0]["reason"]} in d["not_permuted"]
    assert d["not_permuted"][0]["reason"] == "its input channels come from graph input x"
    assert _max_rel(model, permuted) <= EXACT
    index = GraphIndex(permuted.graph)
    b = onnx.numpy_helper.to_array(index.initializers["b"])
    assert not np.array_equal(b, onnx.numpy_helper.to_array(GraphIndex(model.graph).initializers["b"]))


def test_flatten_into_gemm_follows_and_a_graph_output_blocks():
    """A producer whose output is also a graph output stays in order, with that reason."""
    rng = np.random.default_rng(1)
    inits = {"w1": rng.standard_normal((8, 3, 3, 3)), "w2": rng.standard_normal((8, 8, 1, 1)),
             "w3": rng.standard_normal((8, 8, 1, 1))}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], "c1"),
             helper.make_node("Relu", ["a"], ["ar"], "r1"),
             helper.make_node("Conv", ["ar", "w2"], ["b"], "c2"),
             helper.make_node("Conv", ["b", "w3"], ["y"], "c3")]
    model = make_model(nodes, {"x": (1, 3, 6, 6)}, ["y", "ar"], inits)
    permuted, result, _ = _permute(model)
    left = {tuple(r.get("producers", [r.get("layer")])): r["reason"] for r in result.details["not_permuted"]}
    assert "reaches graph output ar" in left[("c1",)]
    assert _max_rel(model, permuted) <= EXACT


def test_search_is_deterministic_and_a_permutation():
    rng = np.random.default_rng(0)
    rows = np.abs(rng.standard_normal((64, 32))) * rng.uniform(0.1, 3.0, 32)
    a, before, after = search_order(rows, 2, 4, seed=5)
    b, _, again = search_order(rows, 2, 4, seed=5)
    assert np.array_equal(a, b) and after == again
    assert sorted(a.tolist()) == list(range(32))
    assert after > before and abs(kept_score(rows[:, a], 2, 4) - after) <= 1e-6 * after


def test_compile_with_permute_reports_each_group_and_checks_exactness(tmp_path):
    model = _conv_chain()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    report = sparsec.compile(path, output=tmp_path / "out", nm="2:4", nm_everywhere=True, min_params=0,
                             permute=True, method="wanda", calib_random=8, force=True)
    step = next(s for s in report.steps if s["name"] == "weights")
    permute = step["permute"]
    assert permute["oracle"]["max_rel_diff"] <= 1e-5
    (row,) = permute["permuted"]
    assert row["gain"] > 0 and row["kept_score_after"] > row["kept_score_before"] and row["seconds"] >= 0
    assert report.verify["max_abs_diff"] is not None


def test_permute_needs_nm(tmp_path):
    with pytest.raises(SparsecError, match="permute.*works with.*nm only"):
        sparsec.compile(_conv_chain(), output=tmp_path / "o", sparsity=0.5, nm=None, permute=True)


def test_concat_of_two_producers_permutes_each_block_at_its_offset():
    """Concat([c1, c2]) → Conv: each producer's block moves inside its own offset; exact."""
    rng = np.random.default_rng(2)
    w3 = rng.standard_normal((8, 16, 1, 1)) * rng.uniform(0.05, 3.0, (1, 16, 1, 1))
    inits = {"w1": rng.standard_normal((8, 3, 3, 3)), "w2": rng.standard_normal((8, 3, 3, 3)),
             "b2": rng.standard_normal(8), "w3": w3}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], "c1"),
             helper.make_node("Conv", ["x", "w2", "b2"], ["b"], "c2"),
             helper.make_node("Concat", ["a", "b"], ["ab"], "cat", axis=1),
             helper.make_node("Sigmoid", ["ab"], ["s"], "act"),
             helper.make_node("Conv", ["s", "w3"], ["y"], "c3")]
    model = make_model(nodes, {"x": (1, 3, 6, 6)}, ["y"], inits)
    permuted, result, tg = _permute(model)
    assert {tuple(r["producers"]) for r in result.details["permuted"]} <= {("c1",), ("c2",)}
    assert result.modified
    assert _max_rel(model, permuted) <= EXACT
    assert _total_kept(permuted, tg) > _total_kept(model, tg)


def test_sequential_sparsegpt_compile_with_permute(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_conv_chain(), path)
    report = sparsec.compile(path, output=tmp_path / "out", nm="2:4", nm_everywhere=True, min_params=0,
                             permute=True, method="sparsegpt", sequential=True, calib_random=16, force=True)
    permute = next(s for s in report.steps if s["name"] == "weights")["permute"]
    assert permute["permuted"] and permute["oracle"]["max_rel_diff"] <= 1e-5
    assert min(o["cosine"] for o in report.verify["outputs"]) > 0.5
