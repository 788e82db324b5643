"""The bundled example model compiled by the README's first command.

A tiny CNN classifier (``image[1, 3, 32, 32] -> logits[1, 10]``) that shows every decision the
compiler makes on a typical vision model, in well under 300 KB:

* ``stem_conv`` — 3→16 3x3 with C=3: NOT 2:4-eligible on TensorRT (C % 4 != 0), then an unfused
  ``stem_bn`` + ``stem_relu``,
* ``conv1`` (16→32 3x3 stride 2), ``conv2`` (32→32 3x3) and ``conv3`` (32→64 3x3 stride 2) —
  dense group-1 convs with C % 4 == 0: 2:4-eligible; ``res_add`` adds ``conv2``'s output to
  ``conv1``'s (a residual, so their output channels are coupled),
* ``gap`` → ``flatten`` → ``fc`` (Gemm transB=1, W[10, 64], K=64 divisible by 8): 2:4-eligible.

Run ``python -m models.example`` from the repository root to regenerate ``models/example.onnx``.
"""

from __future__ import annotations

import pathlib

import onnx
from onnx import TensorProto, helper

# Absolute imports so that ``python models/example.py`` works as a plain script too.
from models._common import bias, finalize, weight
from models.cnn import _Builder


def build_example(seed: int = 0) -> onnx.ModelProto:
    """Build the example classifier described in the module docstring."""
    b = _Builder(seed)
    x = b.conv("image", "stem_conv", 3, 16, 3, with_bias=False)
    x = b.node("Relu", [b.bn(x, "stem_bn", 16)], "stem_relu")
    x1 = b.node("Relu", [b.conv(x, "conv1", 16, 32, 3, stride=2)], "relu1")
    x2 = b.node("Relu", [b.conv(x1, "conv2", 32, 32, 3)], "relu2")
    x = b.node("Add", [x2, x1], "res_add")
    x = b.node("Relu", [b.conv(x, "conv3", 32, 64, 3, stride=2)], "relu3")
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x], "gap")], "flatten", axis=1)
    b.inits += [weight(b.rng, "fc.weight", (10, 64)), bias(b.rng, "fc.bias", 10)]
    b.nodes.append(
        helper.make_node("Gemm", [x, "fc.weight", "fc.bias"], ["logits"], "fc", transB=1)
    )
    graph = helper.make_graph(
        b.nodes,
        "example_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        b.inits,
    )
    return finalize(graph)


def main() -> pathlib.Path:
    """Write ``example.onnx`` next to this file and return its path."""
    path = pathlib.Path(__file__).with_name("example.onnx")
    onnx.save(build_example(), str(path))
    return path


if __name__ == "__main__":
    print(main())
