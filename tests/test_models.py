"""Tests for the golden model builders in ``models``."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from models import GOLDEN, example_path
from models.example import build_example

HAND_BUILT = ["mlp", "cnn", "gemm_transb", "weight_paths", "example"]
EXPORTERS = ["dynamo", "torchscript"]


def _feeds(model: onnx.ModelProto, batch: int = 3, seq: int = 8) -> dict[str, np.ndarray]:
    """Random inputs for ``model``: symbolic dims containing "seq" get ``seq``, others ``batch``."""
    rng = np.random.default_rng(123)
    feeds: dict[str, np.ndarray] = {}
    for inp in model.graph.input:
        ttype = inp.type.tensor_type
        shape = [
            d.dim_value if d.HasField("dim_value") else (seq if "seq" in d.dim_param else batch)
            for d in ttype.shape.dim
        ]
        if ttype.elem_type == onnx.TensorProto.INT64:
            arr = rng.integers(0, 50, shape, dtype=np.int64)
            if inp.name == "attention_mask":
                arr = np.ones(shape, np.int64)
                arr[1:, -2:] = 0  # pad the tail of every row but the first
            feeds[inp.name] = arr
        else:
            assert ttype.elem_type == onnx.TensorProto.FLOAT
            feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _check_structure(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 17)}
    names = [n.name for n in model.graph.node]
    assert all(names), "every node needs a non-empty name"
    assert len(set(names)) == len(names), "node names must be unique"
    for init in model.graph.initializer:
        assert init.data_location != onnx.TensorProto.EXTERNAL
        assert init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64)


def _nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in model.graph.node}


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def test_registry() -> None:
    assert set(GOLDEN) >= {*HAND_BUILT, "transformer"}


def test_import_does_not_need_torch() -> None:
    code = "import sys, models; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", HAND_BUILT)
def test_hand_built_valid_and_deterministic(name: str) -> None:
    build: Callable[..., onnx.ModelProto] = GOLDEN[name]
    a, b, c = build(seed=0), build(seed=0), build(seed=1)
    for m in (a, b, c):
        _check_structure(m)
    assert a.SerializeToString() == b.SerializeToString()
    feeds = _feeds(a)
    out_a, out_b, out_c = _run(a, feeds), _run(b, feeds), _run(c, feeds)
    for x, y, z in zip(out_a, out_b, out_c, strict=True):
        assert np.all(np.isfinite(x))
        np.testing.assert_array_equal(x, y)
        assert not np.allclose(x, z)


def test_mlp_symbolic_batch_and_options() -> None:
    m = GOLDEN["mlp"](hidden=(16, 24, 8), in_features=12, out_features=5, batch="B")
    _check_structure(m)
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "B"
    ops = [n.op_type for n in m.graph.node]
    assert ops == ["MatMul", "Add", "Relu"] * 3 + ["Gemm"]
    for batch in (1, 7):
        (y,) = _run(m, {"x": np.ones((batch, 12), np.float32)})
        assert y.shape == (batch, 5)


def test_cnn_structure() -> None:
    nodes = _nodes(GOLDEN["cnn"]())
    convs = {k: n for k, n in nodes.items() if n.op_type == "Conv"}
    assert _attr(convs["dw_conv"], "group") == 32
    assert _attr(convs["grp_conv"], "group") == 4
    assert sum(n.op_type == "BatchNormalization" for n in nodes.values()) == 4
    assert nodes["br_concat"].op_type == "Concat" and nodes["res_add"].op_type == "Add"
    assert _attr(nodes["head_gemm"], "transB") == 1


def test_gemm_flavours() -> None:
    m = GOLDEN["gemm_transb"]()
    nodes = _nodes(m)
    inits = {i.name: list(i.dims) for i in m.graph.initializer}
    assert _attr(nodes["gemm_transb"], "transB") == 1 and inits["g1.weight"] == [48, 64]
    assert _attr(nodes["gemm_plain"], "transB", 0) == 0 and inits["g2.weight"] == [48, 24]
    assert _attr(nodes["gemm_transa"], "transA") == 1
    assert nodes["gemm_transa"].input[0] == nodes["transpose_a"].output[0]
    k = inits["g4.weight"][1]
    assert k % 4 == 0 and k % 8 != 0


def test_weight_paths_named_nodes() -> None:
    m = GOLDEN["weight_paths"]()
    nodes = _nodes(m)
    inits = {i.name for i in m.graph.initializer}
    assert nodes["mm_identity"].input[1] == nodes["identity_w"].output[0]
    assert nodes["mm_constant"].input[1] == nodes["const_w"].output[0]
    assert nodes["mm_transpose"].input[1] == nodes["transpose_w"].output[0]
    assert nodes["mm_shared_a"].input[1] == nodes["mm_shared_b"].input[1] == "w_shared"
    assert nodes["mm_left"].input[0] in inits
    assert nodes["gather_tied"].input[0] == nodes["transpose_tied"].input[0] == "emb"
    assert nodes["mm_tied"].input[1] == nodes["transpose_tied"].output[0]


def test_example_file_matches_builder() -> None:
    path = example_path()
    assert path.is_file()
    assert path.stat().st_size < 300_000
    assert path.read_bytes() == build_example().SerializeToString()
    m = onnx.load(str(path))
    eligible = [
        n
        for n in m.graph.node
        if n.op_type == "Conv"
        and _attr(n, "group", 1) == 1
        and next(i for i in m.graph.initializer if i.name == n.input[1]).dims[1] % 4 == 0
    ]
    assert len(eligible) >= 2
    stem = next(i for i in m.graph.initializer if i.name == "stem_conv.weight")
    assert stem.dims[1] == 3


_TRANSFORMERS: dict[tuple[str, int], onnx.ModelProto] = {}


def _transformer(exporter: str, seed: int = 0) -> onnx.ModelProto:
    key = (exporter, seed)
    if key not in _TRANSFORMERS:
        _TRANSFORMERS[key] = GOLDEN["transformer"](seed=seed, exporter=exporter)
    return _TRANSFORMERS[key]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_transformer_valid_dynamic_and_deterministic(exporter: str) -> None:
    pytest.importorskip("torch")
    m = _transformer(exporter)
    _check_structure(m)
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in m.graph.output] == ["last_hidden_state"]
    for batch, seq in ((1, 5), (3, 11), (3, 4)):
        (y,) = _run(m, _feeds(m, batch=batch, seq=seq))
        assert y.shape == (batch, seq, 64) and np.all(np.isfinite(y))
    feeds = _feeds(m, batch=3, seq=6)
    again = GOLDEN["transformer"](seed=0, exporter=exporter)
    np.testing.assert_array_equal(_run(m, feeds)[0], _run(again, feeds)[0])
    assert not np.allclose(_run(m, feeds)[0], _run(_transformer(exporter, 1), feeds)[0])


def test_transformer_exporters_agree_and_mask_works() -> None:
    pytest.importorskip("torch")
    dyn, ts = _transformer("dynamo"), _transformer("torchscript")
    feeds = _feeds(dyn, batch=3, seq=7)
    (y_dyn,), (y_ts,) = _run(dyn, feeds), _run(ts, feeds)
    np.testing.assert_allclose(y_dyn, y_ts, rtol=1e-4, atol=1e-4)
    # Masked (padded) tail tokens must not influence the unpadded positions.
    short = {k: v[1:, :-2] for k, v in feeds.items()}
    (y_short,) = _run(dyn, short)
    np.testing.assert_allclose(y_short, y_dyn[1:, :-2], rtol=1e-4, atol=1e-4)
