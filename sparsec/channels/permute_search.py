"""N:M channel permutation, the analysis: which channel groups may be reordered, and in what order.

Which weights share an N:M group depends on the order of the reduction axis, and that order is
free: reordering a producer's output channels together with every coupled producer, per-channel
constant and consumer leaves the function unchanged. The channel analysis (`channel_analysis`)
already knows these couplings for channel removal; a *unit* here is a set of producers whose
channels are coupled (a residual Add unites them), permuted all alike.

The search (Pool & Yu's channel reallocation with RIA's assignment step): start from the current
order; each round takes one channel out of every group of M slots (seeded random choice) and puts
the taken channels back with `scipy.optimize.linear_sum_assignment` on the N:M-kept score. Putting
each channel back where it was is one assignment, so a round never lowers the score. Rounds stop
after `PATIENCE` rounds without gain, `MAX_ROUNDS`, or `SECONDS` per unit. Pure analysis.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from sparsec.channels.channel_state import ChannelAnalysis, SliceCut, Source, SplitCut

SECONDS = 2.0  # search time per unit; a bound, so a slow machine finds less gain, never a wrong graph
MAX_ROUNDS = 200
PATIENCE = 12
_CHUNK = 1 << 24  # elements of the [groups, candidates, rows] temporary per step


@dataclass(frozen=True)
class Unit:
    """Producers whose channels are coupled; `elems[s][j]` is source s's element in canonical slot j."""

    sources: tuple[Source, ...]
    elems: dict[str, np.ndarray]
    reason: str | None = None  # why it may not be permuted

    @property
    def channels(self) -> int:
        return self.sources[0].channels

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sources)


def find_units(analysis: ChannelAnalysis) -> list[Unit]:
    """Connected producers (via coupled channels), each with the reason it cannot move, if any."""
    sources = [s for s in analysis.sources if s.op != "fixed"]
    owner = np.full(len(analysis.root), -1, dtype=np.int64)
    for k, s in enumerate(sources):
        owner[s.first:s.first + s.channels] = k
    parent = list(range(len(sources)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    by_class = analysis.classes()
    for members in by_class.values():
        owners = {int(owner[e]) for e in members if owner[e] >= 0}
        first = min(owners, default=None)
        for o in owners:
            parent[find(o)] = find(first)
    comps: dict[int, list[Source]] = {}
    for k, s in enumerate(sources):
        comps.setdefault(find(k), []).append(s)
    return [_unit(analysis, members, by_class) for members in comps.values()]


def _unit(analysis: ChannelAnalysis, members: list[Source], by_class: dict[int, list[int]]) -> Unit:
    first = members[0]
    canon = analysis.root[first.first:first.first + first.channels]
    elems = {first.name: np.arange(first.first, first.first + first.channels)}
    reason = None
    for s in members[1:]:
        own = np.arange(s.first, s.first + s.channels)
        slot = {int(analysis.root[e]): int(e) for e in own}
        if s.channels != first.channels or len(slot) != s.channels or set(slot) != set(canon.tolist()):
            reason = f"channels of {s.name} and {first.name} are coupled unevenly"
            break
        elems[s.name] = np.array([slot[int(c)] for c in canon])
    unit_elems = np.concatenate(list(elems.values()))
    blocked = [analysis.untouchable[int(c)] for c in np.unique(analysis.root[unit_elems])
               if int(c) in analysis.untouchable]
    if reason is None and blocked:
        reason = blocked[0]
    if reason is None:
        reason = _partial_reason(analysis, members)
    return Unit(tuple(members), elems, reason)


def _partial_reason(analysis: ChannelAnalysis, members: list[Source]) -> str | None:
    """A Split or Slice of the channel axis, or any layout that holds part of a producer's channels."""
    for edit in analysis.actions:
        lay = np.asarray(edit.layout, dtype=np.int64)
        for s in members:
            inside = (lay >= s.first) & (lay < s.first + s.channels)
            if not inside.any():
                continue
            if isinstance(edit, SplitCut | SliceCut):
                return f"{edit.node} splits or slices the channels of {s.name}"
            if len(np.unique(lay[inside])) != s.channels:
                return f"{edit.node} reads part of the channels of {s.name}"
    return None


def kept_score(rows: np.ndarray, n: int, m: int) -> float:
    """Σ over rows and M-groups of the n largest scores: what N:M pruning keeps ([R, K], K % m == 0)."""
    g = np.sort(rows.reshape(rows.shape[0], -1, m), axis=-1)
    return float(g[..., m - n:].sum(dtype=np.float64))


def search_order(rows: np.ndarray, n: int, m: int, seed: int = 0, seconds: float = SECONDS
                 ) -> tuple[np.ndarray, float, float]:
    """An order of the K columns of `rows` ([R, K] scores) raising the N:M-kept score.

    Returns (order, score before, score after); column `order[j]` goes to slot j."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    k = rows.shape[1]
    order = np.arange(k)
    before = best = kept_score(rows, n, m)
    if k < 2 * m:
        return order, before, before
    groups = k // m
    from scipy.optimize import linear_sum_assignment  # 0.5 s of import: only when --permute runs

    rng = np.random.default_rng(seed)
    start, idle = time.perf_counter(), 0
    for _ in range(MAX_ROUNDS):
        if idle >= PATIENCE or time.perf_counter() - start > seconds:
            break
        slots = order.reshape(groups, m)
        out = rng.integers(0, m, size=groups)
        taken = slots[np.arange(groups), out]
        rest = np.stack([np.delete(row, j) for row, j in zip(slots, out, strict=True)])  # [G, m-1]
        gain = _gain(rows, rest, taken, n, m)  # [G, G]: group g with channel taken[c] added
        _, pick = linear_sum_assignment(gain, maximize=True)
        new = np.concatenate([rest, taken[pick][:, None]], axis=1).reshape(-1)
        score = kept_score(rows[:, new], n, m)
        if score > best * (1 + 1e-9) + 1e-12:
            order, best, idle = new, score, 0
        else:
            idle += 1
    return order, before, best


def _gain(rows: np.ndarray, rest: np.ndarray, taken: np.ndarray, n: int, m: int) -> np.ndarray:
    """gain[g, c]: kept score of group g's m−1 remaining channels plus channel taken[c].

    With m−1 ≥ n remaining, adding x keeps topN(rest) + max(0, x − t) where t is rest's n-th largest."""
    groups = rest.shape[0]
    part = np.sort(rows[:, rest], axis=-1)  # [R, G, m-1]
    base = part[..., m - 1 - n:].sum(axis=(0, 2), dtype=np.float64)  # [G]
    thresh = part[..., m - 1 - n].T  # [G, R]
    cand = rows[:, taken].T  # [G, R]
    out = np.empty((groups, groups), dtype=np.float64)
    step = max(1, _CHUNK // max(1, groups * rows.shape[0]))
    for lo in range(0, groups, step):
        t = thresh[lo:lo + step, None, :]
        out[lo:lo + step] = np.maximum(cand[None] - t, 0).sum(-1, dtype=np.float64)
    return out + base[:, None]
