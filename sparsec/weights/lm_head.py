"""A language model's LM head and token embeddings: left dense by default.

The LM head (the layer that writes the vocabulary logits) and the embedding table are what LLM pruning
(Wanda, SparseGPT) and deployments leave dense: every token's score goes through the head, and an
embedding lookup (Gather) does no multiply a sparse kernel could skip. A language model is recognised
by a token input (`input_ids`) and a rank-3 graph output named `*logits`; the head is the weight layer
that output is read from, through ops that do not mix features (Identity, Reshape, Cast, a bias Add).
Pure analysis over the graph and the found layers.
"""

from __future__ import annotations

import onnx

from sparsec.core.layers import Layer, Skipped

_TAIL_OPS = frozenset({"Identity", "Reshape", "Cast", "Add", "Squeeze", "Unsqueeze"})
LM_HEAD_KIND = "LM head"
_FLOATS = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16})


def _rank(value: onnx.ValueInfoProto) -> int | None:
    t = value.type.tensor_type
    return len(t.shape.dim) if t.HasField("shape") else None


def _logits_outputs(model: onnx.ModelProto) -> list[str]:
    """Rank-3 `*logits` outputs of a model with an `input_ids` input (none: not a language model)."""
    if not any(i.name == "input_ids" for i in model.graph.input):
        return []
    return [o.name for o in model.graph.output if o.name.lower().endswith("logits") and _rank(o) == 3]


def lm_head_layers(model: onnx.ModelProto, layers: tuple[Layer, ...]) -> dict[str, str]:
    """Weight name -> the logits output its layer writes, for the LM head of a language model."""
    graph = model.graph
    logits = _logits_outputs(model)
    if not logits:
        return {}
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    by_node = {layer.node_index: layer for layer in layers}
    inits = {t.name for t in graph.initializer}
    heads: dict[str, str] = {}
    for out in logits:
        name = out
        for _ in range(16):  # a short tail of feature-preserving ops
            index = producer.get(name)
            if index is None:
                break
            if index in by_node:
                heads[by_node[index].weight] = out
                break
            node = graph.node[index]
            if node.op_type not in _TAIL_OPS:
                break
            name = next((i for i in node.input if i and i not in inits and i in producer), "")
    return heads


def embedding_skips(model: onnx.ModelProto, read: set[str]) -> list[Skipped]:
    """The embedding lookups of a language model (Gather of a float [rows, hidden] table: tokens, learned
    positions), for the report; a table in `read` (a layer's weight: a tied LM head) is reported there."""
    graph = model.graph
    if not _logits_outputs(model):
        return []
    tables = {t.name for t in graph.initializer if len(t.dims) == 2 and t.data_type in _FLOATS}
    out = []
    for i, node in enumerate(graph.node):
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.op_type == "Gather" and axis == 0 and node.input[0] in tables and node.input[0] not in read:
            out.append(Skipped(node.name or f"Gather_{i}", "Gather", node.input[0],
                               "embedding table: a lookup, not a matrix multiply; left dense", "embedding"))
    return out
