"""BatchNorm re-estimation (the correct stage): statistics measured on the pruned graph (adaptive BN), or
the stored ones moved by what pruning changed; where the BN was folded, the same per-channel affine
match on its producer."""

from __future__ import annotations

import numpy as np
import onnx
from helpers import run
from onnx import helper
from pass_helpers import calibration, context, make_model, run_pass, samples, weights

import sparsec
from sparsec.weights.correct_pass import CorrectPass


def _bn(x: str, y: str, name: str, rng, c: int) -> tuple:
    inits = {f"{name}.scale": rng.uniform(0.5, 2.0, c), f"{name}.bias": rng.standard_normal(c),
             f"{name}.mean": rng.standard_normal(c) * 0.5, f"{name}.var": rng.uniform(0.5, 2.0, c)}
    return helper.make_node("BatchNormalization", [x, *inits], [y], name, epsilon=1e-3), inits


def conv_bn_net():
    """Conv→BN→Relu→Conv→BN: two unfused BatchNorms, the second one fed by the first."""
    rng = np.random.default_rng(0)
    bn1, i1 = _bn("c1", "b1", "bn1", rng, 8)
    bn2, i2 = _bn("c2", "y", "bn2", rng, 8)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], "conv1", pads=[1] * 4), bn1,
             helper.make_node("Relu", ["b1"], ["r"], "relu"),
             helper.make_node("Conv", ["r", "w2"], ["c2"], "conv2", pads=[1] * 4), bn2]
    inits = {"w1": rng.standard_normal((8, 4, 3, 3)) * 0.3, "w2": rng.standard_normal((8, 8, 3, 3)) * 0.2,
             **i1, **i2}
    return make_model(nodes, {"x": ("N", 4, 6, 6)}, ["y"], inits)


def _exposed(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return out


def _moments(model, x, names):
    """Per-channel mean and population variance of each tensor, in numpy float64 (the reference)."""
    values = run(_exposed(model, names), {"x": x})[1:]
    return [(v.astype(np.float64).mean((0, 2, 3)), v.astype(np.float64).var((0, 2, 3))) for v in values]


def test_measured_statistics_equal_numpy_on_the_pruned_graph():
    model = conv_bn_net()
    ctx = context(model)
    for name in ("w1", "w2"):  # prune: zero every other input channel
        w = next(t for t in ctx.model.graph.initializer if t.name == name)
        values = onnx.numpy_helper.to_array(w).copy()
        values[:, 1::2] = 0.0
        w.CopyFrom(onnx.numpy_helper.from_array(values, name))
    settings = calibration(model, samples=32, batch=8, shapes={"x": (1, 4, 6, 6)})
    x = samples(settings)
    stale = weights(ctx.model)
    before = _moments(ctx.model, x, ["c1", "c2"])
    assert np.abs(before[1][0] - stale["bn2.mean"]).max() > 0.05  # the stored statistics are off
    result = run_pass(CorrectPass(None, {}, settings, bn=True), ctx)
    assert result.modified and [r["batchnorm"] for r in result.details["batchnorms"]] == ["bn1", "bn2"]
    assert result.details["levels"] == 2
    assert all(r["mode"] == "measured" for r in result.details["batchnorms"])
    new = weights(ctx.model)
    for (mean, var), bn in zip(_moments(ctx.model, x, ["c1", "c2"]), ("bn1", "bn2"), strict=True):
        np.testing.assert_allclose(new[f"{bn}.mean"], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new[f"{bn}.var"], var, rtol=1e-5, atol=1e-6)
    assert result.details["oracle"]["max_bn_mean_gap"] < 1e-5


def _compile(tmp_path, model, **kw):
    x = (np.random.default_rng(5).standard_normal((32, 4, 6, 6)) + 0.3).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    onnx.save(model, tmp_path / "m.onnx")
    kw.setdefault("bias_correct", False)  # on by default with calibration data: BN re-estimation alone here
    report = sparsec.compile(tmp_path / "m.onnx", output=tmp_path / "out", nm="2:4", min_params=0,
                             calib=tmp_path / "calib.npz", force=True, quiet=True, **kw)
    return report.as_dict(), onnx.load(tmp_path / "out" / "model.onnx"), x


def test_matched_statistics_give_the_dense_batchnorm_outputs(tmp_path):
    """With a dense reference the BN output keeps the dense per-channel mean and deviation."""
    model = conv_bn_net()
    plain, pruned_only, x = _compile(tmp_path, model)
    dense = _moments(model, x, ["b1", "y"])
    off = _moments(pruned_only, x, ["b1", "y"])
    assert np.abs(off[1][0] - dense[1][0]).max() > 0.05  # pruning alone moves the BN outputs
    report, out, _ = _compile(tmp_path, model, bn_reestimate=True)
    step = next(s for s in report["steps"] if s["name"] == "correct")
    assert [r["mode"] for r in step["batchnorms"]] == ["matched", "matched"]
    for (mean, var), (dmean, dvar) in zip(_moments(out, x, ["b1", "y"]), dense, strict=True):
        np.testing.assert_allclose(mean, dmean, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.sqrt(var), np.sqrt(dvar), rtol=1e-4, atol=1e-4)
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]  # values only


def test_folded_batchnorm_gets_the_affine_match_on_its_producer(tmp_path):
    model = conv_bn_net()
    report, out, x = _compile(tmp_path, model, fold_bn=True, bn_reestimate=True)
    assert "BatchNormalization" not in {n.op_type for n in out.graph.node}
    step = next(s for s in report["steps"] if s["name"] == "correct")
    assert {r["layer"]: r["kind"] for r in step["layers"]} == {"conv1": "affine", "conv2": "affine"}
    conv_outputs = [n.output[0] for n in out.graph.node if n.op_type == "Conv"]
    assert conv_outputs == ["b1", "y"]  # folding kept the BN output names
    for (mean, var), (dmean, dvar) in zip(_moments(out, x, conv_outputs), _moments(model, x, ["b1", "y"]),
                                          strict=True):
        np.testing.assert_allclose(mean, dmean, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.sqrt(var), np.sqrt(dvar), rtol=1e-4, atol=1e-4)
    w = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    conv2 = next(n for n in out.graph.node if n.output[0] == "y")
    assert (w[conv2.input[1]].reshape(8, 2, 4, 3, 3) != 0).sum(2).max() <= 2  # scaling kept 2:4


def test_statistics_in_constant_nodes_are_rewritten_in_place(tmp_path):
    """Paddle exports hold BatchNorm parameters in Constant nodes: they are rewritten where they are, so
    no dead Constant or initializer is left behind."""
    model = conv_bn_net()
    inits = {t.name: t for t in model.graph.initializer}
    consts = [helper.make_node("Constant", [], [name], f"{name}_const", value=inits[name])
              for name in ("bn2.mean", "bn2.var")]
    kept = [t for t in model.graph.initializer if t.name not in ("bn2.mean", "bn2.var")]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    nodes = consts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    report, out, x = _compile(tmp_path, model, bn_reestimate=True)
    read = {i for n in out.graph.node for i in n.input}
    assert all(t.name in read for t in out.graph.initializer)
    assert all(n.output[0] in read for n in out.graph.node if n.op_type == "Constant")
    (mean, var), = _moments(out, x, ["y"])
    (dmean, dvar), = _moments(model, x, ["y"])
    np.testing.assert_allclose(mean, dmean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.sqrt(var), np.sqrt(dvar), rtol=1e-4, atol=1e-4)
