"""Sequential calibration from where the last level stopped, not from the model's inputs.

With --sequential one calibration runs per depth level. Each level's statistics need only the nodes
between the previous level's inputs and its own; the values crossing that cut (the residual stream, a
mask, rotary tables) do not depend on any weight pruned later, so they are kept per batch and fed to the
next level's graph as inputs. Over all levels onnxruntime then runs the model about once instead of
once per level.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from sparsec.runtime.instrument import subgraph_reads

CUT_BUDGET = 1 << 30  # bytes of cut values kept across levels; past it levels run from the inputs


@dataclass
class LevelCut:
    """Model nodes already computed (by their first output) and the values leaving them, per batch."""

    level: int = 0  # the depth level these values are for (a cut is used by the next level only)
    shape_key: tuple[str, ...] = ()  # the model's node outputs when the cut was taken
    done: set[str] = field(default_factory=set)
    values: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def matches(self, model: onnx.ModelProto) -> bool:
        return self.shape_key == _shape_key(model)


@dataclass(frozen=True)
class CutPlan:
    """One level's graph cut at the kept values, and the values to fetch for the next level."""

    graph: onnx.ModelProto
    fed: list[str]  # cut tensors this graph reads (fed per batch from LevelCut.values)
    fetch: list[str]  # new cut tensors this graph produces (appended to its outputs)
    carry: list[str]  # cut tensors kept from before that later levels still read
    done: set[str]


def plan_cut(model: onnx.ModelProto, graph: onnx.ModelProto, cut: LevelCut) -> CutPlan:
    """`graph` (the instrumented model) computing its statistics from the kept values onwards."""
    known = set(cut.values) if cut.matches(model) else set()
    done = set(cut.done) if known else set()
    g = graph.graph
    outputs = [o.name for o in g.output]
    producer = {o: i for i, n in enumerate(g.node) for o in n.output}
    keep: set[int] = set()
    stack = list(outputs)
    while stack:
        name = stack.pop()
        i = producer.get(name)
        if name in known or i is None or i in keep:
            continue
        keep.add(i)
        stack.extend([x for x in g.node[i].input if x] + subgraph_reads(g.node[i]))
    nodes = [n for i, n in enumerate(g.node) if i in keep]
    model_nodes = {n.output[0] for n in model.graph.node if n.output}
    done |= {n.output[0] for n in nodes if n.output and n.output[0] in model_nodes}
    reads = {x for n in nodes for x in [*n.input, *subgraph_reads(n)] if x}
    fed = sorted(known & reads)
    # values that leave the computed part towards nodes still to run
    later = {x for n in model.graph.node if n.output and n.output[0] not in done
             for x in [*n.input, *subgraph_reads(n)] if x}
    inits = {t.name for t in model.graph.initializer}
    made = {o for n in nodes if n.output and n.output[0] in model_nodes for o in n.output}
    fetch = sorted((made - known - inits) & later)
    carry = sorted(known & later)
    inputs = [i for i in g.input if i.name in reads]
    inputs += [_input_info(name, cut.values[name]) for name in fed]
    outs = list(g.output) + [onnx.ValueInfoProto(name=f) for f in fetch]
    out = helper.make_graph(nodes, g.name, inputs, outs)
    cut_model = helper.make_model(out, opset_imports=list(graph.opset_import), ir_version=graph.ir_version)
    return CutPlan(cut_model, fed, fetch, carry, done)


def advance(model: onnx.ModelProto, cut: LevelCut, plan: CutPlan,
            fetched: dict[str, list[np.ndarray]]) -> None:
    """Move `cut` past this level; emptied past CUT_BUDGET (later levels then run from the inputs)."""
    values = {k: cut.values[k] for k in plan.carry}
    values.update(fetched)
    cut.level += 1
    if sum(a.nbytes for arrays in values.values() for a in arrays) > CUT_BUDGET:
        cut.shape_key, cut.done, cut.values = (), set(), {}
        return
    cut.shape_key, cut.done, cut.values = _shape_key(model), plan.done, values


def _input_info(name: str, arrays: list[np.ndarray]) -> onnx.ValueInfoProto:
    """A kept value as a graph input with its rank (a dim that differs between batches is symbolic):
    onnxruntime's fusions need the rank, and the same fusions must run as in the uncut graph."""
    dims = [d if all(a.shape[i] == d for a in arrays) else f"{name}_{i}"
            for i, d in enumerate(arrays[0].shape)]
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arrays[0].dtype), dims)


def _shape_key(model: onnx.ModelProto) -> tuple[str, ...]:
    return tuple(n.output[0] if n.output else "" for n in model.graph.node)
