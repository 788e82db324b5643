"""Weight-provenance golden model.

Exercises the different ways a MatMul can reach its constant weight, which a weight-discovery
pass must trace back to one prunable tensor (all weights are non-square so a wrong orientation
is caught by shapes, not just by values):

* ``mm_identity`` — ``x @ W`` with W = ``identity_w(w_identity[32, 48])`` (Identity node),
* ``mm_constant`` — ``h @ W`` with W the output of Constant node ``const_w`` ([48, 40]),
* ``mm_transpose`` — ``h @ transpose_w(w_stored)`` where ``w_stored`` is ``[out=24, in=40]``
  and ``transpose_w`` (perm [1, 0]) is a node in the graph,
* ``mm_shared_a`` / ``mm_shared_b`` — both ``act @ w_shared[24, 16]`` (same initializer,
  same orientation; pruning it must keep both consumers consistent),
* ``mm_left`` — constant on the LEFT: ``w_left[16, 8] @ g[2, 8, 16]`` -> ``[2, 16, 16]``
  (reduction is over W's last axis / the activation's second-to-last axis),
* ``gather_tied`` / ``mm_tied`` — tied embedding: ``emb[50, 16]`` is both the table of a
  Gather over int64 ``ids[2, 8]`` and, via ``transpose_tied``, the ``[16, 50]`` LM head.

Relu nodes ``relu_*`` and Add nodes ``add_shared`` / ``add_embed`` glue the paths together.
Inputs: ``x[2, 8, 32]`` float, ``ids[2, 8]`` int64. Output: ``logits[2, 16, 50]``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from ._common import finalize, weight

VOCAB = 50


def build_weight_paths(seed: int = 0) -> onnx.ModelProto:
    """Build the weight-provenance graph described in the module docstring."""
    rng = np.random.default_rng(seed)
    w_const = weight(rng, "const_w.value", (48, 40))
    inits = [
        weight(rng, "w_identity", (32, 48)),
        weight(rng, "w_stored", (24, 40)),
        weight(rng, "w_shared", (24, 16)),
        weight(rng, "w_left", (16, 8)),
        weight(rng, "emb", (VOCAB, 16)),
    ]
    mk = helper.make_node
    nodes = [
        mk("Identity", ["w_identity"], ["w_identity_alias"], "identity_w"),
        mk("MatMul", ["x", "w_identity_alias"], ["a"], "mm_identity"),
        mk("Relu", ["a"], ["a_r"], "relu_identity"),
        mk("Constant", [], ["w_const"], "const_w", value=w_const),
        mk("MatMul", ["a_r", "w_const"], ["b"], "mm_constant"),
        mk("Relu", ["b"], ["b_r"], "relu_constant"),
        mk("Transpose", ["w_stored"], ["w_stored_t"], "transpose_w", perm=[1, 0]),
        mk("MatMul", ["b_r", "w_stored_t"], ["c"], "mm_transpose"),
        mk("Relu", ["c"], ["c_r"], "relu_transpose"),
        mk("MatMul", ["c", "w_shared"], ["d1"], "mm_shared_a"),
        mk("MatMul", ["c_r", "w_shared"], ["d2"], "mm_shared_b"),
        mk("Add", ["d1", "d2"], ["e"], "add_shared"),
        mk("Gather", ["emb", "ids"], ["tok"], "gather_tied", axis=0),
        mk("Add", ["e", "tok"], ["g"], "add_embed"),
        mk("MatMul", ["w_left", "g"], ["f"], "mm_left"),
        mk("Relu", ["f"], ["f_r"], "relu_left"),
        mk("Transpose", ["emb"], ["emb_t"], "transpose_tied", perm=[1, 0]),
        mk("MatMul", ["f_r", "emb_t"], ["logits"], "mm_tied"),
    ]
    graph = helper.make_graph(
        nodes,
        "weight_paths",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 32]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 8]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 16, VOCAB])],
        inits,
    )
    return finalize(graph)
