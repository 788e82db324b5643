"""Graph outputs of a token-pruned model keep their shapes.

A [B, k, E] output computed on the kept tokens is scattered back into the hidden state at the cut
([B, L, E]), so a pruned token keeps the last state it had; any other late output may read only the
first (CLS, always kept) token or such scattered outputs, else the pass refuses.
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from sparsec.errors import SparsecError
from sparsec.transformer.token_select import token_node


def scatter_outputs(model, nodes, late, core, cut: str, idx: str, new: list,
                     like_cut: set[str], seen: dict) -> list[str]:
    """Graph outputs of shape [B, k, E] computed on the kept tokens (`core`) go back to [B, L, E] over
    the hidden state at the cut;
    any other late output must read only the first (CLS, always kept) token or such scattered outputs."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    done = []
    for out in model.graph.output:
        i = producer.get(out.name)
        if i is None or i not in core or len(out.type.tensor_type.shape.dim) != 3:
            continue
        if out.name in seen and cut in seen and seen[out.name].shape != seen[cut].shape:
            continue  # per-token logits [B, L, classes]: not a hidden state to scatter into
        inner = f"{out.name}__kept_tokens"
        nodes[i].output[list(nodes[i].output).index(out.name)] = inner
        o = out.name
        new += [
            token_node("Unsqueeze", [idx, "tokens/last"], f"{o}/idx3"),
            token_node("Shape", [inner], f"{o}/shape"),
            token_node("Expand", [f"{o}/idx3", f"{o}/shape"], f"{o}/idx"),
            token_node("ScatterElements", [cut, f"{o}/idx", inner], o, axis=1),
        ]
        done.append(out.name)
    for out in model.graph.output:
        i = producer.get(out.name)
        if i is not None and i in late and out.name not in done:
            reason = _reads_all_tokens(model, nodes, producer, late, cut, out.name, set(done), like_cut)
            if reason:
                raise SparsecError(f"token pruning: output {out.name} is not a hidden state to scatter back "
                                   f"to every token ([batch, tokens, features] like the cut) and "
                                   f"{reason}", "only outputs reading the CLS token or no token are allowed")
    return done


def _reads_all_tokens(model, nodes, producer, late, cut: str, name: str, scattered: set[str],
                      like_cut: set[str]) -> str | None:
    """Why output `name` would see the pruned token set, or None when every path from it back to the
    cut reads a scattered output (all L tokens again) or only token 0 of a [B, L, E] hidden state."""
    consts = {t.name: t for t in model.graph.initializer if np.prod(t.dims) <= 8}
    consts.update({n.output[0]: n.attribute[0].t for n in nodes if n.op_type == "Constant" and n.attribute
                   and n.attribute[0].name == "value"})
    stack, seen = [name], set()
    while stack:
        t = stack.pop()
        if t in (cut, "tokens/hidden"):  # late nodes read the gathered hidden state by now
            return "reads the kept tokens' states (or their count)"
        i = producer.get(t)
        if t in seen or t in scattered or i is None or i not in late:
            continue
        seen.add(t)
        node = nodes[i]
        if node.input and node.input[0] in like_cut and _first_token(node, consts):
            continue
        stack.extend(x for x in node.input if x)
    return None


def _first_token(node, consts: dict) -> bool:
    """Gather(axis=1, index 0) or Slice(axis 1, [0, 1)): the CLS token, which the selection always keeps."""
    def const(name):
        return numpy_helper.to_array(consts[name]) if name in consts else None

    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
    if node.op_type == "Gather":
        index = const(node.input[1])
        return axis == 1 and index is not None and index.size == 1 and int(index.ravel()[0]) == 0
    if node.op_type == "Slice" and len(node.input) >= 4:
        starts, ends, axes = (const(x) for x in node.input[1:4])
        steps = const(node.input[4]) if len(node.input) > 4 and node.input[4] else np.array([1])
        return all(v is not None and v.size == 1 for v in (starts, ends, axes, steps)) \
            and int(axes.ravel()[0]) == 1 and int(starts.ravel()[0]) == 0 and int(ends.ravel()[0]) == 1 \
            and int(steps.ravel()[0]) == 1
    return False
