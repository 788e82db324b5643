"""Token pruning inside the graph: later layers run on the tokens that receive most attention.

After layer ℓ, each token's importance is the attention it receives (mean over heads and
queries of layer ℓ's probabilities). The top ⌈KEEP·L⌉ tokens plus the first (CLS) one are
kept in their original order (TopK, then a second TopK that sorts the indices), the hidden
state is gathered, and every side computation the later layers read that depends on the
sequence (the attention mask, shapes taken from it) is recomputed from the gathered inputs.
Outputs keep their shapes: the kept tokens' final states are scattered into the hidden state
at the cut, so a pruned token keeps the last state it had. The selection nodes are built in
token_select.py, the output scatter in token_outputs.py, the token-count bookkeeping in token_shapes.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

from sparsec.core.pipeline import PassContext, PassResult
from sparsec.errors import SparsecError
from sparsec.transformer.attention import find_attention
from sparsec.transformer.token_outputs import scatter_outputs
from sparsec.transformer.token_select import model_opset, selection
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
        model, opset = ctx.model, model_opset(ctx.model)
        nodes = list(model.graph.node)
        probs, cut, late, core = self._plan(model, nodes)
        seq_inputs = [i.name for i in model.graph.input if len(i.type.tensor_type.shape.dim) == 2]
        new, idx = selection(probs, cut, self.keep, opset)
        gathered = {x: f"{x}__tokens" for x in seq_inputs}
        new += [helper.make_node("GatherElements", [x, idx], [g], axis=1, name=f"tokens/gather_{x}")
                for x, g in gathered.items()]
        fixed = probe_shapes(model, self.shapes, seq_inputs)
        seen = observe(model, ctx.store, fixed, [*_shape_reads(nodes, late), *wanted(nodes, late, core, cut),
                                                 *(o.name for o in model.graph.output)])
        like_cut = {n for n in _shape_reads(nodes, late) if cut in seen and n in seen
                    and seen[n].shape == seen[cut].shape}
        renamed = _SideInputs(nodes, late, gathered, new, like_cut).clone_for(core, cut)
        renamed[cut] = "tokens/hidden"
        follow_token_count(nodes, late, core, cut, renamed, seen, idx, new)
        for i in core:
            for k, name in enumerate(nodes[i].input):
                if name in renamed:
                    nodes[i].input[k] = renamed[name]
        outputs = scatter_outputs(model, nodes, late, core, cut, idx, new, like_cut, seen)
        if opset < 13:  # Unsqueeze's axes input, GatherND's batch_dims
            raise SparsecError(f"token pruning writes opset-13 ops; the model imports opset {opset}",
                               "convert it with onnx.version_converter first")
        del model.graph.node[:]
        model.graph.node.extend(_topological(nodes + new))
        del model.graph.value_info[:]
        if seen:
            check_runs(model, ctx.store, fixed, seen)
        return PassResult(self.name, True, {"keep": self.keep, "after_layer": self.after_layer,
                                            "outputs": outputs})

    def _plan(self, model: onnx.ModelProto, nodes: list) -> tuple[str, str, set[int], set[int]]:
        """Analysis: the probabilities that score the tokens, the cut (the hidden state the next layer
        reads), the nodes after it and the `core` of those that run on the kept tokens."""
        blocks = sorted(find_attention(model).blocks, key=lambda b: b.softmax)
        if any(getattr(b, "fused", False) for b in blocks):
            raise SparsecError("token pruning needs the attention probabilities: fused Attention ops "
                               "hide them", "prune tokens on the unfused export")
        if not 1 <= self.after_layer < len(blocks):
            raise SparsecError(f"--tokens-from {self.after_layer}: the model has {len(blocks)} attention "
                               "layers; choose a layer before the last", "e.g. --tokens-from 2")
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
        return probs, cut, late, core


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


class _SideInputs:
    """Recompute, from the gathered inputs, every early tensor the `core` nodes (those running on the
    kept tokens) read that depends on the sequence; refuse when such a tensor comes out of the model's
    heavy layers. The `Shape` of an early tensor shaped like the cut becomes the `Shape` of the gathered
    hidden state."""

    def __init__(self, nodes: list, late: set[int], gathered: dict[str, str], new: list,
                 like_cut: set[str] = frozenset()) -> None:
        self.nodes, self.late, self.gathered, self.new, self.like_cut = nodes, late, gathered, new, like_cut
        self.producer = {o: i for i, n in enumerate(nodes) for o in n.output}
        self.renamed = dict(gathered)
        self.memo: dict[str, bool] = {}

    def clone_for(self, core: set[int], cut: str) -> dict[str, str]:
        """Old name -> recomputed name, for every sequence-dependent early tensor `core` reads."""
        for i in core:
            for name in self.nodes[i].input:
                if name and name != cut:
                    self._depends(name)
        return self.renamed

    def _clone(self, i: int, name: str) -> None:
        nodes, renamed = self.nodes, self.renamed
        node = onnx.NodeProto()
        node.CopyFrom(nodes[i])
        node.name = f"{nodes[i].name}__tokens"
        for k, x in enumerate(node.input):
            if x and self.memo.get(x, x in self.gathered):
                node.input[k] = renamed[x]
        for k, x in enumerate(node.output):
            renamed[x] = f"{x}__tokens"
            node.output[k] = renamed[x]
        self.new.append(node)
        if nodes[i].op_type in HEAVY:
            raise SparsecError(f"token pruning: the later layers read {name} from "
                               f"{nodes[i].name} ({nodes[i].op_type}), which sparsec will not recompute")

    def _gathered_shape(self, i: int, name: str) -> None:
        shape = onnx.NodeProto()
        shape.CopyFrom(self.nodes[i])
        shape.name = f"{self.nodes[i].name}__tokens"
        shape.input[0] = "tokens/hidden"
        self.renamed[name] = shape.output[0] = f"{name}__tokens"
        self.new.append(shape)

    def _depends(self, root: str) -> bool:
        """Iterative (a backbone before the cut can be thousands of nodes deep): post-order over producers."""
        nodes, memo, gathered = self.nodes, self.memo, self.gathered
        stack = [(root, False)]
        while stack:
            name, expanded = stack.pop()
            if name in gathered or name in memo:
                continue
            i = self.producer.get(name)
            if i is None or i in self.late:
                memo[name] = False
            elif nodes[i].op_type == "Shape" and nodes[i].input[0] in self.like_cut:
                self._gathered_shape(i, name)
                memo[name] = True
            elif not expanded:
                stack.append((name, True))
                stack.extend((x, False) for x in nodes[i].input if x and x not in memo and x not in gathered)
            else:
                memo[name] = any(memo.get(x, x in gathered) for x in nodes[i].input if x)
                for o in nodes[i].output:
                    memo.setdefault(o, memo[name])
                if memo[name]:
                    self._clone(i, name)
        return root in gathered or memo[root]


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
