"""A Reshape that only regroups leading dims passes the last (channel) axis through (GPT-2's Conv1D:
`view(-1, nx)` → MatMul → Add → `view(size_out)`), and its target's last entry follows the cut: a
constant target, the constant last piece of a Concat (copied when two layers share it), or a read of
the data's own last dim. A last entry it cannot rewrite keeps the channels, with the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import sparsec
from sparsec.runtime.session import make_session

F32, I64 = TensorProto.FLOAT, TensorProto.INT64
DEAD = {0: [1, 5], 1: [0, 3, 7, 9, 12, 15]}  # exactly-zero neurons per block: 8 of 32 = --channels 0.25


def _i64(name: str, values: list[int] | int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _dim(nodes: list, src: str, axis: int, out: str) -> str:
    """Shape(src)[axis] as a 1-element int64, the way torchscript writes `x.size(axis)`."""
    nodes += [helper.make_node("Shape", [src], [f"{out}_s"]),
              helper.make_node("Gather", [f"{out}_s", f"ax{axis}"], [f"{out}_g"], axis=0),
              helper.make_node("Unsqueeze", [f"{out}_g", "zero"], [out])]
    return out


def _targets(nodes: list, style: str, src: str, b: int) -> tuple[str, str, list]:
    """(target of view(size_out) after c_fc, target of view(-1, nx) before c_proj, the nodes that build
    the latter from the activation) in `style`."""
    if style == "constant":
        return "mid_shape", "flat16", []
    if style == "shared_concat":  # one Concat for both blocks (dynamo dedups), built once
        if b == 0:
            nodes.append(helper.make_node("Concat", [_dim(nodes, "x", 0, "d0"), _dim(nodes, "x", 1, "d1"),
                                                     "w16"], ["size_out"], axis=0))
        return "size_out", "flat16", []
    # torchscript: size_out from this block's input dims; nx = Squeeze(Slice(Shape(h)[-1:]))
    lead = [_dim(nodes, src, 0, f"b{b}d0"), _dim(nodes, src, 1, f"b{b}d1")]
    nodes.append(helper.make_node("Concat", [*lead, "w16"], [f"b{b}size"], axis=0))
    later = [helper.make_node("Shape", [f"b{b}act"], [f"b{b}hs"]),
             helper.make_node("Slice", [f"b{b}hs", "minus1", "big"], [f"b{b}hl"]),
             helper.make_node("Squeeze", [f"b{b}hl", "zero"], [f"b{b}nx"]),
             helper.make_node("Unsqueeze", [f"b{b}nx", "zero"], [f"b{b}nx1"]),
             helper.make_node("Concat", ["minus1", f"b{b}nx1"], [f"b{b}flat"], axis=0)]
    return f"b{b}size", f"b{b}flat", later


def conv1d_mlp(style: str, last: str = "w16") -> onnx.ModelProto:
    """Two GPT-2 MLP blocks on x [2, 3, 8]: view(-1, 8) → MatMul → Add → view(2, 3, 16) → Tanh →
    view(-1, 16) → MatMul → Add → view(2, 3, 8) → residual; DEAD neurons have zero weights and bias."""
    rng = np.random.default_rng(0)
    inits = [_i64("flat8", [-1, 8]), _i64("flat16", [-1, 16]), _i64("mid_shape", [2, 3, 16]),
             _i64("out_shape", [2, 3, 8]), _i64("w16", [16]), *[_i64(f"ax{k}", k) for k in range(3)],
             _i64("zero", [0]), _i64("minus1", [-1]), _i64("big", [2**62]), _i64("two", [2])]
    nodes: list = []
    src = "x"
    for b in range(2):
        w1, b1 = rng.standard_normal((8, 16)), rng.standard_normal(16)
        w1[:, DEAD[b]], b1[DEAD[b]] = 0.0, 0.0
        w2, b2 = rng.standard_normal((16, 8)), rng.standard_normal(8)
        inits += [numpy_helper.from_array(a.astype(np.float32), f"{n}{b}")
                  for n, a in (("W1_", w1), ("b1_", b1), ("W2_", w2), ("b2_", b2))]
        size_out, flat, later = _targets(nodes, style, src, b)
        if last != "w16" and b == 0:  # the last entry is computed: Mul(8, 2) read off x
            lead = [_dim(nodes, "x", 0, "e0"), _dim(nodes, "x", 1, "e1")]
            nodes += [helper.make_node("Mul", [_dim(nodes, "x", 2, "d2"), "two"], ["sixteen"]),
                      helper.make_node("Concat", [*lead, "sixteen"], ["computed"], axis=0)]
            size_out = "computed"
        nodes += [helper.make_node("Reshape", [src, "flat8"], [f"b{b}x2"], name=f"b{b}/c_fc/view_in"),
                  helper.make_node("MatMul", [f"b{b}x2", f"W1_{b}"], [f"b{b}h"], name=f"b{b}/c_fc/MatMul"),
                  helper.make_node("Add", [f"b{b}h", f"b1_{b}"], [f"b{b}a"], name=f"b{b}/c_fc/Add"),
                  helper.make_node("Reshape", [f"b{b}a", size_out], [f"b{b}a3"], name=f"b{b}/c_fc/view_out"),
                  helper.make_node("Tanh", [f"b{b}a3"], [f"b{b}act"], name=f"b{b}/act"), *later,
                  helper.make_node("Reshape", [f"b{b}act", flat], [f"b{b}r2"], name=f"b{b}/c_proj/view_in"),
                  helper.make_node("MatMul", [f"b{b}r2", f"W2_{b}"], [f"b{b}o"], name=f"b{b}/c_proj/MatMul"),
                  helper.make_node("Add", [f"b{b}o", f"b2_{b}"], [f"b{b}o2"], name=f"b{b}/c_proj/Add"),
                  helper.make_node("Reshape", [f"b{b}o2", "out_shape"], [f"b{b}o3"],
                                   name=f"b{b}/c_proj/view_out"),
                  helper.make_node("Add", [src, f"b{b}o3"], ["r0" if b == 0 else "y"], name=f"b{b}/residual")]
        src = "r0"
    read = {name for n in nodes for name in n.input}
    graph = helper.make_graph(nodes, "conv1d_mlp", [helper.make_tensor_value_info("x", F32, [2, 3, 8])],
                              [helper.make_tensor_value_info("y", F32, [2, 3, 8])],
                              [t for t in inits if t.name in read])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return make_session(path).run(None, {"x": x})[0]


def _compile(model: onnx.ModelProto, tmp_path: Path) -> tuple[sparsec.Report, onnx.ModelProto, float]:
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    report = sparsec.compile(path, output=tmp_path / "out", channels=0.25, round_to=1, force=True)
    x = np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)
    diff = float(np.abs(_run(tmp_path / "out" / "model.onnx", x) - _run(path, x)).max())
    return report, onnx.load(str(tmp_path / "out" / "model.onnx")), diff


def _value(model: onnx.ModelProto, name: str) -> list[int]:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name)).tolist()


def _target_last(model: onnx.ModelProto, reshape: str) -> int | None:
    """The last entry of a Reshape's target: its constant, or its Concat's constant last piece."""
    node = next(n for n in model.graph.node if n.name == reshape)
    inits = {t.name for t in model.graph.initializer}
    if node.input[1] in inits:
        return _value(model, node.input[1])[-1]
    concat = next(n for n in model.graph.node if node.input[1] in n.output)
    return _value(model, concat.input[-1])[-1] if concat.input[-1] in inits else None


@pytest.mark.parametrize("style", ["constant", "shared_concat", "torchscript"])
def test_leading_regroup_passes_channels_and_rewrites_the_target(tmp_path: Path, style: str) -> None:
    report, out, diff = _compile(conv1d_mlp(style), tmp_path)
    assert report.channels["removed"] == 8 and report.nothing_pruned is None
    widths = [_value_shape(out, f"W1_{b}")[1] for b in range(2)]
    assert widths == [14, 10], widths  # exactly the dead neurons went, each block its own count
    for b, width in enumerate(widths):
        assert _value_shape(out, f"W2_{b}")[0] == width
        assert _target_last(out, f"b{b}/c_fc/view_out") == width
        last_in = _target_last(out, f"b{b}/c_proj/view_in")
        assert last_in == (None if style == "torchscript" else width)  # Shape(h)[-1] follows by itself
    read = {name for n in out.graph.node for name in n.input}
    assert not [t.name for t in out.graph.initializer if t.name not in read], "dead initializer left"
    assert diff < 1e-6 and report.verify["masked"]["max_abs_diff"] < 1e-5


def _value_shape(model: onnx.ModelProto, name: str) -> tuple[int, ...]:
    return tuple(next(t for t in model.graph.initializer if t.name == name).dims)


def test_computed_last_entry_keeps_its_channels_and_says_why(tmp_path: Path) -> None:
    report, out, diff = _compile(conv1d_mlp("constant", last="computed"), tmp_path)
    groups = report.channels["groups"]
    reasons = [r for g in groups if "b0/c_fc/MatMul" in g["sources"] for r in g["untouchable"]]
    assert reasons == ["b0/c_fc/view_out reshapes the channel axis: its target's piece sixteen is computed"]
    assert _value_shape(out, "W1_0") == (8, 16) and _value_shape(out, "W1_1") == (8, 12)  # 0.25 of 16
    assert diff < 1e-6


def test_splitting_the_last_axis_still_blocks(tmp_path: Path) -> None:
    model = conv1d_mlp("constant")
    for t in model.graph.initializer:  # view(2, 3, 4, 4): heads, not a regrouping of leading dims
        if t.name == "mid_shape":
            t.CopyFrom(_i64("mid_shape", [2, 3, 4, 4]))
    report, out, diff = _compile(model, tmp_path)
    reasons = " ".join(r for g in report.channels["groups"] for r in g["untouchable"])
    assert "b0/c_fc/view_out reshapes the channel axis: its last dim changes (16 → 4)" in reasons
    assert report.channels["removed"] == 0 and diff < 1e-6
