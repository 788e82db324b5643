"""Walk and edit a graph together with the If/Loop/Scan bodies nested in it.

A body reads outer-scope tensors by name, so renaming, sorting and cleaning one graph must look into
its bodies too; onnxconverter-common only looks at each graph's own names (see precision.py).
"""

from __future__ import annotations

import copy
import heapq
from collections.abc import Callable, Iterator

import onnx
from onnx import helper


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in node attributes (If/Loop/Scan bodies)."""
    yield graph
    for attr in (a for n in graph.node for a in n.attribute):
        for g in [attr.g] * (attr.type == onnx.AttributeProto.GRAPH) + list(attr.graphs):
            yield from graphs(g)


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The bodies held directly by ``node``'s attributes."""
    return [g for a in node.attribute for g in [a.g] * (a.type == onnx.AttributeProto.GRAPH) + list(a.graphs)]


def body_reads(node: onnx.NodeProto) -> set[str]:
    """Names read anywhere inside ``node``'s bodies."""
    return {x for sub in subgraphs(node) for g in graphs(sub) for m in g.node for x in m.input}


def nested_reads(graph: onnx.GraphProto) -> set[str]:
    """Names read inside the bodies of ``graph``'s If/Loop/Scan nodes (any depth)."""
    return {x for n in graph.node for x in body_reads(n)}


def rename_inputs(graph: onnx.GraphProto, old: str, new: str,
                  skip: Callable[[onnx.NodeProto], bool] = lambda n: False) -> None:
    """Rename reads of ``old`` in ``graph`` and in the bodies nested in it (they see outer names)."""
    for n in graph.node:
        if not skip(n):
            n.input[:] = [new if x == old else x for x in n.input]
        for sub in subgraphs(n):
            rename_inputs(sub, old, new, skip)


def fresh_name(base: str, names: set[str]) -> str:
    """``base`` or ``base_k``, whichever is not in ``names`` yet; it is added to them."""
    name, k = base, 0
    while name in names:
        k += 1
        name = f"{base}_{k}"
    names.add(name)
    return name


def _outer_reads(body: onnx.GraphProto) -> list[str]:
    """Names a body (any depth) reads but does not define, in first-read order."""
    defined = {v.name for g in graphs(body) for v in [*g.input, *g.initializer]}
    defined |= {o for g in graphs(body) for m in g.node for o in m.output}
    return [x for x in dict.fromkeys(x for g in graphs(body) for m in g.node for x in m.input)
            if x and x not in defined]


def route_outer_reads(graph: onnx.GraphProto, top: onnx.GraphProto, names: set[str]) -> None:
    """Every outer-scope read of a body goes through one Identity at the top of that body.

    The converter types a body's tensors from its own value_info: an outer name has none there, so
    a blocked op (Resize) reading one got no Cast back to fp32. Local Identity outputs get inferred
    types like any tensor. A graph input read only inside bodies first goes through an Identity in
    the main graph, so that it gets the converter's fp16 input Cast.
    """
    for node in list(graph.node):
        for body in subgraphs(node):
            for name in _outer_reads(body):
                if graph is top and name in {v.name for v in top.input} and not any(
                    name in m.input for m in top.node
                ):  # read only inside bodies: give it a main-graph reader first
                    via = fresh_name(f"{name}__main", names)
                    rename_inputs(top, name, via)
                    top.node.insert(0, helper.make_node("Identity", [name], [via], name=via))
                    name = via
                local = fresh_name(f"{name}__{body.name or 'body'}", names)
                for m in body.node:
                    m.input[:] = [local if x == name else x for x in m.input]
                    for sub in subgraphs(m):
                        rename_inputs(sub, name, local)
                body.node.insert(0, helper.make_node("Identity", [name], [local], name=local))
            route_outer_reads(body, top, names)


def toposort(graph: onnx.GraphProto) -> None:
    """Stable topological order, bodies included; a node also waits for what its bodies read
    from outside (the converter's own sort ignores those and put an If before its inputs)."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    users: dict[int, list[int]] = {}
    missing = []
    for i, n in enumerate(graph.node):
        deps = {producer[x] for x in {*n.input, *body_reads(n)} if x in producer} - {i}
        missing.append(len(deps))
        for d in deps:
            users.setdefault(d, []).append(i)
    ready = [i for i, k in enumerate(missing) if k == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, []):
            missing[u] -= 1
            if missing[u] == 0:
                heapq.heappush(ready, u)
    placed = set(order)
    order += [i for i in range(len(graph.node)) if i not in placed]  # a cycle: the checker names it
    for n in graph.node:
        for body in subgraphs(n):
            toposort(body)
    nodes = [copy.deepcopy(graph.node[i]) for i in order]
    del graph.node[:]
    graph.node.extend(nodes)
