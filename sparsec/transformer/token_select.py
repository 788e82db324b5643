"""The in-graph token selection: which ⌈KEEP·L⌉ tokens the later layers run on, in original order.

Each token's score is the attention it receives (mean over heads and queries of one layer's
probabilities); the first (CLS) token gets a large bonus so it always stays; a TopK picks the tokens and
a second TopK sorts their indices; GatherND takes their hidden states.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def model_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain opset (17 when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)


def token_node(op: str, inputs: list[str], output: str | list[str], **attrs) -> onnx.NodeProto:
    """A node named after its first output."""
    outputs = [output] if isinstance(output, str) else output
    return helper.make_node(op, inputs, outputs, name=f"{outputs[0]}_node", **attrs)


def _const(name: str, value, dtype) -> onnx.NodeProto:
    return token_node("Constant", [], name, value=numpy_helper.from_array(np.array(value, dtype=dtype), name))


def selection(probs: str, hidden: str, keep: float, opset: int) -> tuple[list, str]:
    """Nodes computing the kept indices [B, k] (ascending) and the gathered hidden state."""
    t = "tokens/"
    if opset >= 18:
        n = [_const(t + "axes", [1, 2], np.int64),
             token_node("ReduceMean", [probs, t + "axes"], t + "score", keepdims=0)]
    else:
        n = [token_node("ReduceMean", [probs], t + "score", axes=[1, 2], keepdims=0)]
    n += [
        _const(t + "one", 1, np.int64), _const(t + "zero", 0, np.int64),
        _const(t + "keep", keep, np.float32), _const(t + "boost", 1e9, np.float32),
        _const(t + "axis0", [0], np.int64), _const(t + "last", [-1], np.int64),
        token_node("Shape", [hidden], t + "shape"),
        token_node("Gather", [t + "shape", t + "one"], t + "len", axis=0),
        token_node("Cast", [t + "len"], t + "len_f", to=TensorProto.FLOAT),
        token_node("Mul", [t + "len_f", t + "keep"], t + "k_f"),
        token_node("Ceil", [t + "k_f"], t + "k_c"),
        token_node("Cast", [t + "k_c"], t + "k_i", to=TensorProto.INT64),
        token_node("Max", [t + "k_i", t + "one"], t + "k_s"),
        token_node("Unsqueeze", [t + "k_s", t + "axis0"], t + "k"),
        # the first token always stays: a large bonus at position 0
        token_node("Range", [t + "zero", t + "len", t + "one"], t + "pos"),
        token_node("Equal", [t + "pos", t + "zero"], t + "is_first"),
        token_node("Cast", [t + "is_first"], t + "first_f", to=TensorProto.FLOAT),
        token_node("Mul", [t + "first_f", t + "boost"], t + "bonus"),
        token_node("Add", [t + "score", t + "bonus"], t + "score2"),
        token_node("TopK", [t + "score2", t + "k"], [t + "top_v", t + "top_i"], axis=1, largest=1, sorted=0),
        # keep the original order: sort the chosen positions ascending
        token_node("Cast", [t + "top_i"], t + "top_f", to=TensorProto.FLOAT),
        token_node("TopK", [t + "top_f", t + "k"], [t + "sorted_f", t + "sorted_i"], axis=1, largest=0,
                   sorted=1),
        token_node("Cast", [t + "sorted_f"], t + "index", to=TensorProto.INT64),
        token_node("Unsqueeze", [t + "index", t + "last"], t + "index3"),
        token_node("GatherND", [hidden, t + "index3"], t + "hidden", batch_dims=1),
    ]
    return n, t + "index"
