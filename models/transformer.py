"""BERT-like transformer encoder golden model, exported from PyTorch.

Exercises what real exporters emit for transformers rather than hand-written graphs:
separate q/k/v ``Linear`` layers (MatMul with a transposed-at-export weight + bias Add),
attention as explicit ``MatMul`` -> scale -> mask ``Add`` -> ``Softmax`` -> ``MatMul`` with
dynamic-shape Reshape/Transpose plumbing, LayerNorm, GELU FFN, and a token/position embedding
Gather. Both the dynamo (``torch.export``-based) and the legacy TorchScript exporters are
supported because their graphs differ (op choice, initializer naming, node naming).

Inputs: ``input_ids[batch, seq]`` and ``attention_mask[batch, seq]`` (int64, 1 = attend;
both dims dynamic). Output: ``last_hidden_state[batch, seq, d_model]``.
"""

from __future__ import annotations

import math
import pathlib
import tempfile
import warnings
from typing import Any

import onnx

from models._common import name_nodes

MAX_POSITIONS = 128


def _make_module(layers: int, d_model: int, heads: int, ffn: int, vocab: int) -> Any:
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(d_model, d_model)
            self.k = nn.Linear(d_model, d_model)
            self.v = nn.Linear(d_model, d_model)
            self.o = nn.Linear(d_model, d_model)
            self.ln1 = nn.LayerNorm(d_model)
            self.fc1 = nn.Linear(d_model, ffn)
            self.fc2 = nn.Linear(ffn, d_model)
            self.ln2 = nn.LayerNorm(d_model)
            self.act = nn.GELU()

        def split(self, t: torch.Tensor) -> torch.Tensor:
            b, s, _ = t.shape
            return t.view(b, s, heads, d_model // heads).transpose(1, 2)

        def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            b, s, _ = x.shape
            q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
            scores = q @ k.transpose(-1, -2) / math.sqrt(d_model // heads) + bias
            ctx = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, s, d_model)
            x = self.ln1(x + self.o(ctx))
            return self.ln2(x + self.fc2(self.act(self.fc1(x))))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(vocab, d_model)
            self.pos = nn.Embedding(MAX_POSITIONS, d_model)
            self.ln = nn.LayerNorm(d_model)
            self.layers = nn.ModuleList(Layer() for _ in range(layers))

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            x = self.ln(self.tok(input_ids) + self.pos(pos)[None])
            bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e4
            for layer in self.layers:
                x = layer(x, bias)
            return x

    encoder = Encoder()
    with torch.no_grad():  # trained-looking LayerNorms: distinct, so exporters cannot dedupe them
        for mod in encoder.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.normal_(1.0, 0.1)
                mod.bias.normal_(0.0, 0.1)
    return encoder



def build_transformer_encoder(
    seed: int = 0,
    layers: int = 2,
    d_model: int = 64,
    heads: int = 4,
    ffn: int = 128,
    vocab: int = 100,
    exporter: str = "dynamo",
) -> onnx.ModelProto:
    """Export the encoder with ``exporter`` in {"dynamo", "torchscript"} at opset 17.

    Weights come from ``torch.manual_seed(seed)`` inside a forked RNG (the caller's global torch
    RNG state is left untouched). Sequences longer than 128 tokens are not supported (learned
    position table). Node names are the exporter's own, with empty/duplicate ones renamed.
    """
    import torch

    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"exporter must be 'dynamo' or 'torchscript', got {exporter!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = _make_module(layers, d_model, heads, ffn, vocab).eval()
        ids = torch.randint(0, vocab, (2, 8))
    args = (ids, torch.ones_like(ids))
    dims = {0: "batch", 1: "seq"}
    kwargs: dict[str, Any] = dict(
        input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state"],
        opset_version=17,
    )
    if exporter == "dynamo":
        kwargs.update(
            dynamo=True,
            external_data=False,
            verbose=False,
            dynamic_shapes={"input_ids": dims, "attention_mask": dims},
        )
    else:
        names = (*kwargs["input_names"], *kwargs["output_names"])
        kwargs.update(dynamo=False, dynamic_axes={n: dims for n in names})
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = pathlib.Path(tmp) / "encoder.onnx"
        torch.onnx.export(module, args, str(path), **kwargs)
        model = onnx.load(str(path), load_external_data=True)
    name_nodes(model)
    onnx.checker.check_model(model, full_check=True)
    return model
