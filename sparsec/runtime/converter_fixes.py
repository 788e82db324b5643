"""What onnxconverter-common's fp16 conversion gets wrong with onnx 1.23, fixed before and after it.

Before: Cast names derived from node names clash for unnamed nodes; initializers listed as inputs;
bodies reading outer-scope tensors; initializers shared by blocked and unblocked nodes; the model's
own ``Cast(to=FLOAT)`` nodes. After: those Casts retyped, graph outputs of blocked ops (or also read
inside the graph) given the right type, Cast pairs, duplicate Casts and stale value_info removed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import onnx
from onnx import TensorProto, helper

from sparsec.errors import SparsecError
from sparsec.runtime.lowp_support import norm_variance_nodes, type_blocked_outputs
from sparsec.runtime.nested_graphs import graphs, nested_reads, rename_inputs, route_outer_reads

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
PLACEHOLDER = "sparsec-placeholder"  # location of external tensors whose values precision_external fills


def prepare(model: onnx.ModelProto, block_ops: set[str]) -> tuple[set[str], set[str]]:
    """Make the model safe for the converter; return the nodes blocked by name (norm variance) and
    the model's own unblocked Cast(to=FLOAT) nodes, which must produce fp16 after conversion."""
    g = model.graph
    if any(t.data_location == TensorProto.EXTERNAL
           and not any(e.key == "location" and e.value == PLACEHOLDER for e in t.external_data)
           for t in g.initializer):
        raise SparsecError(
            "precision conversion needs the weights in memory",
            hint="load the model with onnx.load(path, load_external_data=True)",
        )
    names = _unique_node_names(g)
    _drop_initializer_inputs(model)
    names |= {x for sub in graphs(g) for n in sub.node for x in [*n.input, *n.output]}
    names |= {v.name for sub in graphs(g) for v in [*sub.input, *sub.output, *sub.initializer]}
    route_outer_reads(g, g, names)
    block_nodes = {name for sub in graphs(g) for name in norm_variance_nodes(sub)}
    blocked = lambda n: n.op_type in block_ops or n.name in block_nodes  # noqa: E731
    type_blocked_outputs(model, blocked)
    _split_shared_initializers(g, blocked)
    own_casts = {  # retyped after conversion: before it, shape inference would carry fp16 into
        n.name  # the blocked ops downstream (Resize) and the converter then skips their casts
        for sub in graphs(g)
        for n in sub.node
        if n.op_type == "Cast" and helper.get_node_attr_value(n, "to") == F32 and not blocked(n)
    }
    return block_nodes, own_casts


def _unique_node_names(g: onnx.GraphProto) -> set[str]:
    """Unique names in every body (the converter's Cast names derive from them and tensor names are
    global); returns the node names."""
    nodes = [n for sub in graphs(g) for n in sub.node]
    names, seen = {n.name for n in nodes}, set()
    for i, node in enumerate(nodes):
        if not node.name or node.name in seen:
            k = 0
            while f"{node.op_type}_{i}_{k}" in names:
                k += 1
            node.name = f"{node.op_type}_{i}_{k}"
            names.add(node.name)
        seen.add(node.name)
    return names


def _drop_initializer_inputs(model: onnx.ModelProto) -> None:
    """IR < 4 style: initializers listed as graph inputs are inputs no more."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    if any(v.name in inits for v in g.input):
        kept = [v for v in g.input if v.name not in inits]
        del g.input[:]
        g.input.extend(kept)
        model.ir_version = max(model.ir_version, 4)


def _split_shared_initializers(g: onnx.GraphProto, blocked: Callable[[onnx.NodeProto], bool]) -> None:
    """An fp32 initializer read by blocked and unblocked nodes: the blocked ones read it through an
    Identity, so the converter may lower the original."""
    for sub in graphs(g):
        nested = nested_reads(sub)
        for name in [t.name for t in sub.initializer if t.data_type == F32]:
            kinds = {blocked(n) for n in sub.node if name in n.input} | ({False} if name in nested else set())
            if kinds == {True, False}:
                via = f"{name}__fp32"
                rename_inputs(sub, name, via, skip=lambda n: not blocked(n))
                sub.node.insert(0, helper.make_node("Identity", [name], [via], name=via))


def retype_casts(graph: onnx.GraphProto, names: set[str]) -> None:
    """The model's own Cast(to=FLOAT) nodes produce fp16 like their (converted) neighbours."""
    for sub in graphs(graph):
        for n in (n for n in sub.node if n.name in names):
            for a in (a for a in n.attribute if a.name == "to"):
                a.i = F16


def fix_outputs(graph: onnx.GraphProto, blocked: set[str]) -> None:
    """Graph outputs stay float32; nodes inside the graph read their fp16 twin."""
    elem = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info]}
    producer = {o: n for n in graph.node for o in n.output}
    for out in graph.output:
        if (prod := producer.get(out.name)) is None:
            continue
        if out.type.tensor_type.elem_type == F16:  # a blocked op's output the converter made fp16
            low = f"{out.name}__fp16"
            prod.output[:] = [low if o == out.name else o for o in prod.output]
            rename_inputs(graph, out.name, low)
            graph.value_info.append(copy.deepcopy(out))
            graph.value_info[-1].name = low
            src = prod.input[0] if prod.op_type == "Cast" else ""
            if elem.get(src) == F32:  # take the blocked op's fp32 value itself
                graph.node.append(helper.make_node("Identity", [src], [out.name], name=low))
            else:
                graph.node.append(helper.make_node("Cast", [low], [out.name], name=low, to=F32))
            out.type.tensor_type.elem_type = F32
        elif prod.op_type == "Cast" and elem.get(prod.input[0]) == F16:  # readers got the fp32 copy
            rename_inputs(
                graph, out.name, prod.input[0], skip=lambda n: n.name in blocked or n is prod
            )


def cleanup(graph: onnx.GraphProto) -> None:
    """Cast32(Cast16(x)) -> x, merge duplicate Casts, drop dead Casts, unused initializers and
    stale value_info (what the converter's own remove_unnecessary_cast_node gets wrong)."""
    outputs = {o.name for o in graph.output}
    elem = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info]}
    producer = {o: n for n in graph.node for o in n.output}
    rename: dict[str, str] = {}
    first: dict[tuple[str, int], str] = {}
    for node in (n for n in graph.node if n.op_type == "Cast" and n.output[0] not in outputs):
        to, up = helper.get_node_attr_value(node, "to"), producer.get(node.input[0])
        if to == F32 and up is not None and up.op_type == "Cast" and elem.get(up.input[0]) == F32:
            rename[node.output[0]] = up.input[0]
        else:
            key = (rename.get(node.input[0], node.input[0]), to)
            rename[node.output[0]] = first.setdefault(key, node.output[0])
    for old, new in rename.items():
        if old != new:
            rename_inputs(graph, old, new)
    _drop_dead(graph, outputs)


def _drop_dead(graph: onnx.GraphProto, outputs: set[str]) -> None:
    """Casts nobody reads (repeatedly: a chain of them dies back to front), unused initializers and
    value_info of tensors no longer produced."""
    while True:
        read = {x for n in graph.node for x in n.input} | outputs | nested_reads(graph)
        dead = [n for n in graph.node if n.op_type == "Cast" and not {*n.output} & read]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {x for n in graph.node for x in n.input} | outputs | nested_reads(graph)
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
    produced = {o for n in graph.node for o in n.output} - outputs
    vis = {v.name: v for v in reversed(graph.value_info) if v.name in produced}
    del graph.value_info[:]
    graph.value_info.extend(vis.values())
