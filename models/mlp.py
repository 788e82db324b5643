"""Multi-layer perceptron golden model.

Exercises the most common "linear layer" spelling emitted by exporters — ``MatMul`` with a
``[in, out]`` weight initializer followed by a bias ``Add`` — plus a final ``Gemm``, with a
symbolic batch dimension so passes cannot rely on fully static activation shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from ._common import bias, finalize, weight


def build_mlp(
    seed: int = 0,
    hidden: Sequence[int] = (64, 32),
    in_features: int = 32,
    out_features: int = 10,
    batch: str = "N",
) -> onnx.ModelProto:
    """Build ``x[batch, in] -> (MatMul + Add + Relu) * len(hidden) -> Gemm -> y[batch, out]``.

    Node names: ``fc{i}_matmul``, ``fc{i}_add``, ``fc{i}_relu`` for each hidden layer ``i``
    and ``head_gemm`` for the classifier; weights ``fc{i}.weight`` ([in, out]) and
    ``fc{i}.bias``, ``head.weight`` ([in, out], transB=0) and ``head.bias``.
    """
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    cur, width = "x", in_features
    for i, h in enumerate(hidden):
        inits += [weight(rng, f"fc{i}.weight", (width, h)), bias(rng, f"fc{i}.bias", h)]
        nodes += [
            helper.make_node("MatMul", [cur, f"fc{i}.weight"], [f"fc{i}_mm"], f"fc{i}_matmul"),
            helper.make_node("Add", [f"fc{i}_mm", f"fc{i}.bias"], [f"fc{i}_pre"], f"fc{i}_add"),
            helper.make_node("Relu", [f"fc{i}_pre"], [f"fc{i}_out"], f"fc{i}_relu"),
        ]
        cur, width = f"fc{i}_out", h
    inits += [
        weight(rng, "head.weight", (width, out_features)),
        bias(rng, "head.bias", out_features),
    ]
    nodes.append(helper.make_node("Gemm", [cur, "head.weight", "head.bias"], ["y"], "head_gemm"))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, out_features])],
        inits,
    )
    return finalize(graph)
