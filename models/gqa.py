"""A grouped-query attention block without projection biases, exported by torch.

Four query heads share two K/V heads (`repeat_interleave` on the head axis), the scale is a
Div after QKᵀ: the attention matcher must walk through the repeat and keep a K/V head only
with its whole group of query heads.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx


def build_gqa(seed: int = 0, exporter: str = "dynamo", d_model: int = 64, heads: int = 4,
              kv_heads: int = 2) -> onnx.ModelProto:
    import torch

    class GQA(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dh = d_model // heads
            self.q = torch.nn.Linear(d_model, heads * self.dh, bias=False)
            self.k = torch.nn.Linear(d_model, kv_heads * self.dh, bias=False)
            self.v = torch.nn.Linear(d_model, kv_heads * self.dh, bias=False)
            self.o = torch.nn.Linear(heads * self.dh, d_model, bias=False)

        def forward(self, x):
            b, n, _ = x.shape
            q = self.q(x).view(b, n, heads, self.dh).transpose(1, 2)
            k = self.k(x).view(b, n, kv_heads, self.dh).transpose(1, 2)
            v = self.v(x).view(b, n, kv_heads, self.dh).transpose(1, 2)
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
            att = torch.softmax(q @ k.transpose(-1, -2) / self.dh**0.5, dim=-1)
            return self.o((att @ v).transpose(1, 2).reshape(b, n, heads * self.dh))

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = GQA().eval()
    x = torch.randn(2, 5, d_model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gqa.onnx"
        if exporter == "dynamo":
            dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")},)
            torch.onnx.export(module, (x,), str(path), dynamo=True, input_names=["x"], output_names=["y"],
                              opset_version=17, dynamic_shapes=dims)
        else:
            torch.onnx.export(module, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                              opset_version=17, dynamic_axes={"x": {0: "batch", 1: "seq"}})
        model = onnx.load(str(path))
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    return model
