"""N:M channel permutation, the rewrite: reorder each unit's channels before N:M masks are chosen.

`permute_search` says which units may move and searches an order per unit on the N:M-kept score
summed over the unit's N:M consumers; this pass applies the orders through the channel editor of
`prune_channels` (the same typed edits as channel removal: producer filters and biases, BatchNorm
and other per-channel constants, every coupled consumer, Concat offsets). A unit is kept only when
the kept score over every pruned layer it touches (followers included) rises. The graph computes
the same function: the compile checks it in onnxruntime before pruning.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from sparsec.channels.channel_analysis import analyse_channels
from sparsec.channels.channel_state import ConsumerCut
from sparsec.channels.permute_search import SECONDS, Unit, find_units, kept_score, search_order
from sparsec.channels.prune_channels import _Editor
from sparsec.core.graph_index import GraphIndex, to_effective
from sparsec.core.layers import Layer
from sparsec.core.names import node_ids
from sparsec.core.options import NMPattern
from sparsec.core.pipeline import PassContext, PassResult
from sparsec.runtime.observe import settled_dims
from sparsec.weights.scores import as_rows, magnitude, wanda
from sparsec.weights.selection import PruneTarget


@dataclass
class PermuteChannelsPass:
    """Search and apply N:M channel permutations (`--permute`); scores as the weights stage's:
    |W| for magnitude, |W|·‖X‖ (from `facts["calibration"]`) for wanda and sparsegpt."""

    targets: list[PruneTarget]
    nm: NMPattern
    method: str = "magnitude"
    fixed: dict = field(default_factory=dict)
    seed: int = 0
    seconds: float = SECONDS
    name: str = "permute-channels"
    requires: frozenset[str] = frozenset()

    def run(self, ctx: PassContext) -> PassResult:
        dims = settled_dims(ctx.model, ctx.store, self.fixed)
        shapes = {k: d for k, d in dims.items() if None not in d}
        analysis = analyse_channels(ctx.model, shapes, {k: len(d) for k, d in dims.items()}, ctx.store, dims)
        layers = {la.name: la for t in self.targets for la in t.layers if la.groups == 1}
        rows = _Scores(ctx, layers, self._score(ctx))
        tau = np.arange(len(analysis.root))
        done, left = [], []
        consumers = [a for a in analysis.actions if isinstance(a, ConsumerCut)]
        for unit in find_units(analysis):
            touched = [a for a in consumers if a.node in layers and _reads(a, unit)]
            if not touched:
                continue  # no N:M layer reads these channels
            if unit.reason is not None:
                left.append({"producers": list(unit.names), "reason": unit.reason})
                continue
            row = self._unit(unit, touched, rows, tau, len(done) + len(left))
            if row.pop("accepted"):
                done.append(row)
            else:
                left.append({"producers": list(unit.names), "reason": "no order found that keeps more"})
        left += _unreached(ctx.model, layers, consumers)
        applied = done
        if applied:
            editor = _Editor(ctx)
            for edit in analysis.actions:
                order = _order(np.asarray(edit.layout, dtype=np.int64), tau)
                if order is not None:
                    editor.reorder(edit, order)
        details = {"permuted": applied, "not_permuted": left,
                   "kept_score_before": sum(r["kept_score_before"] for r in applied),
                   "kept_score_after": sum(r["kept_score_after"] for r in applied)}
        return PassResult(self.name, bool(applied), details)

    def _score(self, ctx: PassContext):
        if self.method == "magnitude":
            return magnitude
        calib = ctx.facts.get("calibration")
        return wanda({n: s.sumsq for n, s in calib.layers.items()})

    def _unit(self, unit: Unit, touched: list[ConsumerCut], rows: _Scores, tau: np.ndarray, k: int) -> dict:
        """Search one unit on its aligned consumers; accept when every touched layer keeps more."""
        start = time.perf_counter()
        m, n = self.nm.m, self.nm.n
        blocks = [b for a in touched if (b := _aligned_block(a, unit, m)) is not None]
        scored = [rows.of(a)[:, off:off + unit.channels] for a, off in blocks]
        order = np.arange(unit.channels)
        if scored and unit.channels % m == 0:
            order, _, _ = search_order(np.concatenate(scored, axis=0), n, m, self.seed + k, self.seconds)
        trial = tau.copy()
        for elems in unit.elems.values():
            trial[elems] = elems[order]
        before = sum(kept_score(rows.of(a)[:, _order_or_id(a, tau)], n, m) for a in touched)
        after = sum(kept_score(rows.of(a)[:, _order_or_id(a, trial)], n, m) for a in touched)
        accepted = after > before * (1 + 1e-9)
        if accepted:
            tau[:] = trial
        return {"accepted": accepted, "producers": list(unit.names), "channels": unit.channels,
                "consumers": [a.node for a in touched], "kept_score_before": before,
                "kept_score_after": after, "gain": (after - before) / before if before else 0.0,
                "seconds": round(time.perf_counter() - start, 3)}


class _Scores:
    """Per consumer node: its scores as [rows, K] with K the reduction axis (computed once)."""

    def __init__(self, ctx: PassContext, layers: dict[str, Layer], score) -> None:
        self.ctx, self.layers, self.score, self.cache = ctx, layers, score, {}
        self.index = GraphIndex(ctx.model.graph)

    def of(self, edit: ConsumerCut) -> np.ndarray:
        if edit.node not in self.cache:
            layer = self.layers[edit.node]
            w = to_effective(self.ctx.store.read(self.index.constant(layer.source)), layer.source.steps)
            self.cache[edit.node] = as_rows(layer, self.score(layer, w)).astype(np.float32)
        return self.cache[edit.node]


def _reads(edit: ConsumerCut, unit: Unit) -> bool:
    lay = np.asarray(edit.layout, dtype=np.int64)
    return any(np.isin(e, lay).any() for e in unit.elems.values())


def _aligned_block(edit: ConsumerCut, unit: Unit, m: int) -> tuple[ConsumerCut, int] | None:
    """(edit, offset) when the consumer reads one source of the unit once, in slot order, at an offset
    divisible by M: then its N:M groups are the unit's slot groups."""
    lay = np.asarray(edit.layout, dtype=np.int64)
    for elems in unit.elems.values():
        hits = np.flatnonzero(np.isin(lay, elems))
        if len(hits) == 0:
            continue
        off = int(hits[0])
        if len(hits) == len(elems) and off % m == 0 and np.array_equal(lay[off:off + len(elems)], elems):
            return edit, off
        return None
    return None


def _order(layout: np.ndarray, tau: np.ndarray) -> np.ndarray | None:
    """Old position read by each new position: position k now carries element tau[layout[k]]
    (the same occurrence of it, for a Flatten that repeats each channel); None when unchanged."""
    target = tau[layout]
    if np.array_equal(target, layout):
        return None
    where: dict[int, list[int]] = {}
    occurrence = np.empty(len(layout), dtype=np.int64)
    for k, e in enumerate(layout.tolist()):
        seen = where.setdefault(e, [])
        occurrence[k] = len(seen)
        seen.append(k)
    return np.array([where[t][o] for t, o in zip(target.tolist(), occurrence.tolist(), strict=True)])


def _order_or_id(edit: ConsumerCut, tau: np.ndarray) -> np.ndarray:
    layout = np.asarray(edit.layout, dtype=np.int64)
    order = _order(layout, tau)
    return np.arange(len(layout)) if order is None else order


def _unreached(model, layers: dict[str, Layer], consumers: list[ConsumerCut]) -> list[dict]:
    """N:M layers whose input channels no permutable producer makes, each with the reason."""
    reading = {a.node for a in consumers}
    inputs = {i.name for i in model.graph.input}
    nodes = dict(zip(node_ids(model.graph), model.graph.node, strict=True))
    out = []
    for name in layers:
        if name in reading:
            continue
        given = [x for x in nodes[name].input if x in inputs]
        why = (f"its input channels come from graph input {given[0]}" if given else
               "its input channels come from an op the channel table does not follow (a Reshape mixing "
               "channels with space, a grouped Conv, an unknown op)")
        out.append({"layer": name, "reason": why})
    return out
