"""--precision: the N:M pattern survives conversion, verify reports the drift or says why not."""

import numpy as np
import onnx
from onnx import numpy_helper

import sparsec
from models import GOLDEN, example_path
from sparsec.core.graph_index import to_effective
from sparsec.core.layers import find_layers
from sparsec.weights.masks import satisfies_nm


def test_fp16_output_keeps_pattern_and_reports_drift(tmp_path):
    report = sparsec.compile(example_path(), nm="2:4", output=tmp_path / "o", precision="fp16")
    model = onnx.load(tmp_path / "o" / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: t for t in model.graph.initializer}
    pruned = [e for e in report.layers if e.skipped_reason is None]
    assert len(pruned) == 4
    for e in pruned:
        w = numpy_helper.to_array(inits[e.weight])
        assert w.dtype == np.float16
        assert satisfies_nm(w, 2, 4, e.reduction_axis)
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.FLOAT]
    drift = report.verify["precision_drift"]
    assert 0 < drift["max_abs_diff"] < 1e-2  # fp16 rounding only, on outputs of magnitude ~1
    assert report.verify["max_abs_diff"] > drift["max_abs_diff"]  # pruning moves outputs more
    assert [p["name"] for p in report.passes] == ["prune-weights", "precision", "check-pattern"]
    assert "--sparsity=enable" in report.tensorrt["commands"]["trtexec"]


def test_bf16_is_written_and_verify_says_why_it_cannot_run(tmp_path):
    report = sparsec.compile(example_path(), nm="2:4", output=tmp_path / "o", precision="bf16")
    assert "not runnable on onnxruntime CPU" in report.verify["skipped"]
    model = onnx.load(tmp_path / "o" / "model.onnx")
    analysis = find_layers(model)
    gemm = next(la for la in analysis.layers if la.op == "Gemm")
    w = numpy_helper.to_array(model.graph.initializer[[t.name for t in model.graph.initializer]
                                                       .index(gemm.weight)])
    assert str(w.dtype) == "bfloat16"
    assert satisfies_nm(to_effective(w.astype(np.float32), gemm.source.steps), 2, 4, 1)


def test_fp16_transformer_compiles_and_runs(tmp_path, transformer_models):
    src = tmp_path / "t.onnx"
    onnx.save(transformer_models["dynamo"], src)
    report = sparsec.compile(src, nm="2:4", output=tmp_path / "o", precision="fp16",
                             min_params=0, shapes={"input_ids": (2, 6), "attention_mask": (2, 6)})
    assert report.totals["layers_pruned"] == 12
    assert report.verify["precision_drift"]["max_abs_diff"] < 5e-2


def test_unstructured_fp32_has_weakly_typed_fallback_command(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(GOLDEN["mlp"](), src)
    report = sparsec.compile(src, sparsity=0.5, output=tmp_path / "o", min_params=0)
    assert "--fp16" in report.tensorrt["commands"]["trtexec_weakly_typed_fp16"]
    assert "precision_drift" not in report.verify
