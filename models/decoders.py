"""Small random decoder LLMs with a KV cache, exported the way optimum and torch write them.

* ``build_llama`` — a ``transformers`` LlamaForCausalLM: grouped-query attention (fewer K/V heads than
  query heads), rotary embeddings, RMSNorm and a SiLU-gated MLP; inputs ``input_ids``,
  ``attention_mask``, ``position_ids`` and ``past_key_values.N.key/value``.
* ``build_gpt2`` — a GPT2LMHeadModel: fused QKV ``Conv1D``, learned positions, tied LM head; inputs
  ``input_ids``, ``attention_mask`` and the past.
* ``build_gqa_op_decoder`` — one layer with onnxruntime's ``GroupQueryAttention`` contrib op (as
  onnxruntime-genai's builder writes it), built with onnx.helper.

Both output ``logits`` and ``present.N.key/value`` with dynamic batch, sequence and past length (the past
may be empty: a prompt). HF models take their cache as a ``DynamicCache``; the wrapper here takes flat
past tensors, builds the cache and returns flat presents, which is what exporters can trace. Random
weights from a config (no download), exported with ``exporter`` in {"dynamo", "torchscript"}.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import warnings
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from models._common import name_nodes
from models.attention_exports import _export, _seeded

#: the vocabulary of both decoders (``--calib-range input_ids=0,VOCAB``)
VOCAB = 256


def _config(kind: str, layers: int):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import GPT2Config, LlamaConfig

    if kind == "llama":
        return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           attn_implementation="eager", tie_word_embeddings=False)
    return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=128,
                      attn_implementation="eager")


def decoder_module(kind: str = "llama", seed: int = 0, layers: int = 2) -> Any:
    """The seeded torch wrapper: (input_ids, attention_mask[, position_ids], *past) -> (logits, *present)."""
    import torch

    config = _config(kind, layers)
    from transformers import DynamicCache, GPT2LMHeadModel, LlamaForCausalLM

    cls = LlamaForCausalLM if kind == "llama" else GPT2LMHeadModel

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = cls(config)

        def forward(self, input_ids, attention_mask, *rest):
            position_ids, past = (rest[0], rest[1:]) if kind == "llama" else (None, rest)
            cache = DynamicCache(config=config)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=cache, use_cache=True)
            presents = []
            for i in range(layers):
                presents += [out.past_key_values.layers[i].keys, out.past_key_values.layers[i].values]
            return (out.logits, *presents)

    return _seeded(seed, Wrapper)


def io_names(kind: str = "llama", layers: int = 2) -> tuple[list[str], list[str]]:
    """optimum's input and output names."""
    past = [f"past_key_values.{i}.{t}" for i in range(layers) for t in ("key", "value")]
    present = [f"present.{i}.{t}" for i in range(layers) for t in ("key", "value")]
    first = ["input_ids", "attention_mask"] + (["position_ids"] if kind == "llama" else [])
    return first + past, ["logits"] + present


def build_decoder(kind: str = "llama", exporter: str = "dynamo", seed: int = 0,
                  layers: int = 2) -> onnx.ModelProto:
    """Export the decoder with past/present KV I/O (example: batch 2, 3 new tokens after 4 cached)."""
    import torch

    module = decoder_module(kind, seed, layers)
    heads_kv, head_dim = (2, 16) if kind == "llama" else (4, 16)
    b, s, p = 2, 3, 4
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    mask = torch.ones(b, p + s, dtype=torch.int64)
    args: list[Any] = [ids, mask]
    if kind == "llama":
        args.append(torch.arange(p, p + s).unsqueeze(0).expand(b, s).contiguous())
    args += [torch.randn(b, heads_kv, p, head_dim, generator=g) for _ in range(2 * layers)]
    inputs, outputs = io_names(kind, layers)
    dims: dict[str, dict] = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                             "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    for name in inputs[len(inputs) - 2 * layers:]:
        dims[name] = {0: "batch", 2: "past"}
    for name in outputs[1:]:
        dims[name] = {0: "batch", 2: "total"}
    if exporter == "dynamo":
        return _export_dynamo(module, tuple(args), inputs, outputs)
    return _export(module, tuple(args), inputs, outputs, dims, exporter)


def _export_dynamo(module: Any, args: tuple, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    """torch.export with positional dynamic shapes (the past is ``*rest``); Dim.DYNAMIC lets the
    exporter derive total = seq + past itself."""
    import torch
    from torch.export import Dim

    dyn = Dim.DYNAMIC
    shapes = [{0: dyn, 1: dyn}, {0: dyn, 1: dyn}]
    rest = [{0: dyn, 1: dyn} if a.dim() == 2 else {0: dyn, 2: dyn} for a in args[2:]]
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = pathlib.Path(tmp) / "model.onnx"
        torch.onnx.export(module, args, str(path), dynamo=True, external_data=False, verbose=False,
                          input_names=inputs, output_names=outputs, opset_version=18,
                          dynamic_shapes=(*shapes, tuple(rest)))
        model = onnx.load(str(path), load_external_data=True)
    name_nodes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def build_gqa_op_decoder(seed: int = 0, hidden: int = 64, heads: int = 4, kv: int = 2,
                         vocab: int = VOCAB) -> onnx.ModelProto:
    """One decoder layer as onnxruntime-genai writes it: q/k/v MatMuls into com.microsoft
    GroupQueryAttention (num_heads 4, kv_num_heads 2; seqlens_k and total length from attention_mask),
    o_proj, residual and an LM head; optimum's I/O names (onnx.helper, no torch)."""
    rng, d = np.random.default_rng(seed), hidden // heads

    def w(name: str, shape: tuple[int, int]) -> onnx.TensorProto:
        return nh.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)

    inits = [w("emb", (vocab, hidden)), w("wq", (hidden, heads * d)), w("wk", (hidden, kv * d)),
             w("wv", (hidden, kv * d)), w("wo", (heads * d, hidden)), w("head", (hidden, vocab)),
             nh.from_array(np.array([1], np.int64), "one"), nh.from_array(np.array([1], np.int64), "axis1")]
    nodes = [h.make_node("Gather", ["emb", "input_ids"], ["x"], name="embed"),
             h.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
             h.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
             h.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
             h.make_node("ReduceSum", ["attention_mask", "one"], ["len"], name="mask_len", keepdims=0),
             h.make_node("Sub", ["len", "one"], ["len1"], name="len_minus"),
             h.make_node("Cast", ["len1"], ["seqlens_k"], name="seqlens", to=T.INT32),
             h.make_node("Shape", ["attention_mask"], ["mshape"], name="mshape", start=1, end=2),
             h.make_node("Squeeze", ["mshape"], ["total64"], name="total_sq"),
             h.make_node("Cast", ["total64"], ["total"], name="total", to=T.INT32),
             h.make_node("GroupQueryAttention",
                         ["q", "k", "v", "past_key_values.0.key", "past_key_values.0.value",
                          "seqlens_k", "total"],
                         ["attn", "present.0.key", "present.0.value"],
                         name="gqa", domain="com.microsoft", num_heads=heads, kv_num_heads=kv),
             h.make_node("MatMul", ["attn", "wo"], ["o"], name="o_proj"),
             h.make_node("Add", ["x", "o"], ["r"], name="residual"),
             h.make_node("MatMul", ["r", "head"], ["logits"], name="lm_head")]
    ins = [h.make_tensor_value_info("input_ids", T.INT64, ["batch", "seq"]),
           h.make_tensor_value_info("attention_mask", T.INT64, ["batch", "total"]),
           h.make_tensor_value_info("past_key_values.0.key", T.FLOAT, ["batch", kv, "past", d]),
           h.make_tensor_value_info("past_key_values.0.value", T.FLOAT, ["batch", kv, "past", d])]
    outs = [h.make_tensor_value_info("logits", T.FLOAT, ["batch", "seq", vocab]),
            h.make_tensor_value_info("present.0.key", T.FLOAT, ["batch", kv, "total", d]),
            h.make_tensor_value_info("present.0.value", T.FLOAT, ["batch", kv, "total", d])]
    g = h.make_graph(nodes, "gqa_decoder", ins, outs, inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    return m
