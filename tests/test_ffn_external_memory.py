"""Bounded memory for structured steps on external-data models (issue 13): the masked twins and the
probes of `--ffn`/`--channels` hand onnxruntime only the weights they change; every other weight stays
in the data file and is mapped by onnxruntime itself, so no step holds a second copy of the model."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import run
from onnx import TensorProto, helper, numpy_helper

import sparsec
from sparsec.core.tensors import INLINE_LIMIT

E, F, V = 32, 128, 64
FFN = {"Wg", "Wu", "Wd"}  # the weights --ffn rewrites; Wa (residual) and Wout (logits) stay whole


def gated_mlp() -> onnx.ModelProto:
    """x -> residual projection -> SiLU-gated MLP (gate, up, down) -> residual -> logits: Llama's FFN."""
    rng = np.random.default_rng(0)
    shapes = {"Wa": (E, E), "Wg": (E, F), "Wu": (E, F), "Wd": (F, E), "Wout": (E, V)}
    inits = [numpy_helper.from_array((rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32), n)
             for n, s in shapes.items()]
    nodes = [helper.make_node("MatMul", ["x", "Wa"], ["a"], name="attn_out"),
             helper.make_node("Add", ["x", "a"], ["r1"], name="res1"),
             helper.make_node("MatMul", ["r1", "Wg"], ["g"], name="gate"),
             helper.make_node("MatMul", ["r1", "Wu"], ["u"], name="up"),
             helper.make_node("Sigmoid", ["g"], ["sg"], name="sig"),
             helper.make_node("Mul", ["g", "sg"], ["silu"], name="silu"),
             helper.make_node("Mul", ["silu", "u"], ["h"], name="gated"),
             helper.make_node("MatMul", ["h", "Wd"], ["d"], name="down"),
             helper.make_node("Add", ["r1", "d"], ["r2"], name="res2"),
             helper.make_node("MatMul", ["r2", "Wout"], ["logits"], name="head")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, E])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 8, V])
    graph = helper.make_graph(nodes, "gated_mlp", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def save_both(model: onnx.ModelProto, d: Path) -> tuple[Path, Path]:
    inline, external = d / "inline" / "m.onnx", d / "external" / "m.onnx"
    for p in (inline, external):
        p.parent.mkdir(parents=True)
    onnx.save(model, inline)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(copy, external, save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    return inline, external


@pytest.fixture
def handed(monkeypatch) -> list[set[str]]:
    """Per onnxruntime session built from bytes: the weights (>= INLINE_LIMIT bytes) it was handed by
    value, inline in the protobuf or as OrtValues; a session on a path reads its file itself."""
    sessions: list[set[str]] = []

    class Options(ort.SessionOptions):
        fed: frozenset[str] = frozenset()

        def add_external_initializers(self, names, values):
            self.fed = self.fed | set(names)
            super().add_external_initializers(names, values)

    real = ort.InferenceSession

    def session(model, opts=None, *args, **kwargs):
        if isinstance(model, bytes):
            proto = onnx.load_from_string(model)
            inline = {t.name for t in proto.graph.initializer
                      if t.data_location != TensorProto.EXTERNAL and len(t.raw_data) >= INLINE_LIMIT}
            sessions.append(inline | set(getattr(opts, "fed", ())))
        return real(model, opts, *args, **kwargs)

    monkeypatch.setattr(ort, "SessionOptions", Options)
    monkeypatch.setattr(ort, "InferenceSession", session)
    return sessions


@pytest.mark.parametrize("kwargs", [{"ffn": 0.25}, {"channels": 0.25}], ids=["ffn", "channels"])
def test_structured_compile_hands_onnxruntime_only_changed_weights(tmp_path, handed, kwargs):
    model = gated_mlp()
    inline, external = save_both(model, tmp_path)
    a = sparsec.compile(inline, output=tmp_path / "a", min_params=0, **kwargs)
    handed.clear()  # from here on: the external-data compile
    b = sparsec.compile(external, output=tmp_path / "b", min_params=0, **kwargs)
    assert handed, "the compensation probe and the masked oracle run onnxruntime"
    untouched = {"Wa", "Wout"}
    assert all(not (names & untouched) for names in handed), handed
    assert all(names <= FFN for names in handed), handed
    # the oracle ran and held: pruned == dense with the removed neurons zeroed
    assert b.channels["removed"] == a.channels["removed"] > 0
    assert b.verify["masked"]["max_abs_diff"] < 1e-5
    assert b.verify["masked"]["max_abs_diff"] == pytest.approx(a.verify["masked"]["max_abs_diff"], abs=1e-6)
    x = {"x": np.random.default_rng(3).standard_normal((1, 8, E)).astype(np.float32)}
    want, got = run(str(tmp_path / "a" / "model.onnx"), x), run(str(tmp_path / "b" / "model.onnx"), x)
    assert got[0].shape == want[0].shape == (1, 8, V)
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-5)
    pruned = onnx.load(tmp_path / "b" / "model.onnx", load_external_data=False)
    written = {t.name: t for t in pruned.graph.initializer}
    assert written["Wg"].dims[1] == written["Wd"].dims[0] < F


def test_masked_twin_copies_no_weight_until_read(tmp_path):
    """The twin's store zeroes removed filters on read; untouched weights stay on disk in it, and the
    model's own store is left as it was."""
    from sparsec.core.graph import load_model
    from sparsec.core.twins import masked_twin

    _, external = save_both(gated_mlp(), tmp_path)
    loaded = load_model(external)
    masked, store = masked_twin(loaded.model, loaded.store)
    inits = {t.name: t for t in masked.graph.initializer}
    store.zero(inits["Wg"], 1, [0, 5])
    assert not store._pending and all(store.on_disk(t) for n, t in inits.items() if n != "Wg")
    assert not store.on_disk(inits["Wg"])
    w = store.read(inits["Wg"])
    dense = loaded.store.read(next(t for t in loaded.model.graph.initializer if t.name == "Wg"))
    assert np.all(w[:, [0, 5]] == 0) and np.array_equal(np.delete(w, [0, 5], 1), np.delete(dense, [0, 5], 1))
    assert np.abs(dense[:, [0, 5]]).min() > 0  # the dense model's values are untouched


def unchanged_weights(dense: Path, pruned: Path) -> set[str]:
    """Weights (>= INLINE_LIMIT bytes) the compile wrote back exactly as they were."""
    def values(path: Path) -> dict[str, np.ndarray]:
        return {t.name: numpy_helper.to_array(t, base_dir=str(path.parent))
                for t in onnx.load(path, load_external_data=False).graph.initializer}
    before, after = values(dense), values(pruned)
    return {n for n, v in before.items() if v.nbytes >= INLINE_LIMIT and n in after
            and after[n].shape == v.shape and np.array_equal(after[n], v)}


def test_conv_channels_hand_onnxruntime_no_unchanged_weight(tmp_path, handed):
    """Conv filters are zeroed in the masked twin on read (no output mask applies): still only the
    weights the step changes are handed to onnxruntime, and the compile equals the in-memory one."""
    from models import GOLDEN

    inline, external = save_both(GOLDEN["resnet"](), tmp_path)
    kwargs = {"channels": 0.3, "fold_bn": False}
    a = sparsec.compile(inline, output=tmp_path / "a", min_params=0, **kwargs)
    handed.clear()
    b = sparsec.compile(external, output=tmp_path / "b", min_params=0, **kwargs)
    unchanged = unchanged_weights(external, tmp_path / "b" / "model.onnx")
    assert len(unchanged) >= 3 and handed and all(names for names in handed)
    assert all(not (names & unchanged) for names in handed), (handed, unchanged)
    assert b.channels["removed"] == a.channels["removed"] > 0
    assert b.verify["masked"]["max_abs_diff"] < 1e-4
    x = {"x": np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    outs = [run(str(tmp_path / d / "model.onnx"), x) for d in ("a", "b")]
    for want, got in zip(*outs, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
