"""Small ResNet-flavoured CNN golden model.

Exercises the convolution variants a pruning compiler must tell apart:

* ``stem_conv`` — 3→16 3x3 with C=3 on the reduction axis (not divisible by 4: never 2:4),
* ``conv2`` — 16→32 3x3 stride 2,
* an UNFUSED ``BatchNormalization`` after every dense conv (``*_bn``) with realistic running
  statistics, so BN folding / pruning-through-BN is exercised,
* a residual block (``res_conv1`` → ``res_bn1`` → ``res_relu1`` → ``res_conv2`` → ``res_bn2`` →
  ``res_add`` with the block input → ``res_relu2``): channel coupling across an Add,
* ``dw_conv`` — depthwise (group=32) 3x3, ``grp_conv`` — grouped (group=4) 1x1 32→32,
* ``br_a_conv`` / ``br_b_conv`` — two 1x1 32→16 branches joined by ``br_concat`` (axis 1),
* ``gap`` (GlobalAveragePool) → ``flatten`` → ``head_gemm`` (transB=1, W[10, 32]).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from ._common import batchnorm_params, bias, finalize, weight


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def node(self, op: str, inputs: list[str], name: str, **attrs: object) -> str:
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name, **attrs))
        return out

    def conv(
        self,
        x: str,
        name: str,
        cin: int,
        cout: int,
        k: int,
        *,
        group: int = 1,
        stride: int = 1,
        with_bias: bool = True,
    ) -> str:
        self.inits.append(weight(self.rng, f"{name}.weight", (cout, cin // group, k, k)))
        inputs = [x, f"{name}.weight"]
        if with_bias:
            self.inits.append(bias(self.rng, f"{name}.bias", cout))
            inputs.append(f"{name}.bias")
        p = k // 2
        return self.node(
            "Conv",
            inputs,
            name,
            kernel_shape=[k, k],
            pads=[p, p, p, p],
            strides=[stride, stride],
            group=group,
        )

    def bn(self, x: str, name: str, c: int) -> str:
        params = batchnorm_params(self.rng, name, c)
        self.inits += params
        return self.node("BatchNormalization", [x] + [p.name for p in params], name, epsilon=1e-5)

    def conv_bn(self, x: str, prefix: str, cin: int, cout: int, k: int, stride: int = 1) -> str:
        y = self.conv(x, f"{prefix}_conv", cin, cout, k, stride=stride, with_bias=False)
        return self.bn(y, f"{prefix}_bn", cout)


def build_cnn(seed: int = 0) -> onnx.ModelProto:
    """Build the CNN described in the module docstring: ``image[1,3,32,32] -> logits[1,10]``."""
    b = _Builder(seed)
    x = b.node("Relu", [b.conv_bn("image", "stem", 3, 16, 3)], "stem_relu")
    x = b.node("Relu", [b.conv_bn(x, "conv2", 16, 32, 3, stride=2)], "conv2_relu")
    # residual block
    h = b.node(
        "Relu",
        [b.bn(b.conv(x, "res_conv1", 32, 32, 3, with_bias=False), "res_bn1", 32)],
        "res_relu1",
    )
    h = b.bn(b.conv(h, "res_conv2", 32, 32, 3, with_bias=False), "res_bn2", 32)
    x = b.node("Relu", [b.node("Add", [h, x], "res_add")], "res_relu2")
    # depthwise + grouped
    x = b.node("Relu", [b.conv(x, "dw_conv", 32, 32, 3, group=32)], "dw_relu")
    x = b.node("Relu", [b.conv(x, "grp_conv", 32, 32, 1, group=4)], "grp_relu")
    # two-branch concat
    a = b.conv(x, "br_a_conv", 32, 16, 1)
    c = b.conv(x, "br_b_conv", 32, 16, 1)
    x = b.node("Relu", [b.node("Concat", [a, c], "br_concat", axis=1)], "br_relu")
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x], "gap")], "flatten", axis=1)
    b.inits += [weight(b.rng, "head.weight", (10, 32)), bias(b.rng, "head.bias", 10)]
    b.nodes.append(
        helper.make_node("Gemm", [x, "head.weight", "head.bias"], ["logits"], "head_gemm", transB=1)
    )
    graph = helper.make_graph(
        b.nodes,
        "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        b.inits,
    )
    return finalize(graph)
