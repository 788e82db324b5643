"""Fresh names for what sparsec adds to a graph.

Derived names (`{node.name}__compensation`) collide on graphs whose nodes have no names, and a
duplicate initializer is silently resolved to one value by onnxruntime; every name sparsec
creates comes from here, checked against every name already in the model."""

from __future__ import annotations

from collections.abc import Iterator

import onnx


class FreshNames:
    """Hands out names that no node, value or initializer of `graph` (subgraphs included) uses."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.taken: set[str] = set(_names(graph))

    def __call__(self, base: str) -> str:
        base = base or "sparsec"
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name


def _names(graph: onnx.GraphProto) -> Iterator[str]:
    yield from (t.name for t in graph.initializer)
    yield from (t.values.name for t in graph.sparse_initializer)
    yield from (v.name for v in [*graph.input, *graph.output, *graph.value_info])
    for node in graph.node:
        yield node.name
        yield from node.input
        yield from node.output
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _names(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _names(g)


def node_ids(graph: onnx.GraphProto) -> list[str]:
    """One unique name per node of `graph`, in node order: how analyses, plans and edits name nodes.

    A named node is its name (a name that repeats: its first node; later ones get `name_1`, ...); an
    unnamed node gets `{op_type}_{position}` (made unique), the display name reports always used.
    sparsec does not rename nodes at load (named nodes keep their names byte for byte), so an id is
    computed from the graph it names: the analysis and the pass that edits a copy of that graph agree
    on every id, and named nodes keep theirs when passes insert or remove nodes.
    """
    names = [node.name for node in graph.node]
    taken = {n for n in names if n}
    seen: set[str] = set()
    ids: list[str] = []
    for i, (node, name) in enumerate(zip(graph.node, names, strict=True)):
        if name and name not in seen:
            seen.add(name)
            ids.append(name)
            continue
        base = name or f"{node.op_type}_{i}"
        fresh, k = base, 1
        while fresh in taken:
            fresh, k = f"{base}_{k}", k + 1
        taken.add(fresh)
        ids.append(fresh)
    return ids
