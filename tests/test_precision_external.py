"""--precision on external-data models: the graph is converted with placeholder weights and each weight
on its own through the TensorStore; the result equals the in-memory conversion, tensor for tensor."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_external_data_modes import save_both

import sparsec
from models import GOLDEN

SHAPES = {"input_ids": (2, 8), "attention_mask": (2, 8)}


def _graph(model: onnx.ModelProto) -> list[tuple]:
    """The op sequence with names, inputs, outputs and non-tensor attributes."""
    return [(n.op_type, n.name, list(n.input), list(n.output),
             sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in n.attribute
                    if a.type != onnx.AttributeProto.TENSOR)) for n in model.graph.node]


def _tensors(model: onnx.ModelProto) -> dict[str, tuple[int, np.ndarray]]:
    from sparsec.core.tensors import iter_tensors

    return {t.name or f"#{i}": (t.data_type, numpy_helper.to_array(t))
            for i, t in enumerate(iter_tensors(model.graph))}


@pytest.mark.parametrize(("name", "precision", "kwargs"), [
    ("mlp", "fp16", {"nm": "2:4"}),
    ("mlp", "bf16", {"nm": "2:4"}),
    ("cnn", "fp16", {"nm": "2:4"}),
    ("transformer", "fp16", {"nm": "2:4"}),
])
def test_external_conversion_equals_in_memory_conversion(tmp_path, name, precision, kwargs):
    inline, external = save_both(GOLDEN[name](), tmp_path)
    shapes = SHAPES if name == "transformer" else None
    a = sparsec.compile(inline, output=tmp_path / "a", shapes=shapes, min_params=0, precision=precision,
                        encode="none", **kwargs)
    b = sparsec.compile(external, output=tmp_path / "b", shapes=shapes, min_params=0, precision=precision,
                        encode="none", **kwargs)
    ma, mb = onnx.load(tmp_path / "a" / "model.onnx"), onnx.load(tmp_path / "b" / "model.onnx")
    assert any(t.data_location == onnx.TensorProto.EXTERNAL
               for t in onnx.load(tmp_path / "b" / "model.onnx", load_external_data=False).graph.initializer)
    assert _graph(ma) == _graph(mb)
    ta, tb = _tensors(ma), _tensors(mb)
    assert ta.keys() == tb.keys()
    low = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}[precision]
    assert sum(dtype == low for dtype, _ in tb.values()) >= 2
    for key, (dtype, values) in ta.items():
        assert tb[key][0] == dtype, key
        raw = values.reshape(-1).view(np.uint8)
        np.testing.assert_array_equal(tb[key][1].reshape(-1).view(np.uint8), raw, err_msg=key)
    if "skipped" in a.verify:  # bf16: onnxruntime CPU has no kernels
        assert "skipped" in b.verify
        return
    assert a.verify["max_abs_diff"] == pytest.approx(b.verify["max_abs_diff"], rel=1e-6, abs=1e-9)
    assert b.verify["precision_drift"]["max_abs_diff"] == pytest.approx(
        a.verify["precision_drift"]["max_abs_diff"], rel=1e-6, abs=1e-9)


def test_precision_pass_never_inlines_external_weights(tmp_path, monkeypatch):
    """Bounded memory: past the drift limit, no inline copy and no materialize of the whole model."""
    import sparsec.core.tensors as tensors
    import sparsec.runtime.precision_pass as precision_pass

    def refuse(*_):
        raise AssertionError("whole model brought into memory")

    monkeypatch.setattr(precision_pass, "DRIFT_LIMIT", 0)  # as for a model over 2 GB
    monkeypatch.setattr(precision_pass, "inline_copy", refuse)
    monkeypatch.setattr(tensors, "inline_copy", refuse)
    monkeypatch.setattr(tensors.TensorStore, "materialize", refuse)
    _, external = save_both(GOLDEN["mlp"](), tmp_path)
    report = sparsec.compile(external, output=tmp_path / "b", min_params=0, nm="2:4", precision="fp16",
                             encode="none")
    assert "over 0 GiB" in report.verify["precision_drift"]["skipped"]
    monkeypatch.undo()
    fp32 = sparsec.compile(external, output=tmp_path / "c", min_params=0, nm="2:4", encode="none")
    scale = max(o["max_abs_dense"] for o in fp32.verify["outputs"])
    assert abs(report.verify["max_abs_diff"] - fp32.verify["max_abs_diff"]) < 2e-2 * scale
    out = onnx.load(tmp_path / "b" / "model.onnx", load_external_data=False)
    lowered = [t for t in out.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    big = [t for t in lowered if np.prod(t.dims) * 2 >= 1024]  # smaller ones are written inline
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)


def test_weight_rounding_equals_the_converter():
    """Each weight is rounded as onnxconverter-common rounds it: clamps at 1e-7 and 1e4, zeros,
    infinities and NaN kept, bit for bit."""
    import warnings

    from onnxconverter_common import float16

    from sparsec.runtime.precision_external import _lower

    rng = np.random.default_rng(0)
    x = (rng.standard_normal(20000) * 10.0 ** rng.integers(-12, 8, 20000)).astype(np.float32)
    x[:12] = [0, -0.0, np.inf, -np.inf, np.nan, 1e-7, -1e-7, 1e4, np.nextafter(np.float32(1e-7), 0),
              1e4 + 1, -1e4 - 1, 3e-8]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        want = float16.convert_np_to_float16(x, 1e-7, 1e4)
    got = _lower(x.reshape(100, 200), "fp16")
    assert got.shape == (100, 200) and got.dtype == np.float16
    np.testing.assert_array_equal(got.reshape(-1).view(np.uint16), want.view(np.uint16))
