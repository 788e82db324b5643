"""Attention as real exporters write it (issue 9, classes 4 and 5).

TorchScript BERT/ViT (the context also feeds `Shape`), fused QKV (one [E, 3E] MatMul split into
thirds), exporters' deduplicated zero biases, the real token count of an image transformer, and
token pruning of a model whose extra output reads only the CLS token.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import sparsec
from models.attention_exports import (
    build_fused_qkv,
    build_hf_bert,
    build_hf_bert_mean_pool,
    build_hf_vit,
    build_legacy_bert,
    build_opset7_block,
)
from sparsec.errors import SparsecError
from sparsec.transformer.attention import find_attention

TOKENS = {"tokens": (2, 10, 64)}
IDS = {"input_ids": (2, 12), "attention_mask": (2, 12)}


def compile_saved(tmp_path, model, shapes, **kwargs):
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    report = sparsec.compile(src, output=tmp_path / "o", min_params=0, shapes=shapes, **kwargs)
    return report, str(tmp_path / "o" / "model.onnx")


def run(path, feeds):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.fixture(scope="module")
def legacy():
    return build_legacy_bert(exporter="torchscript")


@pytest.fixture(scope="module", params=["torchscript", "dynamo"])
def fused(request):
    return build_fused_qkv(exporter=request.param)


@pytest.fixture(scope="module")
def bert():
    return {e: build_hf_bert(exporter=e) for e in ("torchscript", "dynamo")}


def test_context_read_by_shape_is_matched_and_pruned(tmp_path, legacy):
    context_shapes = [n for n in legacy.graph.node if n.op_type == "Shape" and "Transpose_3" in n.input[0]]
    assert len(context_shapes) == 4  # the failure class: context.size()[:-2] feeds Shape
    analysis = find_attention(legacy)
    assert [(b.heads, b.head_dim) for b in analysis.blocks] == [(4, 16)] * 2 and not analysis.unexplained
    report, path = compile_saved(tmp_path, legacy, TOKENS, heads=0.5)
    assert report.verify["masked"]["max_abs_diff"] < 1e-5
    assert sum(b["heads_after"] for b in report.transformer["blocks"]) == 4
    x = np.random.default_rng(1).standard_normal((3, 7, 64)).astype(np.float32)
    assert run(path, {"tokens": x})[0].shape == (3, 7, 64)


def test_fused_qkv_thirds_are_cut_alike(tmp_path, fused):
    analysis = find_attention(fused)
    assert [(b.heads, b.kv_heads, b.head_dim) for b in analysis.blocks] == [(4, 4, 16)] * 2
    for b in analysis.blocks:
        assert b.q.weight == b.k.weight == b.v.weight
        assert (b.q.part, b.k.part, b.v.part) == ((0, 3), (1, 3), (2, 3))
    report, path = compile_saved(tmp_path, fused, TOKENS, heads_per_layer=3)
    assert report.verify["masked"]["max_abs_diff"] < 1e-5
    assert report.verify["max_abs_diff"] > 1e-3
    pruned = onnx.load(path)
    qkv = {tuple(t.dims) for t in pruned.graph.initializer if len(t.dims) == 2}
    assert (64, 144) in qkv and (48, 64) in qkv and (64, 192) not in qkv
    x = np.random.default_rng(1).standard_normal((3, 7, 64)).astype(np.float32)
    assert run(path, {"tokens": x})[0].shape == (3, 7, 64)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_shared_zero_bias_gets_its_own_cut_copy(tmp_path, bert, exporter):
    """Exporters dedupe equal initializers (fresh zero biases): cutting one in place broke its readers."""
    report, path = compile_saved(tmp_path, bert[exporter], IDS, heads=0.5)
    assert report.verify["masked"]["max_abs_diff"] < 1e-5
    onnx.checker.check_model(onnx.load(path), full_check=True)


def test_ffn_report_uses_the_token_count_of_an_image_transformer(tmp_path):
    vit = build_hf_vit(exporter="torchscript")
    report, _ = compile_saved(tmp_path, vit, {"pixel_values": (2, 3, 32, 32)}, ffn=0.25)
    t = report.transformer
    assert [b["ffn_before"] for b in t["blocks"]] == [128, 128]
    assert all(b["ffn_after"] < 128 for b in t["blocks"])
    seq = 17  # (32 / 8)² patches + CLS, not the 3 image channels
    assert t["cost_model"]["seq"] == seq and t["cost_model"]["batch"] == 2
    assert t["cost_model"]["before"] == 2 * (2 * seq * (4 * 64 * 64 + 2 * 64 * 128) + 2 * 2 * seq * seq * 64)
    assert report.verify["masked"]["max_abs_diff"] < 1e-5


def test_tokens_with_a_cls_pooler_output(tmp_path, bert):
    model = bert["torchscript"]
    report, path = compile_saved(tmp_path, model, IDS, tokens=0.5, tokens_from=1)
    assert [b["tokens_after"] for b in report.transformer["blocks"]] == [12, 6]
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    w, b = weights["bert.pooler.dense.weight"], weights.get("bert.pooler.dense.bias", 0.0)
    feeds = {"input_ids": np.random.default_rng(2).integers(0, 100, (3, 9)).astype(np.int64),
             "attention_mask": np.ones((3, 9), np.int64)}
    hidden, pooled = run(path, feeds)
    assert hidden.shape == (3, 9, 64) and pooled.shape == (3, 64)
    np.testing.assert_allclose(pooled, np.tanh(hidden[:, 0] @ w.T + b), atol=1e-5)
    dense_report, _ = compile_saved(tmp_path / "keep", model, IDS, tokens=1.0, tokens_from=1)
    assert dense_report.verify["max_abs_diff"] == 0.0


def test_tokens_refuse_an_output_reading_every_token(tmp_path, legacy):
    """A mean over the last layer's kept tokens (not over a scattered output) would change: refused."""
    model = onnx.ModelProto()
    model.CopyFrom(legacy)
    residual = next(n for n in model.graph.node if "out" in n.output).input[0]  # the last LayerNorm's input
    mean = helper.make_node("ReduceMean", [residual], ["mean"], name="mean", axes=[1], keepdims=0)
    model.graph.node.append(mean)
    model.graph.output.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["batch", 64]))
    with pytest.raises(SparsecError, match="output mean .*reads the kept tokens"):
        compile_saved(tmp_path, model, TOKENS, tokens=0.5, tokens_from=1)


def test_tokens_with_in_graph_mean_pooling(tmp_path):
    """Mean pooling of the scattered token embeddings reads the whole attention_mask, not the gathered."""
    model = build_hf_bert_mean_pool(exporter="torchscript")
    report, path = compile_saved(tmp_path, model, IDS, tokens=0.7, tokens_from=1)
    assert [b["tokens_after"] for b in report.transformer["blocks"]] == [12, 9]
    mask = np.ones((3, 9), np.int64)
    mask[1, 6:] = 0  # padding
    feeds = {"input_ids": np.random.default_rng(2).integers(0, 100, (3, 9)).astype(np.int64),
             "attention_mask": mask}
    tokens, pooled = run(path, feeds)
    assert tokens.shape == (3, 9, 64) and pooled.shape == (3, 64)
    expected = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(pooled, expected, atol=1e-5)
    dense_report, dense_path = compile_saved(tmp_path / "keep", model, IDS, tokens=1.0, tokens_from=1)
    assert dense_report.verify["max_abs_diff"] == 0.0
    src = str(tmp_path / "keep" / "m.onnx")
    for got, want in zip(run(dense_path, feeds), run(src, feeds), strict=True):
        np.testing.assert_array_equal(got, want)


def test_ffn_found_where_shape_inference_gives_no_ranks(tmp_path):
    """Opset 7, Reshape targets through Identity: inference stops, the ranks come from onnxruntime."""
    from sparsec.core.shapes import infer_dims

    model = build_opset7_block()
    assert "fc1" not in infer_dims(model, {"x": (2, 10, 32)})  # the failure class: no rank after a Reshape
    report, path = compile_saved(tmp_path, model, {"x": (2, 10, 32)}, ffn=0.25)
    assert [(b["ffn_before"], b["ffn_after"]) for b in report.transformer["blocks"]] == [(64, 48)]
    assert report.verify["masked"]["max_abs_diff"] < 1e-5 and report.verify["max_abs_diff"] > 1e-3
    weights = {t.name: tuple(t.dims) for t in onnx.load(path).graph.initializer}
    assert weights["fc1.w"] == (32, 48) and weights["fc2.w"] == (48, 32)
    x = np.random.default_rng(1).standard_normal((3, 7, 32)).astype(np.float32)
    assert run(path, {"x": x})[0].shape == (3, 7, 32)


def test_tokens_refuse_an_intermediate_hidden_state_output(tmp_path):
    """A later layer reading a [B, L, E] graph output would run on all tokens again: refused, not faked."""
    model = build_legacy_bert(exporter="torchscript", layers=3)
    middle = [n for n in model.graph.node if n.op_type == "LayerNormalization"][1].output[0]
    model.graph.output.append(helper.make_tensor_value_info(middle, TensorProto.FLOAT, ["batch", "seq", 64]))
    with pytest.raises(SparsecError, match="reads a hidden state that is also"):
        compile_saved(tmp_path, model, TOKENS, tokens=0.5, tokens_from=1)


@pytest.fixture(scope="module")
def vit3():
    from models.attention_exports import hf_vit_module

    module = hf_vit_module(layers=3)
    return module, {e: build_hf_vit(exporter=e, layers=3) for e in ("torchscript", "dynamo")}


def _vit_tokens_reference(module, x: np.ndarray, keep: float):
    """Independent torch reference: layer 1's probabilities (mean over heads and queries, CLS kept) pick
    the tokens, layers 2.. run on them, the final LayerNorm follows; also the residual state at the cut."""
    import torch

    vit = module.vit
    with torch.no_grad():
        h = vit.embeddings(torch.from_numpy(x))
        _, probs = vit.layers[0].attention(vit.layers[0].layernorm_before(h), None)
        h = vit.layers[0](h, None)
        score = probs.mean(dim=(1, 2))
        score[:, 0] += 1e9
        k = int(np.ceil(keep * h.shape[1]))
        idx = score.topk(k, dim=1).indices.sort(dim=1).values
        kept = torch.gather(h, 1, idx[..., None].expand(-1, -1, h.shape[2]))
        for layer in vit.layers[1:]:
            kept = layer(kept, None)
        return idx.numpy(), vit.layernorm(kept).numpy(), h.numpy()


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_tokens_on_hf_vit_match_a_torch_reference(tmp_path, vit3, exporter):
    """Pre-norm ViT: the late residual Adds read the stream before layernorm_before (the cut moves up to
    it); dynamo bakes 17 into Reshape targets and builds a constant [B, 1, 17, 17] bias (both follow k)."""
    module, models = vit3
    shapes = {"pixel_values": (2, 3, 32, 32)}
    report, path = compile_saved(tmp_path, models[exporter], shapes, tokens=0.5, tokens_from=1)
    assert [b["tokens_after"] for b in report.transformer["blocks"]] == [17, 9, 9]
    x = np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype(np.float32)
    (out,) = run(path, {"pixel_values": x})
    idx, want, cut = _vit_tokens_reference(module, x, 0.5)
    assert out.shape == (3, 17, 64)
    for b in range(3):
        np.testing.assert_allclose(out[b, idx[b]], want[b], atol=1e-4, rtol=1e-4)
        pruned = np.setdiff1d(np.arange(17), idx[b])
        np.testing.assert_allclose(out[b, pruned], cut[b, pruned], atol=1e-5)  # the state at the cut
    dense_report, dense_path = compile_saved(tmp_path / "keep", models[exporter], shapes, tokens=1.0,
                                             tokens_from=1)
    # bit-exact where onnxruntime fuses alike: its optimiser fuses the static-17 dense graph differently
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got, want = (ort.InferenceSession(p, plain, providers=["CPUExecutionProvider"])
                 .run(None, {"pixel_values": x})
                 for p in (dense_path, str(tmp_path / "keep" / "m.onnx")))
    np.testing.assert_array_equal(got[0], want[0])
    assert dense_report.verify["max_abs_diff"] < 1e-5


def _deep_chain_logits(classes: int) -> onnx.ModelProto:
    """PP-OCR rec's shape: a long backbone chain before the attention blocks (2000 nodes), a shortcut from
    it past them and a per-token classifier [B, L, classes] at the end."""
    model = build_legacy_bert(exporter="torchscript")
    chain = [helper.make_node("Relu" if k % 2 else "Neg", [f"chain{k}" if k else "tokens"], [f"chain{k + 1}"],
                              name=f"chain{k}") for k in range(2000)]
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name == "tokens":
                node.input[k] = "chain2000"
    weight = onnx.numpy_helper.from_array(np.ones((64, classes), np.float32) / 64, "head.w")
    model.graph.initializer.append(weight)
    nodes = list(chain) + list(model.graph.node) + [
        helper.make_node("Add", ["out", "chain1000"], ["short"], name="shortcut"),
        helper.make_node("MatMul", ["short", "head.w"], ["logits"], name="head")]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                            ["batch", "seq", classes]))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_tokens_refuse_per_token_logits_after_a_deep_backbone(tmp_path):
    """A 2000-node chain before the cut made the side-input walk recurse past Python's limit; an output of
    per-token logits [B, L, classes] (CTC) reads every kept token and cannot be scattered: refused."""
    with pytest.raises(SparsecError, match="output logits .*reads the kept tokens"):
        compile_saved(tmp_path, _deep_chain_logits(10), TOKENS, tokens=0.5, tokens_from=1)
