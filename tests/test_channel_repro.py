"""Channel removal on the small graphs the random-graph fuzzer broke (issue: never a wrong model).

Each graph is rebuilt here with onnx.helper: unnamed nodes whose derived names collided, a Gemm with
a constant A reading channels, a Split branch that could be emptied, a fold-only compile whose report
matched layers by shifting display names.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import sparsec
from sparsec.runtime.session import make_session

F32 = TensorProto.FLOAT


def _model(nodes, inits: dict[str, np.ndarray], x_shape, y_shape) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, x_shape)],
                              [helper.make_tensor_value_info("y", F32, y_shape)],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _rand(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def _bn(c: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"g": rng.uniform(0.5, 1.5, c), "be": rng.standard_normal(c), "mu": rng.standard_normal(c),
            "var": rng.uniform(0.5, 2.0, c)}


def twin_convs(c2: int) -> onnx.ModelProto:
    """Unnamed Conv-Relu-Conv-BN-Relu-Conv: both consumers need a compensation bias."""
    inits = {"W1": _rand(1, 8, 4, 1, 1), "b1": _rand(2, 8), "W2": _rand(3, c2, 8, 1, 1), **_bn(c2, 4),
             "W3": _rand(5, 4, c2, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["c1"]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["c2"]),
             helper.make_node("BatchNormalization", ["c2", "g", "be", "mu", "var"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["r2"]), helper.make_node("Conv", ["r2", "W3"], ["y"])]
    return _model(nodes, inits, [1, 4, 6, 6], [1, 4, 6, 6])


def unnamed_mlp() -> onnx.ModelProto:
    inits = {"W1": _rand(1, 8, 16), "b1": _rand(2, 16), "W2": _rand(3, 16, 16), "b2": _rand(4, 16),
             "W3": _rand(5, 16, 4)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"]), helper.make_node("Add", ["h1", "b1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]), helper.make_node("MatMul", ["r1", "W2"], ["h2"]),
             helper.make_node("Add", ["h2", "b2"], ["a2"]), helper.make_node("Relu", ["a2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "W3"], ["y"])]
    return _model(nodes, inits, [1, 8], [1, 4])


def gemm_constant_a(trans_a: int) -> onnx.ModelProto:
    a = _rand(6, 4, 16) if not trans_a else _rand(6, 16, 4)
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["h"], name="g1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Transpose", ["r"], ["rt"], perm=[1, 0]),
             helper.make_node("Gemm", ["A", "rt"], ["y"], name="g2", transA=trans_a)]
    return _model(nodes, {"W1": _rand(1, 8, 16), "A": a}, [2, 8], [4, 2])


def split_branches(named: bool, bn: bool) -> onnx.ModelProto:
    """Conv -> [BN] -> Split [7, 1] -> (Relu | Conv) -> Concat -> Conv: the 1-channel branch must stay."""
    inits = {"W1": _rand(1, 8, 4, 1, 1), "W2": _rand(2, 4, 1, 1, 1), "W3": _rand(3, 4, 11, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"])]
    if bn:
        inits.update(_bn(8, 4))
        nodes.append(helper.make_node("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["c1n"]))
    inits["sp"] = np.array([7, 1])
    nodes += [helper.make_node("Split", ["c1n" if bn else "c1", "sp"], ["a", "b"], axis=1),
              helper.make_node("Relu", ["a"], ["ra"]), helper.make_node("Conv", ["b", "W2"], ["cb"]),
              helper.make_node("Concat", ["ra", "cb"], ["cat"], axis=1),
              helper.make_node("Conv", ["cat", "W3"], ["y"])]
    model = _model(nodes, {}, [1, 4, 6, 6], [1, 4, 6, 6])
    for k, v in inits.items():
        dtype = np.int64 if k == "sp" else np.float32
        model.graph.initializer.append(numpy_helper.from_array(v.astype(dtype), k))
    if named:
        for i, node in enumerate(model.graph.node):
            node.name = f"n{i}"
    return model


def conv_bn_chain() -> onnx.ModelProto:
    """Unnamed Conv-BN-Conv-BN-Conv: folding removes nodes, so display names shift."""
    inits = {"W1": _rand(1, 8, 4, 3, 3), **{f"bn1{k}": v for k, v in _bn(8, 2).items()},
             "W2": _rand(3, 32, 8, 3, 3), **{f"bn2{k}": v for k, v in _bn(32, 4).items()},
             "W3": _rand(5, 4, 32, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "bn1g", "bn1be", "bn1mu", "bn1var"], ["b1"]),
             helper.make_node("Conv", ["b1", "W2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c2", "bn2g", "bn2be", "bn2mu", "bn2var"], ["b2"]),
             helper.make_node("Conv", ["b2", "W3"], ["y"])]
    return _model(nodes, inits, [1, 4, 8, 8], [1, 4, 8, 8])


def _compile(model: onnx.ModelProto, tmp_path: Path, **options) -> tuple[sparsec.Report, Path]:
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "out"
    options.setdefault("round_to", 1)  # exact kept counts on these small golden graphs
    report = sparsec.compile(path, output=out, force=True, **options)
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    make_session(out / "model.onnx")
    written = onnx.load(str(out / "model.onnx"))
    assert all(np.prod(t.dims) > 0 for t in written.graph.initializer), "a zero-size tensor was written"
    names = [t.name for t in written.graph.initializer] + [n.name for n in written.graph.node if n.name]
    assert len(names) == len(set(names)), "duplicate names in the written model"
    json.loads((out / "report.json").read_text())
    return report, out


@pytest.mark.parametrize("c2,options", [(12, {"channels": 0.3}), (8, {"channels": 0.5, "round_to": 4}),
                                        (12, {"channels": 0.3, "fold_bn": False})])
def test_unnamed_convs_get_their_own_compensation(tmp_path: Path, c2: int, options: dict) -> None:
    report, _ = _compile(twin_convs(c2), tmp_path, **options)
    assert report.channels["removed"] > 0
    assert report.verify["masked"]["max_abs_diff"] < 1e-4


def test_unnamed_mlp_compensation_names_are_unique(tmp_path: Path) -> None:
    report, _ = _compile(unnamed_mlp(), tmp_path, channels=0.3)
    assert report.channels["removed"] > 0
    assert report.verify["masked"]["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("trans_a", [0, 1])
def test_gemm_with_constant_a_keeps_its_channels_and_says_why(tmp_path: Path, trans_a: int) -> None:
    report, _ = _compile(gemm_constant_a(trans_a), tmp_path, channels=0.3)
    reasons = " ".join(r for g in report.channels["groups"] for r in g.get("untouchable", []))
    assert "g2" in reasons and "constant A" in reasons
    assert report.verify["max_abs_diff"] < 1e-5


@pytest.mark.parametrize("named,bn", [(True, False), (False, True)])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.9])
def test_a_split_branch_is_never_emptied(tmp_path: Path, named: bool, bn: bool, ratio: float) -> None:
    report, out = _compile(split_branches(named, bn), tmp_path, channels=ratio)
    written = onnx.load(str(out / "model.onnx"))
    split = next(n for n in written.graph.node if n.op_type == "Split")
    sizes = next(numpy_helper.to_array(t) for t in written.graph.initializer if t.name == split.input[1])
    assert sizes.min() >= 1 and sizes[1] == 1
    assert report.verify["masked"]["max_abs_diff"] < 1e-4


def test_fold_only_report_matches_layers_by_identity(tmp_path: Path) -> None:
    report, _ = _compile(conv_bn_chain(), tmp_path, channels=0.0, round_to=1, fold_bn=True)
    by_weight = {e.weight: e for e in report.layers}
    assert [by_weight[w].params for w in ("W1", "W2", "W3")] == [8 * 4 * 9, 32 * 8 * 9, 4 * 32]
    assert all(e.nonzeros == e.params for e in report.layers)
    assert report.totals["macs_nonzero"] == report.totals["macs_dense"]
    assert report.verify["max_abs_diff"] < 1e-6 * report.verify["outputs"][0]["max_abs_dense"] * 10


def padded_consumers() -> onnx.ModelProto:
    """Consumers that see the border: a padded strided 3×3 Conv and a padded strided ConvTranspose."""
    inits = {"W1": _rand(1, 8, 4, 3, 3), "b1": _rand(2, 8) + 2, "W2": _rand(3, 6, 8, 3, 3),
             "W3": _rand(4, 6, 5, 3, 3), "W4": _rand(5, 4, 5, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("ConvTranspose", ["r2", "W3"], ["c3"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c3"], ["r3"]), helper.make_node("Conv", ["r3", "W4"], ["y"])]
    return _model(nodes, inits, [1, 4, 9, 9], [1, 4, 9, 9])


def _free_spatial(model: onnx.ModelProto) -> onnx.ModelProto:
    for value in (model.graph.input[0], model.graph.output[0]):
        for k, d in enumerate(value.type.tensor_type.shape.dim):
            if k != 1:
                d.dim_param = f"d{k}"
    del model.graph.value_info[:]
    return model


@pytest.mark.parametrize("size", [9, 13])
def test_padded_border_compensation_is_exact_at_every_size(tmp_path: Path, size: int) -> None:
    """The masked oracle holds to float error at the border too, also at an input size the
    compensation was not computed at (the correction is a Conv over a map of ones)."""
    from sparsec.channels.structured import plan_structured
    from sparsec.core.options import CompileOptions
    from sparsec.core.tensors import TensorStore
    from sparsec.runtime.session import make_session_from_proto

    report, out = _compile(padded_consumers(), tmp_path, channels=0.5)
    assert report.channels["removed"] > 0
    assert report.channels["compensation"]["inexact_consumers"] == []
    scale = report.verify["masked"]["outputs"][0]["max_abs_dense"]
    assert report.verify["masked"]["max_abs_diff"] < 1e-5 * scale
    # the same choice, as a masked twin (removed filters zeroed in the dense model), at another size
    plan = plan_structured(padded_consumers(), TensorStore(tmp_path),
                           CompileOptions(channels=0.5, round_to=1), {})
    masked = _free_spatial(plan.compensation.masked)
    pruned = _free_spatial(onnx.load(str(out / "model.onnx")))
    x = np.random.default_rng(7).standard_normal((2, 4, size, size)).astype(np.float32)
    want = make_session_from_proto(masked).run(None, {"x": x})[0]
    got = make_session_from_proto(pruned).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
