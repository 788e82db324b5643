"""Small random transformers exported the way real models are, for the attention matcher's tests.

* ``build_hf_bert`` — a ``transformers`` BertModel (eager attention) with ``last_hidden_state`` and
  ``pooler_output``: the context tensor also feeds ``Shape`` (``context.size()[:-2]``).
* ``build_hf_vit`` — a ``transformers`` ViTModel on a small image (sequence = patches + CLS); pre-norm
  blocks, and under dynamo constant token counts in Reshape targets and a constant attention bias
  (``hf_vit_module`` gives the torch module).
* ``build_fused_qkv`` — timm/PaddleOCR-style attention: one ``Linear(E, 3E)`` reshaped to
  [B, L, 3, H, D], permuted and unbound into Q, K and V.
* ``build_opset7_block`` — one attention block + ReLU FFN written with ``onnx.helper`` at opset 7 the
  way Paddle2ONNX does (Reshape targets through ``Identity``): ONNX shape inference gives no ranks.

The torch ones are exported with ``exporter`` in {"dynamo", "torchscript"} at opset 17 (torch imported
lazily).
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import warnings
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models._common import name_nodes


def _export(module: Any, args: tuple, inputs: list[str], outputs: list[str], dynamic: dict[str, dict],
            exporter: str) -> onnx.ModelProto:
    import torch

    kwargs: dict[str, Any] = dict(input_names=inputs, output_names=outputs, opset_version=17)
    if exporter == "dynamo":
        kwargs.update(dynamo=True, external_data=False, verbose=False,
                      dynamic_shapes={n: dynamic.get(n, {}) for n in inputs})
    else:
        kwargs.update(dynamo=False, dynamic_axes=dynamic)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = pathlib.Path(tmp) / "model.onnx"
        torch.onnx.export(module, args, str(path), **kwargs)
        model = onnx.load(str(path), load_external_data=True)
    name_nodes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def _seeded(seed: int, make):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval()


def _bert_config(layers: int, hidden: int, heads: int):
    """A small random-weight BERT with eager attention (no download: HF_HUB_OFFLINE)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertConfig

    return BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=2 * hidden, max_position_embeddings=64, attn_implementation="eager")


def build_hf_bert(seed: int = 0, exporter: str = "torchscript", layers: int = 2, hidden: int = 64,
                  heads: int = 4) -> onnx.ModelProto:
    """BertModel -> (last_hidden_state [B, L, E], pooler_output [B, E])."""
    import torch

    config = _bert_config(layers, hidden, heads)  # sets HF_HUB_OFFLINE before transformers loads
    from transformers import BertModel

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel(config)

        def forward(self, input_ids, attention_mask):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=torch.zeros_like(input_ids))
            return out.last_hidden_state, out.pooler_output

    module = _seeded(seed, Wrapper)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(seed))
    dims = {0: "batch", 1: "seq"}
    return _export(module, (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"],
                   ["last_hidden_state", "pooler_output"],
                   {"input_ids": dims, "attention_mask": dims, "last_hidden_state": dims,
                    "pooler_output": {0: "batch"}}, exporter)


def hf_vit_module(seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4, image: int = 32,
                  patch: int = 8):
    """The seeded torch ViTModel wrapper that `build_hf_vit` exports (a test's independent reference)."""
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=2 * hidden, image_size=image, patch_size=patch,
                       attn_implementation="eager")

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vit = ViTModel(config, add_pooling_layer=False)

        def forward(self, pixel_values):
            return self.vit(pixel_values=pixel_values).last_hidden_state

    return _seeded(seed, Wrapper)


def build_hf_vit(seed: int = 0, exporter: str = "torchscript", layers: int = 2, hidden: int = 64,
                 heads: int = 4, image: int = 32, patch: int = 8) -> onnx.ModelProto:
    """ViTModel on [B, 3, image, image] -> last_hidden_state [B, (image/patch)² + 1, E]."""
    import torch

    module = hf_vit_module(seed, layers, hidden, heads, image, patch)
    x = torch.randn(2, 3, image, image, generator=torch.Generator().manual_seed(seed))
    return _export(module, (x,), ["pixel_values"], ["last_hidden_state"],
                   {"pixel_values": {0: "batch"}, "last_hidden_state": {0: "batch"}}, exporter)


def build_fused_qkv(seed: int = 0, exporter: str = "torchscript", layers: int = 2, dim: int = 64,
                    heads: int = 4) -> onnx.ModelProto:
    """tokens [B, L, E] -> [B, L, E] through pre-norm blocks with one Linear(E, 3E) for Q, K and V."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)
            self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

        def forward(self, x):
            b, n, c = x.shape
            qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            attn = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
            x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
            return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))

    return _export_blocks(Block, layers, dim, seed, exporter)


def build_legacy_bert(seed: int = 0, exporter: str = "torchscript", layers: int = 2, dim: int = 64,
                      heads: int = 4) -> onnx.ModelProto:
    """tokens [B, L, E] -> [B, L, E] with transformers-4.x BertSelfAttention's reshapes: the context's
    target is `context.size()[:-2] + (all_head_size,)`, so the context also feeds `Shape`."""
    from torch import nn

    size = dim // heads

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
            self.norm = nn.LayerNorm(dim)

        def split(self, x):
            return x.view(x.size()[:-1] + (heads, size)).permute(0, 2, 1, 3)

        def forward(self, x):
            q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
            probs = (q @ k.transpose(-1, -2) / size ** 0.5).softmax(dim=-1)
            context = (probs @ v).permute(0, 2, 1, 3).contiguous()
            context = context.view(context.size()[:-2] + (dim,))
            return self.norm(x + self.o(context))

    return _export_blocks(Block, layers, dim, seed, exporter)


def build_hf_bert_mean_pool(seed: int = 0, exporter: str = "torchscript", layers: int = 2, hidden: int = 64,
                            heads: int = 4) -> onnx.ModelProto:
    """BertModel + sentence-transformers mean pooling inside the graph -> (token_embeddings [B, L, E],
    sentence_embedding [B, E]): the pooling expands `attention_mask` to the token embeddings' shape."""
    import torch

    config = _bert_config(layers, hidden, heads)  # sets HF_HUB_OFFLINE before transformers loads
    from transformers import BertModel

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel(config, add_pooling_layer=False)

        def forward(self, input_ids, attention_mask):
            tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            mask = attention_mask.unsqueeze(-1).expand(tokens.size()).float()
            return tokens, (tokens * mask).sum(1) / torch.clamp(mask.sum(1), min=1e-9)

    module = _seeded(seed, Wrapper)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(seed))
    dims = {0: "batch", 1: "seq"}
    return _export(module, (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"],
                   ["token_embeddings", "sentence_embedding"],
                   {"input_ids": dims, "attention_mask": dims, "token_embeddings": dims,
                    "sentence_embedding": {0: "batch"}}, exporter)


def build_opset7_block(seed: int = 0, dim: int = 32, heads: int = 4, ffn: int = 64) -> onnx.ModelProto:
    """x [B, L, E] -> out [B, L, E]: Q/K/V/O projections, Softmax attention, MatMul, Add, Relu, MatMul."""
    rng = np.random.default_rng(seed)
    d = dim // heads
    inits, nodes = [], []

    def const(name, value, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def linear(x, name, k, n):
        w = const(f"{name}.w", rng.standard_normal((k, n)) / np.sqrt(k))
        b = const(f"{name}.b", rng.standard_normal(n) * 0.1)
        nodes.extend([helper.make_node("MatMul", [x, w], [f"{name}.mm"], name=f"{name}/MatMul"),
                      helper.make_node("Add", [f"{name}.mm", b], [name], name=f"{name}/Add")])
        return name

    def reshape(x, name, target):  # Paddle's opset-7 export: the target reaches Reshape through Identity
        const(f"{name}.shape", target, np.int64)
        nodes.extend([helper.make_node("Identity", [f"{name}.shape"], [f"{name}.target"],
                                       name=f"{name}/Identity"),
                      helper.make_node("Reshape", [x, f"{name}.target"], [name], name=f"{name}/Reshape")])
        return name

    def heads_of(x, name, perm):
        r = reshape(x, f"{name}.split", [0, 0, heads, d])
        nodes.append(helper.make_node("Transpose", [r], [name], name=f"{name}/Transpose", perm=perm))
        return name

    x = reshape("x", "tokens", [0, -1, dim])
    q = heads_of(linear(x, "q", dim, dim), "qh", [0, 2, 1, 3])
    k = heads_of(linear(x, "k", dim, dim), "kh", [0, 2, 3, 1])
    v = heads_of(linear(x, "v", dim, dim), "vh", [0, 2, 1, 3])
    scale = const("scale", d ** -0.5)
    nodes += [helper.make_node("MatMul", [q, k], ["qk"], name="qk/MatMul"),
              helper.make_node("Mul", ["qk", scale], ["scores"], name="scores/Mul"),
              helper.make_node("Softmax", ["scores"], ["probs"], name="Softmax.0", axis=3),
              helper.make_node("MatMul", ["probs", v], ["ctx"], name="ctx/MatMul"),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], name="ctx/Transpose", perm=[0, 2, 1, 3])]
    o = linear(reshape("ctx_t", "ctx_merged", [0, 0, dim]), "o", dim, dim)
    nodes.append(helper.make_node("Add", [x, o], ["h"], name="residual1/Add"))
    f1 = linear("h", "fc1", dim, ffn)
    nodes.append(helper.make_node("Relu", [f1], ["act"], name="act/Relu"))
    f2 = linear("act", "fc2", ffn, dim)
    nodes.append(helper.make_node("Add", ["h", f2], ["out"], name="residual2/Add"))
    dims = ["batch", "seq", dim]
    graph = helper.make_graph(nodes, "opset7_block",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, dims)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=4)
    onnx.checker.check_model(model, full_check=True)
    return model


def _export_blocks(block: type, layers: int, dim: int, seed: int, exporter: str) -> onnx.ModelProto:
    """tokens [B, L, E] -> out [B, L, E] through `layers` seeded copies of `block`, batch and sequence
    dynamic."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(*[block() for _ in range(layers)])

        def forward(self, tokens):
            return self.blocks(tokens)

    module = _seeded(seed, Net)
    x = torch.randn(2, 10, dim, generator=torch.Generator().manual_seed(seed))
    dims = {0: "batch", 1: "seq"}
    return _export(module, (x,), ["tokens"], ["out"], {"tokens": dims, "out": dims}, exporter)
