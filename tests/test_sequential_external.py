"""SparseGPT --sequential on an external-data model: bounded memory, same weights (issue 13).

Each level's calibration starts from the values the previous level kept (not from the model's inputs),
the pruned weights live in a scratch file instead of memory, and only the current level's Gram
matrices stay alive; none of that may change a single pruned weight.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import sparsec
import sparsec.runtime.calibrate as calibrate
import sparsec.runtime.level_cut as level_cut
from sparsec.core.graph import load_model
from sparsec.weights.sparsegpt_pass import SparseGPTPass

D = 512  # 512 x 512 float32 = 1 MiB per weight: large enough to be spilled


def residual_mlp(seed: int = 0) -> onnx.ModelProto:
    """x -> relu(x W0) = h; relu(h W1 + h) = z; z W2 + h: three levels, h crosses two of them."""
    rng = np.random.default_rng(seed)
    weights = [numpy_helper.from_array((rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32), f"w{i}")
               for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["a0"], name="fc0"),
             helper.make_node("Relu", ["a0"], ["h"], name="act0"),
             helper.make_node("MatMul", ["h", "w1"], ["a1"], name="fc1"),
             helper.make_node("Add", ["a1", "h"], ["r1"], name="res1"),
             helper.make_node("Relu", ["r1"], ["z"], name="act1"),
             helper.make_node("MatMul", ["z", "w2"], ["a2"], name="fc2"),
             helper.make_node("Add", ["a2", "h"], ["y"], name="res2")]
    io = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", D]) for name in ("x", "y")]
    graph = helper.make_graph(nodes, "residual_mlp", io[:1], io[1:], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _save(tmp_path, external: bool):
    folder = tmp_path / ("ext" if external else "inline")
    folder.mkdir()
    path = folder / "m.onnx"
    onnx.save_model(residual_mlp(), str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=1024)
    return path


def _compile(src, out):
    sparsec.compile(src, output=out, nm="2:4", method="sparsegpt", sequential=True, calib_random=16, seed=0,
                    min_params=0, force=True, quiet=True, bias_correct=False)
    loaded = load_model(out / "model.onnx")
    return {t.name: np.array(loaded.store.read(t)) for t in loaded.model.graph.initializer}


def _watch_sessions(monkeypatch) -> list[dict]:
    """Record what each calibration session is given: tensor names, and those fed as in-memory arrays."""
    seen: list[dict] = []
    real = calibrate.session_with_values

    def spy(graph, tensors, store, *args, **kwargs):
        pending = [t.name for t in tensors if not store.on_disk(t) and t.name.startswith("w")]
        inline = [t.name for t in tensors if t.name in pending and not isinstance(store.read(t), np.memmap)]
        seen.append({"weights": sorted(t.name for t in tensors if t.name.startswith("w")),
                     "pruned": pending, "inline": inline, "inputs": [i.name for i in graph.graph.input]})
        return real(graph, tensors, store, *args, **kwargs)

    monkeypatch.setattr(calibrate, "session_with_values", spy)
    return seen


def test_external_sequential_matches_in_memory_and_feeds_no_pruned_weight_inline(tmp_path, monkeypatch):
    inline = _compile(_save(tmp_path, False), tmp_path / "o_inline")
    seen = _watch_sessions(monkeypatch)
    external = _compile(_save(tmp_path, True), tmp_path / "o_ext")
    for name in ("w0", "w1", "w2"):
        np.testing.assert_allclose(external[name], inline[name], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(external[name] != 0, inline[name] != 0)
    levels = seen[:3]
    assert [s["inline"] for s in levels] == [[], [], []]  # pruned weights come from the scratch file
    assert [s["pruned"] for s in levels] == [[], ["w0"], ["w1"]]  # each level reads the one before it
    # levels 1 and 2 start from the kept h (and z), not from x: earlier weights are not run again
    assert [s["weights"] for s in levels] == [[], ["w0"], ["w1"]]
    assert "x" not in levels[2]["inputs"] and "h" in levels[2]["inputs"]


def test_cut_gives_the_weights_of_running_every_level_from_the_inputs(tmp_path, monkeypatch):
    src = _save(tmp_path, True)
    cut = _compile(src, tmp_path / "o_cut")
    monkeypatch.setattr(level_cut, "CUT_BUDGET", 0)  # nothing kept: every level runs from x
    seen = _watch_sessions(monkeypatch)
    full = _compile(src, tmp_path / "o_full")
    assert [s["weights"] for s in seen[:3]] == [[], ["w0"], ["w0", "w1"]]
    for name in ("w0", "w1", "w2"):
        np.testing.assert_allclose(cut[name], full[name], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(cut[name] != 0, full[name] != 0)


def test_only_the_current_levels_gram_matrices_stay_alive(tmp_path, monkeypatch):
    alive: list[int] = []
    real = SparseGPTPass.run

    def spy(self, ctx):
        alive.append(sum(s.gram is not None for s in ctx.facts["calibration"].layers.values()))
        return real(self, ctx)

    monkeypatch.setattr(SparseGPTPass, "run", spy)
    _compile(_save(tmp_path, True), tmp_path / "o")
    assert alive == [1, 1, 1]


@pytest.mark.parametrize("external", [False, True])
def test_pruned_model_matches_its_weights_in_onnxruntime(tmp_path, external):
    """The written model is the pruned weights: onnxruntime on it equals numpy on them (1e-4)."""
    import onnxruntime as ort

    out = tmp_path / "o"
    weights = _compile(_save(tmp_path, external), out)
    x = np.random.default_rng(1).standard_normal((4, D)).astype(np.float32)
    h = np.maximum(x @ weights["w0"], 0)
    z = np.maximum(h @ weights["w1"] + h, 0)
    expected = z @ weights["w2"] + h
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
