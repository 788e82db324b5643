"""Token pruning inside the graph: later layers run on the tokens that receive most attention.

After layer ℓ, each token's importance is the attention it receives (mean over heads and
queries of layer ℓ's probabilities). The top ⌈KEEP·L⌉ tokens plus the first (CLS) one are
kept in their original order (TopK, then a second TopK that sorts the indices), the hidden
state is gathered, and every side computation the later layers read that depends on the
sequence (the attention mask, shapes taken from it) is recomputed from the gathered inputs.
Outputs keep their shapes: the kept tokens' final states are scattered into the hidden state
at the cut, so a pruned token keeps the last state it had.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sparsec.core.pipeline import PassContext, PassResult
from sparsec.errors import SparsecError
from sparsec.transformer.attention import find_attention
from sparsec.transformer.token_shapes import (
    check_runs,
    follow_token_count,
    observe,
    probe_shapes,
    residual_cut,
    wanted,
)

HEAVY = ("MatMul", "Gemm", "Conv", "Softmax", "LayerNormalization")


@dataclass
class PruneTokensPass:
    keep: float
    after_layer: int  # 1-based: the layer whose attention scores the tokens
    shapes: dict | None = None  # --shape, for the probe runs
    name: str = "prune-tokens"
    requires: frozenset[str] = frozenset()

    def run(self, ctx: PassContext) -> PassResult:
        model = ctx.model
        blocks = sorted(find_attention(model).blocks, key=lambda b: b.softmax)
        if any(getattr(b, "fused", False) for b in blocks):
            raise SparsecError("token pruning needs the attention probabilities: fused Attention ops "
                               "hide them", "prune tokens on the unfused export")
        if not 1 <= self.after_layer < len(blocks):
            raise SparsecError(f"--tokens-from {self.after_layer}: the model has {len(blocks)} attention "
                               "layers; choose a layer before the last", "e.g. --tokens-from 2")
        nodes = list(model.graph.node)
        probs = nodes[blocks[self.after_layer - 1].softmax].output[0]
        cut = residual_cut(nodes, nodes[blocks[self.after_layer].q.matmul].input[0], _descendants)
        late = _descendants(nodes, cut)
        # graph outputs [B, k, E] are scattered back to [B, L, E]: what reads only them sees all tokens
        # again and keeps the original sequence inputs (in-graph mean pooling over attention_mask)
        rank3 = {o.name for o in model.graph.output if len(o.type.tensor_type.shape.dim) == 3}
        core = _descendants(nodes, cut, stop=rank3)
        stray = [nodes[b.softmax].name for b in blocks[self.after_layer:] if b.softmax not in core]
        if stray:  # a later layer would read a scattered (all tokens) output: no saving, a wrong report
            raise SparsecError(f"token pruning: attention {stray[0]} reads a hidden state that is also a "
                               "[batch, tokens, features] graph output, so it would see every token",
                               "drop the intermediate hidden-state outputs, or prune from a later layer")
        seq_inputs = [i.name for i in model.graph.input if len(i.type.tensor_type.shape.dim) == 2]
        new, idx = _selection(probs, cut, self.keep, _opset(model))
        gathered = {x: f"{x}__tokens" for x in seq_inputs}
        new += [helper.make_node("GatherElements", [x, idx], [g], axis=1, name=f"tokens/gather_{x}")
                for x, g in gathered.items()]
        fixed = probe_shapes(model, self.shapes, seq_inputs)
        seen = observe(model, ctx.store, fixed, [*_shape_reads(nodes, late), *wanted(nodes, late, core, cut),
                                                 *(o.name for o in model.graph.output)])
        like_cut = {n for n in _shape_reads(nodes, late) if cut in seen and n in seen
                    and seen[n].shape == seen[cut].shape}
        renamed = _clone_side_inputs(nodes, late, core, cut, gathered, new, like_cut)
        renamed[cut] = "tokens/hidden"
        follow_token_count(nodes, late, core, cut, renamed, seen, idx, new)
        for i in core:
            for k, name in enumerate(nodes[i].input):
                if name in renamed:
                    nodes[i].input[k] = renamed[name]
        outputs = _scatter_outputs(model, nodes, late, core, cut, idx, new, like_cut, seen)
        if _opset(model) < 13:  # Unsqueeze's axes input, GatherND's batch_dims
            raise SparsecError(f"token pruning writes opset-13 ops; the model imports opset {_opset(model)}",
                               "convert it with onnx.version_converter first")
        del model.graph.node[:]
        model.graph.node.extend(_topological(nodes + new))
        del model.graph.value_info[:]
        if seen:
            check_runs(model, ctx.store, fixed, seen)
        return PassResult(self.name, True, {"keep": self.keep, "after_layer": self.after_layer,
                                            "outputs": outputs})


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)


def _node(op: str, inputs: list[str], output: str | list[str], **attrs) -> onnx.NodeProto:
    outputs = [output] if isinstance(output, str) else output
    return helper.make_node(op, inputs, outputs, name=f"{outputs[0]}_node", **attrs)


def _const(name: str, value, dtype) -> onnx.NodeProto:
    return _node("Constant", [], name, value=numpy_helper.from_array(np.array(value, dtype=dtype), name))


def _selection(probs: str, hidden: str, keep: float, opset: int) -> tuple[list, str]:
    """Nodes computing the kept indices [B, k] (ascending) and the gathered hidden state."""
    t = "tokens/"
    if opset >= 18:
        n = [_const(t + "axes", [1, 2], np.int64),
             _node("ReduceMean", [probs, t + "axes"], t + "score", keepdims=0)]
    else:
        n = [_node("ReduceMean", [probs], t + "score", axes=[1, 2], keepdims=0)]
    n += [
        _const(t + "one", 1, np.int64), _const(t + "zero", 0, np.int64),
        _const(t + "keep", keep, np.float32), _const(t + "boost", 1e9, np.float32),
        _const(t + "axis0", [0], np.int64), _const(t + "last", [-1], np.int64),
        _node("Shape", [hidden], t + "shape"),
        _node("Gather", [t + "shape", t + "one"], t + "len", axis=0),
        _node("Cast", [t + "len"], t + "len_f", to=TensorProto.FLOAT),
        _node("Mul", [t + "len_f", t + "keep"], t + "k_f"),
        _node("Ceil", [t + "k_f"], t + "k_c"),
        _node("Cast", [t + "k_c"], t + "k_i", to=TensorProto.INT64),
        _node("Max", [t + "k_i", t + "one"], t + "k_s"),
        _node("Unsqueeze", [t + "k_s", t + "axis0"], t + "k"),
        # the first token always stays: a large bonus at position 0
        _node("Range", [t + "zero", t + "len", t + "one"], t + "pos"),
        _node("Equal", [t + "pos", t + "zero"], t + "is_first"),
        _node("Cast", [t + "is_first"], t + "first_f", to=TensorProto.FLOAT),
        _node("Mul", [t + "first_f", t + "boost"], t + "bonus"),
        _node("Add", [t + "score", t + "bonus"], t + "score2"),
        _node("TopK", [t + "score2", t + "k"], [t + "top_v", t + "top_i"], axis=1, largest=1, sorted=0),
        # keep the original order: sort the chosen positions ascending
        _node("Cast", [t + "top_i"], t + "top_f", to=TensorProto.FLOAT),
        _node("TopK", [t + "top_f", t + "k"], [t + "sorted_f", t + "sorted_i"], axis=1, largest=0, sorted=1),
        _node("Cast", [t + "sorted_f"], t + "index", to=TensorProto.INT64),
        _node("Unsqueeze", [t + "index", t + "last"], t + "index3"),
        _node("GatherND", [hidden, t + "index3"], t + "hidden", batch_dims=1),
    ]
    return n, t + "index"


def _descendants(nodes, tensor: str, stop: set[str] = frozenset()) -> set[int]:
    """Nodes downstream of `tensor`, not following the tensors in `stop`."""
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    out, stack = set(), [tensor]
    while stack:
        for i in consumers.get(stack.pop(), []):
            if i not in out:
                out.add(i)
                stack.extend(o for o in nodes[i].output if o not in stop)
    return out


def _shape_reads(nodes, late: set[int]) -> list[str]:
    """What early `Shape`s and late `Gather`/`Slice`s read: those shaped like the cut ([B, L, E]) are the
    hidden state (an encoder computes its reshape targets from the embeddings' shape; a CLS pooler
    gathers token 0 of the last hidden state)."""
    return sorted({n.input[0] for i, n in enumerate(nodes) if n.op_type == "Shape" and i not in late
                   or n.op_type in ("Gather", "Slice") and i in late})


def _clone_side_inputs(nodes, late: set[int], core: set[int], cut: str, gathered: dict[str, str],
                       new: list, like_cut: set[str] = frozenset()) -> dict[str, str]:
    """Recompute, from the gathered inputs, every early tensor the `core` nodes (those running on the
    kept tokens) read that depends on the sequence; refuse when such a tensor comes out of the model's
    heavy layers. The `Shape` of an early tensor shaped like the cut becomes the `Shape` of the gathered
    hidden state."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    renamed = dict(gathered)
    memo: dict[str, bool] = {}

    def clone(i: int, name: str) -> None:
        node = onnx.NodeProto()
        node.CopyFrom(nodes[i])
        node.name = f"{nodes[i].name}__tokens"
        for k, x in enumerate(node.input):
            if x and memo.get(x, x in gathered):
                node.input[k] = renamed[x]
        for k, x in enumerate(node.output):
            renamed[x] = f"{x}__tokens"
            node.output[k] = renamed[x]
        new.append(node)
        if nodes[i].op_type in HEAVY:
            raise SparsecError(f"token pruning: the later layers read {name} from "
                               f"{nodes[i].name} ({nodes[i].op_type}), which sparsec will not recompute")

    def depends(root: str) -> bool:
        """Iterative (a backbone before the cut can be thousands of nodes deep): post-order over producers."""
        stack = [(root, False)]
        while stack:
            name, expanded = stack.pop()
            if name in gathered or name in memo:
                continue
            i = producer.get(name)
            if i is None or i in late:
                memo[name] = False
            elif nodes[i].op_type == "Shape" and nodes[i].input[0] in like_cut:
                shape = onnx.NodeProto()
                shape.CopyFrom(nodes[i])
                shape.name = f"{nodes[i].name}__tokens"
                shape.input[0] = "tokens/hidden"
                renamed[name] = shape.output[0] = f"{name}__tokens"
                new.append(shape)
                memo[name] = True
            elif not expanded:
                stack.append((name, True))
                stack.extend((x, False) for x in nodes[i].input if x and x not in memo and x not in gathered)
            else:
                memo[name] = any(memo.get(x, x in gathered) for x in nodes[i].input if x)
                for o in nodes[i].output:
                    memo.setdefault(o, memo[name])
                if memo[name]:
                    clone(i, name)
        return root in gathered or memo[root]

    for i in core:
        for name in nodes[i].input:
            if name and name != cut:
                depends(name)
    return renamed


def _scatter_outputs(model, nodes, late, core, cut: str, idx: str, new: list,
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
            _node("Unsqueeze", [idx, "tokens/last"], f"{o}/idx3"),
            _node("Shape", [inner], f"{o}/shape"),
            _node("Expand", [f"{o}/idx3", f"{o}/shape"], f"{o}/idx"),
            _node("ScatterElements", [cut, f"{o}/idx", inner], o, axis=1),
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


def _topological(nodes: list) -> list:
    """Kahn's order over all nodes (new ones were appended at the end)."""
    produced = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = [{produced[x] for x in n.input if x in produced} for n in nodes]
    users: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(i)
    waiting = [len(d) for d in deps]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    order = []
    while ready:
        i = ready.pop(0)
        order.append(nodes[i])
        for u in users.get(i, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    if len(order) != len(nodes):
        raise SparsecError("token pruning produced a cycle; this is a sparsec bug, please report it")
    return order
