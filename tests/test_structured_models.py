"""Tests for the structured-pruning golden models in ``models.structured``."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

pytest.importorskip("torch")

import torch  # noqa: E402

from models import GOLDEN  # noqa: E402
from models.structured import torch_reference  # noqa: E402

#: name -> (BatchNormalization count, op types the model promises)
EXPECTED: dict[str, tuple[int, set[str]]] = {
    "resnet": (6, {"Conv", "BatchNormalization", "Relu", "Add", "GlobalAveragePool", "Flatten", "Gemm"}),
    "resnet_224": (15, {"Conv", "BatchNormalization", "Relu", "MaxPool", "Add", "GlobalAveragePool", "Gemm"}),
    "mobilenetv3": (
        7,
        {"Conv", "BatchNormalization", "HardSwish", "HardSigmoid", "PRelu", "Clip", "LeakyRelu", "Relu"}
        | {"GlobalAveragePool", "Mul", "Add", "Flatten", "Gemm"},
    ),
    "c2f": (9, {"Conv", "BatchNormalization", "Sigmoid", "Mul", "Split", "Add", "Concat", "MaxPool", "Slice"}
            | {"Resize"}),
    "unet": (7, {"Conv", "BatchNormalization", "Relu", "MaxPool", "ConvTranspose", "Concat", "Pad"}),
    "structured_mlp": (1, {"Conv", "BatchNormalization", "Relu", "Flatten", "Gemm", "MatMul", "Add", "Mul"}),
    "reshape_gemm": (1, {"Conv", "BatchNormalization", "Relu", "Reshape", "Gemm", "MatMul", "Add", "Mul"}),
    "grouped": (
        1,
        {"Conv", "BatchNormalization", "Relu", "Sub", "Div", "Add", "AveragePool", "Sigmoid", "Mul"},
    ),
}
NAMES = sorted(EXPECTED)
_CACHE: dict[str, onnx.ModelProto] = {}


def _model(name: str) -> onnx.ModelProto:
    if name not in _CACHE:
        _CACHE[name] = GOLDEN[name]()
    return _CACHE[name]


def _input(model: onnx.ModelProto, batch: int, seed: int = 0) -> np.ndarray:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return np.random.default_rng(seed).standard_normal([batch, *shape]).astype(np.float32)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _ops(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op]


def _producer(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def test_registry_and_torch_free_import() -> None:
    assert set(EXPECTED) <= set(GOLDEN)
    code = "import sys, models.structured; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", NAMES)
def test_structure(name: str) -> None:
    m = _model(name)
    onnx.checker.check_model(m, full_check=True)
    assert {(o.domain, o.version) for o in m.opset_import} == {("", 17)}
    names = [n.name for n in m.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert [i.name for i in m.graph.input] == ["x"] and [o.name for o in m.graph.output] == ["y"]
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    n_bn, promised = EXPECTED[name]
    ops = {n.op_type for n in m.graph.node}
    assert promised <= ops, promised - ops
    assert not ops & {"Constant", "Identity", "Shape", "ConstantOfShape"}, "constants must be folded"
    bns = _ops(m, "BatchNormalization")
    assert len(bns) == n_bn
    inits = _inits(m)
    for bn in bns:  # inference-mode BN with non-trivial running statistics
        assert len(bn.output) == 1 and _attr(bn, "training_mode", 0) == 0
        mean, var = inits[bn.input[3]], inits[bn.input[4]]
        assert np.abs(mean).max() > 0 and not np.allclose(var, 1.0)
    for init in m.graph.initializer:
        assert init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64)


@pytest.mark.parametrize("name", NAMES)
def test_matches_torch_eval(name: str) -> None:
    m = _model(name)
    ref = torch_reference(name)
    assert not ref.training
    for batch in (1, 2):
        x = _input(m, batch)
        y = _run(m, x)
        with torch.no_grad():
            expected = ref(torch.from_numpy(x)).numpy()
        assert y.shape == expected.shape and y.shape[0] == batch and np.all(np.isfinite(y))
        scale = max(1.0, float(np.abs(expected).max()))  # fp32 accumulation error grows with magnitude
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_by_seed(name: str) -> None:
    a, b = _model(name), GOLDEN[name](seed=0)
    assert a.SerializeToString() == b.SerializeToString()
    if name != "resnet_224":  # same code path as "resnet"; saves a slow export
        x = _input(a, 2)
        assert not np.allclose(_run(a, x), _run(GOLDEN[name](seed=1), x))


def test_resnet_strided_shortcut() -> None:
    m = _model("resnet")
    prod, inits = _producer(m), _inits(m)
    shortcut = [
        n for n in _ops(m, "Conv") if _attr(n, "kernel_shape") == [1, 1] and _attr(n, "strides") == [2, 2]
    ]
    assert len(shortcut) == 1 and inits[shortcut[0].input[1]].shape == (32, 16, 1, 1)
    adds = _ops(m, "Add")
    assert len(adds) == 2
    assert all(prod[i].op_type == "BatchNormalization" for i in adds[1].input)
    assert prod[adds[1].input[1]].input[0] == shortcut[0].output[0]
    gemm = _ops(m, "Gemm")[0]
    assert _attr(gemm, "transB") == 1 and prod[gemm.input[0]].op_type == "Flatten"
    assert GOLDEN["resnet"](width=8, input_hw=16).graph.input[0].type.tensor_type.shape.dim[2].dim_value == 16


def test_resnet_224_size() -> None:
    m = _model("resnet_224")
    assert m.ByteSize() < 20_000_000
    assert [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 224, 224]


def test_mobilenetv3_depthwise_and_squeeze_excite() -> None:
    m = _model("mobilenetv3")
    prod, inits = _producer(m), _inits(m)
    dws = [n for n in _ops(m, "Conv") if _attr(n, "group", 1) > 1]
    assert [_attr(n, "group") for n in dws] == [64, 48]
    assert all(inits[n.input[1]].shape[:2] == (_attr(n, "group"), 1) for n in dws)
    for mul in [n for n in _ops(m, "Mul") if prod[n.input[1]].op_type == "HardSigmoid"]:
        chain = [prod[mul.input[1]]]
        while chain[-1].op_type != "GlobalAveragePool":
            chain.append(prod[chain[-1].input[0]])
        assert [n.op_type for n in chain][::-1][:2] == ["GlobalAveragePool", "Conv"]
        assert chain[-1].input[0] == mul.input[0]  # the gate multiplies the pooled feature
    assert len([n for n in _ops(m, "Mul") if prod[n.input[1]].op_type == "HardSigmoid"]) == 2
    (prelu,) = _ops(m, "PRelu")
    assert inits[prelu.input[1]].shape == (48, 1, 1)
    (clip,) = _ops(m, "Clip")
    assert float(inits[clip.input[1]]) == 0.0 and float(inits[clip.input[2]]) == 6.0


def test_c2f_split_concat_slice_resize() -> None:
    m = _model("c2f")
    prod, inits = _producer(m), _inits(m)
    (split,) = _ops(m, "Split")
    assert _attr(split, "axis") == 1 and inits[split.input[1]].tolist() == [16, 16]
    concats = _ops(m, "Concat")
    assert [len(c.input) for c in concats] == [4, 4] and all(_attr(c, "axis") == 1 for c in concats)
    assert concats[0].input[:2] == split.output[:]
    for mul in _ops(m, "Mul"):  # SiLU = x * sigmoid(x)
        assert prod[mul.input[1]].op_type == "Sigmoid" and prod[mul.input[1]].input[0] == mul.input[0]
    (sl,) = _ops(m, "Slice")
    assert inits[sl.input[3]].tolist() == [1] and inits[sl.input[2]].tolist() == [16]
    (resize,) = _ops(m, "Resize")
    assert _attr(resize, "mode") == b"nearest" and inits[resize.input[2]].tolist() == [1, 1, 2, 2]
    assert len(_ops(m, "MaxPool")) == 3 and len(_ops(m, "Add")) == 2


def test_unet_transpose_concat_pad() -> None:
    m = _model("unet")
    prod, inits = _producer(m), _inits(m)
    ups = _ops(m, "ConvTranspose")
    assert len(ups) == 2 and all(len(u.input) == 3 and _attr(u, "strides") == [2, 2] for u in ups)
    for cat in _ops(m, "Concat"):
        assert _attr(cat, "axis") == 1 and prod[cat.input[0]].op_type == "ConvTranspose"
        assert prod[cat.input[1]].op_type == "Relu"  # skip connection
    (pad,) = _ops(m, "Pad")
    assert inits[pad.input[1]].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    out = prod["y"]
    assert out.op_type == "Conv" and inits[out.input[1]].shape == (2, 16, 1, 1)


@pytest.mark.parametrize(("name", "reshape"), [("structured_mlp", "Flatten"), ("reshape_gemm", "Reshape")])
def test_mlp_flatten_gemm(name: str, reshape: str) -> None:
    m = _model(name)
    prod, inits = _producer(m), _inits(m)
    gemm = _ops(m, "Gemm")[0]
    assert prod[gemm.input[0]].op_type == reshape and _attr(gemm, "transB") == 1
    assert inits[gemm.input[1]].shape == (64, 128)
    assert prod[prod[gemm.input[0]].input[0]].op_type == "Relu"  # fed by [N, 8, 4, 4]
    if reshape == "Reshape":
        assert inits[prod[gemm.input[0]].input[1]].tolist() == [-1, 128]
    (mm,) = _ops(m, "MatMul")
    assert inits[mm.input[1]].shape == (64, 32)
    (mul,) = _ops(m, "Mul")
    assert inits[mul.input[1]].shape == (32,)
    assert inits[_ops(m, "Gemm")[1].input[1]].shape == (10, 32)


def test_grouped_per_channel_constants() -> None:
    m = _model("grouped")
    prod, inits = _producer(m), _inits(m)
    (grp,) = [n for n in _ops(m, "Conv") if _attr(n, "group", 1) > 1]
    assert _attr(grp, "group") == 4 and inits[grp.input[1]].shape == (32, 8, 3, 3)
    for op in ("Sub", "Div", "Add"):
        (node,) = _ops(m, op)
        assert inits[node.input[1]].shape == (1, 32, 1, 1)
    muls = _ops(m, "Mul")
    assert prod[muls[0].input[1]].op_type == "Sigmoid"
    assert inits[muls[1].input[1]].shape == (1, 32, 1, 1)
