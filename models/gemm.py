"""Gemm-flavour golden model.

Exercises every ``Gemm`` operand layout a weight-orientation analysis must handle:

* ``gemm_transb`` — ``transB=1``, W ``[48, 64]`` stored as ``[out, in]``, with bias (K=64),
* ``gemm_plain`` — ``transB=0``, W ``[48, 24]`` stored as ``[in, out]``, with bias (K=48),
* ``transpose_a`` + ``gemm_transa`` — the activation is transposed by a graph node and fed
  as A with ``transA=1`` (so A is ``[K, M]``), W ``[24, 20]``, with bias (K=24),
* ``gemm_k20`` — ``transB=1``, W ``[12, 20]``, no bias: K=20 is divisible by 4 but not by 8,
  so it qualifies for 2:4 grouping along K but not for kernels needing K % 8 == 0.

``relu1``..``relu3`` separate the Gemms. Graph: ``x[4, 64] -> y[4, 12]``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from ._common import bias, finalize, weight


def build_gemm_transb(seed: int = 0) -> onnx.ModelProto:
    """Build the Gemm chain described in the module docstring."""
    rng = np.random.default_rng(seed)
    inits = [
        weight(rng, "g1.weight", (48, 64)),
        bias(rng, "g1.bias", 48),
        weight(rng, "g2.weight", (48, 24)),
        bias(rng, "g2.bias", 24),
        weight(rng, "g3.weight", (24, 20)),
        bias(rng, "g3.bias", 20),
        weight(rng, "g4.weight", (12, 20)),
    ]
    mk = helper.make_node
    nodes = [
        mk("Gemm", ["x", "g1.weight", "g1.bias"], ["g1_out"], "gemm_transb", transB=1),
        mk("Relu", ["g1_out"], ["r1_out"], "relu1"),
        mk("Gemm", ["r1_out", "g2.weight", "g2.bias"], ["g2_out"], "gemm_plain", transB=0),
        mk("Relu", ["g2_out"], ["r2_out"], "relu2"),
        mk("Transpose", ["r2_out"], ["r2_t"], "transpose_a", perm=[1, 0]),
        mk("Gemm", ["r2_t", "g3.weight", "g3.bias"], ["g3_out"], "gemm_transa", transA=1),
        mk("Relu", ["g3_out"], ["r3_out"], "relu3"),
        mk("Gemm", ["r3_out", "g4.weight"], ["y"], "gemm_k20", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "gemm_transb",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 12])],
        inits,
    )
    return finalize(graph)
