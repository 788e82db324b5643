"""Decoder LLMs with a KV cache (Llama-style GQA/RoPE/RMSNorm/SiLU-gated MLP, GPT-2-style fused QKV):
calibration fills the empty cache, mask and positions; the LM head and embeddings stay dense; heads are
refused (cache shapes); gated FFN neurons go; verification reports greedy next-token agreement."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import sparsec
from models.decoders import VOCAB, build_decoder, build_gqa_op_decoder, decoder_module
from sparsec.errors import SparsecError
from sparsec.runtime.calib_data import input_specs, open_calibration
from sparsec.runtime.kv_cache import plan_cache_fill
from sparsec.runtime.next_token import agreement

PROJECTIONS = 14  # 2 layers x (q, k, v, o, gate, up, down)


@pytest.fixture(scope="session")
def decoders(tmp_path_factory):
    """Exports cached once per test session: (kind, exporter) -> path."""
    root = tmp_path_factory.mktemp("decoders")
    out = {}
    for key in (("llama", "dynamo"), ("llama", "torchscript"), ("gpt2", "torchscript")):
        out[key] = root / f"{key[0]}_{key[1]}.onnx"
        onnx.save(build_decoder(*key), out[key])
    return out


def _prompt_feed(path, ids):
    """A prompt as generation's first step feeds it: empty cache, mask of ones, positions 0..S-1."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {}
    for arg in session.get_inputs():
        if arg.name == "input_ids":
            feed[arg.name] = ids
        elif arg.name == "attention_mask":
            feed[arg.name] = np.ones_like(ids)
        elif arg.name == "position_ids":
            feed[arg.name] = np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1))
        else:
            feed[arg.name] = np.zeros((ids.shape[0], arg.shape[1], 0, arg.shape[3]), np.float32)
    return session, feed


@pytest.mark.parametrize("key", [("llama", "dynamo"), ("gpt2", "torchscript")])
def test_exports_match_torch_on_an_empty_cache(decoders, key):
    import torch

    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 5))
    session, feed = _prompt_feed(decoders[key], ids)
    logits, *presents = session.run(None, feed)
    with torch.no_grad():
        ref = decoder_module(key[0])(*[torch.from_numpy(feed[a.name]) for a in session.get_inputs()])
    np.testing.assert_allclose(logits, ref[0].numpy(), atol=1e-4, rtol=1e-4)
    assert logits.shape == (2, 5, VOCAB) and presents[0].shape[2] == 5


def test_nm_random_verify_fills_cache_and_keeps_lm_head_dense(decoders, tmp_path):
    report = sparsec.compile(decoders["llama", "dynamo"], output=tmp_path / "out", nm="2:4",
                             shapes={"input_ids": (2, 8)}, calib_range={"input_ids": (0, VOCAB)})
    pruned = [la for la in report.layers if la.pattern == "2:4"]
    assert len(pruned) == PROJECTIONS
    reasons = {s["name"]: s["reason"] for s in report.as_dict()["skipped"]}
    assert sum("LM head (writes logits)" in r for r in reasons.values()) == 1
    assert sum("embedding table" in r for r in reasons.values()) == 1
    v = report.verify
    assert "empty KV cache (past length 0) for 4 inputs" in v["source"] and "position_ids" in v["source"]
    assert v["inputs"]["past_key_values.0.key"] == [2, 2, 0, 16] and v["inputs"]["attention_mask"] == [2, 8]
    tok = v["next_token"]
    assert tok["output"] == "logits" and tok["sequences"] == 2 and tok["positions"] == 16
    assert 0.0 <= tok["all_positions"] <= 1.0 and 0.5 < min(o["cosine"] for o in v["outputs"]) < 1.0
    again = sparsec.compile(decoders["llama", "dynamo"], output=tmp_path / "head", nm="2:4",
                            prune_lm_head=True, shapes={"input_ids": (2, 8)},
                            calib_range={"input_ids": (0, VOCAB)})
    assert sum(la.pattern == "2:4" for la in again.layers) == PROJECTIONS + 1


@pytest.mark.parametrize("key,method", [(("gpt2", "torchscript"), "wanda"),
                                        (("llama", "dynamo"), "sparsegpt")])
def test_calibration_from_token_ids_only(decoders, tmp_path, key, method):
    calib = tmp_path / "ids.npz"
    np.savez(calib, input_ids=np.random.default_rng(1).integers(0, VOCAB, (6, 12)))
    report = sparsec.compile(decoders[key], output=tmp_path / "out", nm="2:4", method=method,
                             calib=str(calib))
    pruned = [la for la in report.layers if la.pattern == "2:4"]
    assert len(pruned) == (8 if key[0] == "gpt2" else PROJECTIONS)
    assert all(la.method == method and la.calib_samples == 6 and 0 < la.rel_error < 1 for la in pruned)
    assert report.verify["next_token"]["sequences"] == 6
    assert min(o["cosine"] for o in report.verify["outputs"]) > 0.8


def test_fill_positions_follow_a_padded_mask():
    specs = input_specs(onnx.load(str(_tiny_decoder_path())))
    fill = plan_cache_fill(specs)
    assert fill is not None and fill.names == {"past.0.key", "attention_mask", "position_ids"}
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]], np.int64)
    out = fill.fill({"input_ids": np.zeros((2, 4), np.int64), "attention_mask": mask})
    np.testing.assert_array_equal(out["position_ids"], [[0, 0, 0, 1], [0, 1, 2, 3]])
    assert out["past.0.key"].shape == (2, 2, 0, 8)


def test_reader_with_token_ids_only_is_filled():
    specs = input_specs(onnx.load(str(_tiny_decoder_path())))

    class Reader:
        def __init__(self):
            self.feeds = [{"input_ids": np.ones((1, 3), np.int64)}, {"input_ids": np.ones((1, 3), np.int64)}]

        def get_next(self):
            return self.feeds.pop() if self.feeds else None

    data = open_calibration(specs, reader=Reader())
    (batch,) = list(data.batches(8))
    assert batch["past.0.key"].shape == (2, 2, 0, 8) and batch["attention_mask"].shape == (2, 3)
    assert data.num_samples == 2


def _tiny_decoder_path():
    """input_ids [B, S], attention_mask [B, T], position_ids [B, S], past.0.key [B, 2, P, 8] (names only)."""
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["B", "S"]),
              helper.make_tensor_value_info("past.0.key", TensorProto.FLOAT, ["B", 2, "P", 8])]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Identity", ["past.0.key"], ["y"])], "tiny", inputs, [out])
    import tempfile

    path = tempfile.mkdtemp() + "/tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_heads_refused_on_a_kv_cache_decoder(decoders, tmp_path):
    with pytest.raises(SparsecError, match=r"heads on a decoder with a KV cache \(past_key_values.0.key"):
        sparsec.compile(decoders["llama", "torchscript"], output=tmp_path / "out", heads=0.25)
    assert not (tmp_path / "out").exists()


def test_gated_ffn_neurons_removed_exactly(decoders, tmp_path):
    report = sparsec.compile(decoders["llama", "torchscript"], output=tmp_path / "out", ffn=0.25, round_to=1,
                             shapes={"input_ids": (2, 8)}, calib_range={"input_ids": (0, VOCAB)})
    assert report.nothing_pruned is None
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    widths = {}
    for node in model.graph.node:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            if node.op_type == "MatMul" and node.name.endswith(f"/{proj}/MatMul"):
                w = next(t for t in model.graph.initializer if t.name == node.input[1])
                widths.setdefault(node.name.split("/mlp/")[0], {})[proj] = tuple(w.dims)
    assert len(widths) == 2 and sum(w["gate_proj"][1] for w in widths.values()) == 256 - 64
    for w in widths.values():  # neuron i leaves gate's and up's columns and down's rows together
        assert w["gate_proj"][1] == w["up_proj"][1] == w["down_proj"][0] < 128, widths
    assert report.verify["masked"]["max_abs_diff"] < 1e-5
    step = next(s for s in report.as_dict()["steps"] if s["name"] == "transformer")
    assert report.channels["removed"] == 64 and "64 FFN channels" in step["plan"], step  # not gate + up


def test_gpt2_conv1d_ffn_neurons_removed_through_its_views(decoders, tmp_path):
    """GPT-2's Conv1D views (`view(-1, nx)` → Gemm → `view(size_out)`) pass the FFN neurons through."""
    report = sparsec.compile(decoders["gpt2", "torchscript"], output=tmp_path / "out", ffn=0.25, round_to=1,
                             shapes={"input_ids": (2, 8)}, calib_range={"input_ids": (0, VOCAB)})
    assert report.nothing_pruned is None and report.channels["removed"] == 128
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    gemms = {n.name: tuple(inits[n.input[1]].dims) for n in model.graph.node if n.op_type == "Gemm"}
    fc = [w[1] for name, w in sorted(gemms.items()) if "/mlp/c_fc/" in name]
    proj = [w[0] for name, w in sorted(gemms.items()) if "/mlp/c_proj/" in name]
    assert fc == proj and sum(fc) == 512 - 128 and max(fc) < 256, gemms
    assert report.verify["masked"]["max_abs_diff"] < 1e-5


def test_greedy_agreement_counts_last_and_all_positions():
    dense = np.zeros((2, 3, 4), np.float32)
    dense[..., 1] = 1.0
    other = dense.copy()
    other[0, 2, 3] = 2.0  # last position of sequence 0 now picks token 3
    other[1, 0, 2] = 2.0  # first position of sequence 1 picks token 2
    got = agreement("logits", [dense], [other])
    assert got["last_position"] == pytest.approx(0.5) and got["all_positions"] == pytest.approx(4 / 6)


def test_group_query_attention_op_projections_pruned_heads_refused(tmp_path):
    path = tmp_path / "gqa.onnx"
    onnx.save(build_gqa_op_decoder(), path)
    report = sparsec.compile(path, output=tmp_path / "out", nm="2:4", shapes={"input_ids": (2, 8)},
                             calib_range={"input_ids": (0, VOCAB)})
    assert sorted(la.name for la in report.layers if la.pattern == "2:4") == ["k_proj", "o_proj", "q_proj",
                                                                             "v_proj"]
    assert next(la for la in report.layers if la.name == "lm_head").pattern == "dense"
    assert report.verify["inputs"]["past_key_values.0.key"] == [2, 2, 0, 16]
    assert 0.5 < report.verify["outputs"][0]["cosine"] < 1.0
    with pytest.raises(SparsecError, match="heads on a decoder with a KV cache"):
        sparsec.compile(path, output=tmp_path / "heads", heads=0.5)
