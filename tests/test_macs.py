"""MAC counts: hand-computed for the example model, and an independent count from
onnxruntime's actual activation shapes for every golden model."""

import math

import numpy as np
import onnx
import pytest
from helpers import random_feeds, run

import sparsec
from models import GOLDEN, example_path


def test_example_macs_by_hand():
    report = sparsec.inspect(example_path())
    macs = {e.name: e.macs for e in report.layers}
    # Conv: M·(C/g)·R·S·E·F per sample (32×32 input; conv1 and conv3 have stride 2)
    assert macs["stem_conv"] == 16 * 3 * 3 * 3 * 32 * 32
    assert macs["conv1"] == 32 * 16 * 3 * 3 * 16 * 16
    assert macs["conv2"] == 32 * 32 * 3 * 3 * 16 * 16
    assert macs["conv3"] == 64 * 32 * 3 * 3 * 8 * 8
    assert macs["fc"] == 1 * 64 * 10  # Gemm: rows·K·N
    assert report.totals["macs"] == sum(macs.values())


def independent_macs(model: onnx.ModelProto, shapes: dict) -> int:
    """Expose every layer's input and output, read real shapes from onnxruntime."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    inits = {t.name: t for t in probe.graph.initializer}
    const_nodes = {n.output[0]: n for n in probe.graph.node if n.op_type == "Constant"}
    wanted = []
    for node in probe.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            wanted += [node.input[0], node.input[1], node.output[0]]
    existing = {o.name for o in probe.graph.output}
    for name in dict.fromkeys(wanted):
        if name not in existing and name not in inits and name not in const_nodes:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    sess_out = [o.name for o in probe.graph.output]
    values = dict(zip(sess_out, run(probe, random_feeds(model, shapes)), strict=True))
    for name, t in inits.items():
        values[name] = np.empty(tuple(t.dims))
    for name, n in const_nodes.items():
        values[name] = np.empty(tuple(n.attribute[0].t.dims))
    total = 0
    for node in probe.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        a, b, y = (values.get(n) for n in (node.input[0], node.input[1], node.output[0]))
        if node.op_type == "Conv":
            total += y.shape[0] * math.prod(y.shape[2:]) * b.size
        elif node.op_type == "Gemm":
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            k = a.shape[0] if trans_a else a.shape[1]
            total += y.shape[0] * k * y.shape[1]
        elif node.op_type == "MatMul" and (node.input[1] in inits or node.input[0] in inits
                                           or node.input[1] in const_nodes):
            k = a.shape[-1]
            total += math.prod(y.shape) * k
    return total


@pytest.mark.parametrize(("name", "shapes"), [
    ("mlp", {"x": (5, 32)}),
    ("cnn", {"image": (1, 3, 32, 32)}),
    ("gemm_transb", {"x": (4, 64)}),
])
def test_dense_totals_match_independent_count(tmp_path, name, shapes):
    model = GOLDEN[name]()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    report = sparsec.inspect(path, shapes=shapes)
    assert report.totals["macs_unknown_layers"] == 0
    assert report.totals["macs"] == independent_macs(model, shapes)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize(("batch", "seq"), [(2, 9), (1, 5)])
def test_transformer_macs_match_independent_count(tmp_path, transformer_models, exporter, batch, seq):
    model = transformer_models[exporter]
    path = tmp_path / "t.onnx"
    onnx.save(model, path)
    shapes = {"input_ids": (batch, seq), "attention_mask": (batch, seq)}
    report = sparsec.inspect(path, shapes=shapes)
    assert report.totals["macs_unknown_layers"] == 0
    assert report.totals["macs"] == independent_macs(model, shapes)
    # B·L·(4E² + 2·E·F) for the linear layers of 2 layers
    assert report.totals["macs"] == 2 * (batch * seq * (4 * 64 * 64 + 2 * 64 * 128))


def test_nonzero_macs_scale_with_kept_fraction(tmp_path):
    report = sparsec.compile(example_path(), nm="2:4", output=tmp_path / "o", verify=False)
    for e in report.layers:
        assert e.macs_nonzero == round(e.macs_dense * e.nonzeros / e.params)
    assert report.totals["macs_nonzero"] < report.totals["macs_dense"]
