"""External data in every mode: a model whose every tensor sits in a .data file (shape constants
included, as size_threshold=0 writes it) compiles to the same model as its in-protobuf twin."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import run

import sparsec
from models import GOLDEN

SHAPES = {"input_ids": (2, 8), "attention_mask": (2, 8)}


def save_both(model: onnx.ModelProto, d: Path) -> tuple[Path, Path]:
    """The model inline and with every tensor in one external file."""
    inline, external = d / "inline" / "m.onnx", d / "external" / "m.onnx"
    inline.parent.mkdir(parents=True)
    external.parent.mkdir(parents=True)
    onnx.save(model, inline)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save with external data rewrites the proto it is given
    onnx.save(copy, external, save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL
               for t in onnx.load(external, load_external_data=False).graph.initializer)
    return inline, external


def feeds_for(model: onnx.ModelProto, shapes: dict, seed: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for inp in model.graph.input:
        shape = shapes.get(inp.name) or [d.dim_value or 2 for d in inp.type.tensor_type.shape.dim]
        if inp.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            out[inp.name] = rng.integers(0, 100, shape).astype(np.int64)
        else:
            out[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def compile_both(model, tmp_path, shapes, **kwargs):
    inline, external = save_both(model, tmp_path)
    a = sparsec.compile(inline, output=tmp_path / "a", shapes=shapes, min_params=0, **kwargs)
    b = sparsec.compile(external, output=tmp_path / "b", shapes=shapes, min_params=0, **kwargs)
    feeds = feeds_for(model, shapes)
    out_a = run(str(tmp_path / "a" / "model.onnx"), feeds)
    out_b = run(str(tmp_path / "b" / "model.onnx"), feeds)  # onnxruntime loads it from its path
    for x, y in zip(out_a, out_b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert (tmp_path / "b" / "model.onnx.data").exists()
    return a, b


@pytest.mark.parametrize("kwargs", [
    {"heads": 0.25}, {"ffn": 0.25}, {"heads": 0.25, "ffn": 0.25, "calib_random": 4},
    {"sparsity": 0.5, "method": "wanda", "calib_random": 4, "bias_correct": True},  # forced: see below
    {"nm": "2:4", "method": "sparsegpt", "calib_random": 4},
], ids=["heads", "ffn", "heads-ffn-calib", "wanda", "sparsegpt"])
def test_transformer_modes_on_external_data(tmp_path, transformer_models, kwargs):
    a, b = compile_both(transformer_models["dynamo"], tmp_path, SHAPES, **kwargs)
    assert b.verify["max_abs_diff"] == a.verify["max_abs_diff"]
    assert [la.nonzeros for la in b.layers] == [la.nonzeros for la in a.layers]
    if "masked" in (a.verify or {}):
        assert b.verify["masked"]["max_abs_diff"] < 1e-4
    if a.transformer is not None:
        assert b.transformer["blocks"] == a.transformer["blocks"]


@pytest.mark.parametrize("name,kwargs", [
    ("resnet", {"channels": 0.3}),  # BatchNorm folded after removal (--fold-bn is on by default)
    ("structured_mlp", {"channels": 0.3, "channel_score": "act", "recover": True, "calib_random": 8}),
    ("resnet", {"channels": 0.3, "channel_score": "bn", "fold_bn": False}),
])
def test_channel_modes_on_external_data(tmp_path, name, kwargs):
    model = GOLDEN[name]()
    a, b = compile_both(model, tmp_path, {}, **kwargs)
    assert b.channels["removed"] == a.channels["removed"] > 0
    assert b.verify["masked"]["max_abs_diff"] == a.verify["masked"]["max_abs_diff"]
    assert [s["kept"] for s in b.channels["sources"]] == [s["kept"] for s in a.channels["sources"]]


def assert_external_output(outdir: Path) -> None:
    """Every tensor of 1 KB or more in model.onnx.data at a 64-byte aligned offset; only small ones inline."""
    model = onnx.load(outdir / "model.onnx", load_external_data=False)
    external = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            assert info["location"] == "model.onnx.data" and int(info.get("offset", 0)) % 64 == 0, t.name
            external += 1
        else:
            assert len(t.raw_data) < 1024, f"{t.name} ({len(t.raw_data)} bytes) inside the protobuf"
    assert external > 0


@pytest.mark.parametrize("name,kwargs", [
    ("mlp", {"nm": "2:4"}),
    ("mlp", {"sparsity": 0.5}),
    ("mlp", {"nm": "2:4", "precision": "fp16"}),
    ("resnet", {"fold_bn": True}),
    ("transformer", {"nm": "2:4", "encode": "auto"}),
], ids=["nm", "sparsity", "fp16", "fold-bn", "encode"])
def test_every_mode_writes_aligned_external_data(tmp_path, name, kwargs):
    model = GOLDEN[name]()
    shapes = SHAPES if name == "transformer" else {}
    inline, external = save_both(model, tmp_path)
    a = sparsec.compile(inline, output=tmp_path / "a", shapes=shapes, min_params=0, **kwargs)
    b = sparsec.compile(external, output=tmp_path / "b", shapes=shapes, min_params=0, **kwargs)
    assert_external_output(tmp_path / "b")
    assert [la.nonzeros for la in b.layers] == [la.nonzeros for la in a.layers]
    feeds = feeds_for(model, shapes)
    outs = [run(str(tmp_path / d / "model.onnx"), feeds) for d in ("a", "b")]
    for x, y in zip(*outs, strict=True):
        np.testing.assert_array_equal(x, y)
    if "encode" in kwargs:  # the blobs of the external-data compile equal the inline one's
        assert b.encoding["tensors"] == a.encoding["tensors"]
        assert (tmp_path / "b" / "skeleton.onnx.data").is_file()


def test_weight_compile_of_external_model_makes_no_inline_copy(tmp_path, monkeypatch):
    """Bounded memory: the step oracle runs the live graph on the store's values instead of a
    self-contained copy of the model (which, past 2 GB, was made only to be thrown away)."""
    import sparsec.core.tensors as tensors
    import sparsec.recipes.compile_run as compile_run

    def refuse(*_):
        raise AssertionError("inline copy of the whole model")

    monkeypatch.setattr(compile_run, "inline_copy", refuse)
    monkeypatch.setattr(tensors, "inline_copy", refuse)
    _, external = save_both(GOLDEN["mlp"](), tmp_path)
    report = sparsec.compile(external, output=tmp_path / "b", min_params=0, nm="2:4")
    step = next(s for s in report.steps if s["name"] == "weights")
    assert step["oracle"]["max_abs_diff"] > 0 and "skipped" not in step["oracle"]


def test_verify_holds_one_model_in_onnxruntime_at_a_time(tmp_path, monkeypatch):
    import weakref

    import sparsec.runtime.verify as verify

    live, most = weakref.WeakSet(), []
    real = verify.make_session

    def counting(path, *args, **kwargs):
        session = real(path, *args, **kwargs)
        live.add(session)
        most.append(len(live))
        return session

    monkeypatch.setattr(verify, "make_session", counting)
    _, external = save_both(GOLDEN["mlp"](), tmp_path)
    report = sparsec.compile(external, output=tmp_path / "b", min_params=0, nm="2:4")
    assert report.verify["max_abs_diff"] > 0
    assert most and max(most) == 1


def test_default_bias_correction_is_left_out_for_external_data(tmp_path):
    """Default bias correction needs an in-memory dense copy; on an external-data model it is left out
    with the reason (memory stays bounded), while the same model inline gets it."""
    inline, external = save_both(GOLDEN["mlp"](), tmp_path)
    kwargs = {"nm": "2:4", "method": "wanda", "calib_random": 4, "min_params": 0}
    a = sparsec.compile(inline, output=tmp_path / "a", **kwargs)
    b = sparsec.compile(external, output=tmp_path / "b", **kwargs)
    step_a = next(s for s in a.steps if s["name"] == "correct")
    step_b = next(s for s in b.steps if s["name"] == "correct")
    assert "default" in step_a["plan"] and "guard" in step_a  # corrected on a copy, kept if it helps
    assert not step_b["modified"] and "external data" in step_b["skipped"]
