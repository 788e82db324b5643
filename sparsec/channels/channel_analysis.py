"""Channel dependency analysis: which channels must be removed together, and where they go.

Every prunable producer (a weight op of `core.op_table` with its own constant weight) creates
one *element* per output channel. Each tensor's channel axis is a list of elements (its
layout): elementwise ops pass layouts through, Concat joins them, Split and Slice cut them,
Flatten repeats each element H·W times, and an elementwise op over two activations unites
their elements position by position (union-find). A class of united elements is one removable
channel. Anything the op table does not understand marks the elements it touches
untouchable, with the reason: unknown means "do not prune", never "guess".

Pure analysis: returns frozen data and never edits the graph.
"""

from __future__ import annotations

import numpy as np
import onnx

from sparsec.channels.channel_rules import rule_for
from sparsec.channels.channel_state import ChannelAnalysis, State
from sparsec.core.tensors import TensorStore


def analyse_channels(model: onnx.ModelProto, shapes: dict[str, tuple],
                     ranks: dict[str, int] | None = None, store: TensorStore | None = None,
                     dims: dict[str, tuple[int | None, ...]] | None = None) -> ChannelAnalysis:
    """Follow the channel axis through the graph (nodes are in topological order).

    `shapes` are concrete shapes where inference settled them, `ranks` the ranks known
    otherwise (symbolic dims), `dims` the partly known shapes (None for an unsettled dim);
    a rule that needs an unknown rank or dim blocks instead of guessing. Every value is read
    through `store` (external data included).
    """
    state = State(model, shapes, ranks, store, dims)
    for i, node in enumerate(model.graph.node):
        rule_for(node.op_type)(state, i, node)
    for out in model.graph.output:
        if out.name in state.layouts:
            state.block(state.layouts[out.name].elems, f"reaches graph output {out.name}")
    for name in state.index.subgraph_uses:
        if name in state.layouts:
            state.block(state.layouts[name].elems, f"{name} is read inside a subgraph")
    root = np.array([state.find(e) for e in range(len(state.parent))], dtype=np.int64)
    untouchable: dict[int, str] = {}
    for e, reason in state.blocked.items():
        untouchable.setdefault(int(root[e]), reason)
    return ChannelAnalysis(tuple(state.sources), root, tuple(state.actions), untouchable,
                           dict(state.layouts))
