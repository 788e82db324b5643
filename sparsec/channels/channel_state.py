"""The channel analysis's data: layouts, typed edits, sources and the result (frozen), and the mutable
State the op rules in `channel_rules` write into. Apart from `channel_analysis` so the rules and the
driver both import it, not each other."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from sparsec.core.graph_index import GraphIndex, to_effective
from sparsec.core.names import node_ids
from sparsec.core.tensors import TensorStore


@dataclass(frozen=True)
class Layout:
    """The elements along a tensor's channel axis."""

    axis: int  # non-negative, in the tensor's rank
    rank: int
    elems: np.ndarray  # int element ids, one per channel position


@dataclass(frozen=True)
class Edit:
    """One edit the rewrite must make when elements of `layout` are removed.

    `node` is the node's id (`core.names.node_ids` of the analysed graph): a name, not a position,
    so an edit still finds its node after another edit inserted nodes before it."""

    node: str
    layout: tuple[int, ...]  # element per position of the axis being cut


@dataclass(frozen=True)
class ProducerCut(Edit):
    """Drop output channels: slice the weight's output axis and the bias."""

    input: int
    axis: int
    bias: int | None = None


@dataclass(frozen=True)
class ConsumerCut(Edit):
    """Drop input channels: slice the weight's reduction axis (the removed ones' constant is
    compensated into the bias, or the weight refit)."""

    input: int
    axis: int


@dataclass(frozen=True)
class DepthwiseCut(Edit):
    """A depthwise Conv follows its input channels: slice weight and bias rows, shrink `group`."""

    mult: int  # output channels per group


@dataclass(frozen=True)
class ParamCut(Edit):
    """Slice a per-channel constant (BatchNorm statistics, a broadcast operand)."""

    input: int
    axis: int


@dataclass(frozen=True)
class SplitCut(Edit):
    """Rewrite a Split's sizes to what each output keeps."""

    bounds: tuple[int, ...]


@dataclass(frozen=True)
class SliceCut(Edit):
    """Move a channel Slice's start and end to the kept positions."""

    start: int
    end: int
    pos: int  # position of the channel axis in the Slice's axes


@dataclass(frozen=True)
class ReshapeCut(Edit):
    """Set one entry of a shape or sizes constant to the kept count."""

    input: int
    entry: int


@dataclass(frozen=True)
class TargetCut(Edit):
    """Set the last entry of a Reshape's target to the kept count: the constant on input 1 of the
    Reshape (`concat` None) or the constant last piece (`input`) of the Concat `concat` that builds it
    (a Concat or constant that other nodes also read is copied first)."""

    concat: str | None
    input: int


@dataclass(frozen=True)
class Source:
    node: int  # position in the analysed graph (ordering only; edits name nodes by `name`)
    name: str  # the node's id (`core.names.node_ids`)
    op: str
    first: int  # first element id
    channels: int


@dataclass(frozen=True)
class ChannelAnalysis:
    """Classes of coupled channels, what to edit, and what may not be touched."""

    sources: tuple[Source, ...]
    root: np.ndarray  # element id -> class id (a representative element)
    actions: tuple[Edit, ...]
    untouchable: dict[int, str]  # class id -> reason
    layouts: dict[str, Layout]

    def classes(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for e, r in enumerate(self.root):
            out.setdefault(int(r), []).append(e)
        return out

    def source_of(self, elem: int) -> Source:
        for s in self.sources:
            if s.first <= elem < s.first + s.channels:
                return s
        raise KeyError(elem)

    def groups(self) -> list[dict]:
        """Printable dependency groups: sources linked by coupling, and why untouchable."""
        by_class = self.classes()
        parent = {s.name: s.name for s in self.sources}

        def find(x):
            while parent[x] != x:
                x = parent[x]
            return x

        for members in by_class.values():
            names = {self.source_of(e).name for e in members}
            first = next(iter(names))
            for n in names:
                parent[find(n)] = find(first)
        groups: dict[str, dict] = {}
        for s in self.sources:
            g = groups.setdefault(find(s.name), {"sources": [], "channels": 0, "reasons": set()})
            g["sources"].append(s.name)
        for cls, members in by_class.items():
            g = groups[find(self.source_of(members[0]).name)]
            g["channels"] += 1
            if cls in self.untouchable:
                g["reasons"].add(self.untouchable[cls])
        return [{"sources": g["sources"], "channels": g["channels"],
                 "untouchable": sorted(g["reasons"])} for g in groups.values()]


class State:
    """Mutable working state of one analysis run (the rules write into it)."""

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, tuple],
                 ranks: dict[str, int] | None = None, store: TensorStore | None = None,
                 dims: dict[str, tuple[int | None, ...]] | None = None) -> None:
        self.model = model
        self.index = GraphIndex(model.graph)
        self.ids = node_ids(model.graph)
        self.shapes = shapes
        self.ranks = ranks or {}
        self.dims = dims or {}
        self.store = store if store is not None else TensorStore(Path("."))  # inline values only
        self.parent: list[int] = []
        self.layouts: dict[str, Layout] = {}
        self.actions: list[Edit] = []
        self.sources: list[Source] = []
        self.blocked: dict[int, str] = {}  # element -> reason (resolved to classes at the end)

    def new_elements(self, node: int, op: str, count: int) -> np.ndarray:
        first = len(self.parent)
        self.parent.extend(range(first, first + count))
        self.sources.append(Source(node, self.ids[node], op, first, count))
        return np.arange(first, first + count)

    def find(self, e: int) -> int:
        while self.parent[e] != e:
            self.parent[e] = self.parent[self.parent[e]]
            e = self.parent[e]
        return e

    def unite(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def block(self, elems, reason: str) -> None:
        for e in np.asarray(elems).tolist():
            self.blocked.setdefault(int(e), reason)

    def constant(self, name: str) -> np.ndarray | None:
        """Values of a constant input (initializer or Constant node, also through Identity,
        Transpose or a float Cast) as the node sees them, read through the store; else None."""
        src = self.index.resolve(name) if name else None
        if src is None:
            tensor = self.index.initializers.get(name)
            node = self.index.constant_nodes.get(name)
            if tensor is None and node is not None:
                tensor = node.attribute[0].t
            return None if tensor is None else self.store.read(tensor)
        return to_effective(self.store.read(self.index.constant(src)), src.steps)

    def rank(self, name: str) -> int | None:
        if name in self.layouts:
            return self.layouts[name].rank
        shape = self.shapes.get(name)
        return len(shape) if shape is not None else self.ranks.get(name)
