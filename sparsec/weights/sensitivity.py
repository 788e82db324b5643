"""Per-layer sensitivity for --min-similarity: prune one weight at a time, measure the output change.

Analysis only (the graph is never edited). The calibration samples are split: the first three quarters
fit the masks (Wanda's norms), the last quarter (at least one sample) is held back and only measured on.
One onnxruntime session serves every measurement: the measured weights become graph inputs, so a layer's
pruned weight is fed in place of its dense one (one run over the held-back samples per layer, no new
session). Masks are magnitude or Wanda masks without re-calibration; SparseGPT is measured with Wanda's
mask (its weight update only lowers the error), and the final model is checked again after pruning.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx

from sparsec.core.graph_index import GraphIndex
from sparsec.core.options import NMPattern
from sparsec.core.tensors import TensorStore
from sparsec.errors import SparsecError
from sparsec.runtime.calib_data import CalibrationData
from sparsec.runtime.session import session_on_store, session_with_values
from sparsec.weights.masks import count_nonzero, non_finite_reason
from sparsec.weights.prune_weights import prune_values
from sparsec.weights.scores import magnitude, wanda
from sparsec.weights.selection import PruneTarget

HELD_BACK = 4  # the last 1/HELD_BACK of the calibration samples is held back for measuring


@dataclass(frozen=True)
class HeldBack:
    """The held-back calibration samples, in memory as feeds (`counts`: samples in each feed)."""

    feeds: list[dict[str, np.ndarray]]
    counts: list[int]
    fit_samples: int  # the samples before them (masks and statistics are fitted on these)

    @property
    def samples(self) -> int:
        return sum(self.counts)


def split_calibration(data: CalibrationData, batch: int) -> tuple[CalibrationData, HeldBack]:
    """The first samples (to fit on) and the last quarter, at least one sample (to measure on)."""
    n = data.num_samples
    if n < 2:
        raise SparsecError(f"--min-similarity needs at least 2 calibration samples, got {n}",
                           "the last quarter is held back to measure on; give more (e.g. --calib-random 32)")
    fit = n - max(1, n // HELD_BACK)
    feeds, counts, done = [], [], 0
    for count, feed in data.sized_batches(batch):
        start = max(0, fit - done)
        if start < count:  # a batch holds its samples on axis 0 (one sample per feed otherwise)
            feeds.append(feed if start == 0 else {k: a[start:] for k, a in feed.items()})
            counts.append(count - start)
        done += count
    return data.head(fit), HeldBack(feeds, counts, fit)


def similarity(dense: list[list[np.ndarray]], other: list[list[np.ndarray]], counts: list[int]) -> float:
    """Cosine similarity of the outputs, flattened per sample, averaged over samples and outputs
    (two zero outputs count as equal, one zero output as orthogonal)."""
    cosines = []
    for count, ref, out in zip(counts, dense, other, strict=True):
        for a, b in zip(ref, out, strict=True):
            rows = count if a.ndim and a.shape[0] == count else 1
            a64 = np.asarray(a, np.float64).reshape(rows, -1)
            b64 = np.asarray(b, np.float64).reshape(rows, -1)
            na, nb = np.linalg.norm(a64, axis=1), np.linalg.norm(b64, axis=1)
            dot = np.einsum("ij,ij->i", a64, b64)
            both_zero = (na == 0) & (nb == 0)
            cos = np.where(both_zero, 1.0, dot / np.maximum(na * nb, np.finfo(np.float64).tiny))
            cosines.extend(np.nan_to_num(cos, nan=0.0).tolist())
    return float(np.mean(cosines)) if cosines else 1.0


def run_outputs(session, held: HeldBack, extra: dict[str, np.ndarray] | None = None
                ) -> list[list[np.ndarray]]:
    """Every graph output of `session` on every held-back feed (plus `extra` feeds, e.g. weights)."""
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return [session.run(names, {k: v for k, v in {**feed, **(extra or {})}.items() if k in wanted})
            for feed in held.feeds]


def graph_outputs(model: onnx.ModelProto, store: TensorStore, held: HeldBack) -> list[list[np.ndarray]]:
    """The graph as it is now (pending rewrites included) on the held-back samples."""
    return run_outputs(session_on_store(model, store), held)


class WeightSwap:
    """One session on the graph with the given weights turned into graph inputs."""

    def __init__(self, model: onnx.ModelProto, store: TensorStore, targets: list[PruneTarget]) -> None:
        index = GraphIndex(model.graph)
        self.tensors = {t.weight: index.constant(t.layer.source) for t in targets}
        self.dense = {w: np.require(store.read(t), requirements="C") for w, t in self.tensors.items()}
        keys = {t.layer.source.key: t.weight for t in targets}
        light = copy.deepcopy(model)
        kept_nodes = [n for n in light.graph.node if not (n.op_type == "Constant" and n.output[0] in keys)]
        del light.graph.node[:]
        light.graph.node.extend(kept_nodes)
        inits = [t for t in light.graph.initializer if t.name not in keys]
        del light.graph.initializer[:]
        self.names = {}
        for key, weight in keys.items():
            tensor = self.tensors[weight]
            light.graph.input.append(onnx.helper.make_tensor_value_info(key, tensor.data_type,
                                                                        list(tensor.dims)))
            self.names[weight] = key
        self.session = session_with_values(light, inits, store)

    def feeds(self, replaced: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Every swappable weight: its dense value, or the one in `replaced` (by weight)."""
        return {self.names[w]: (replaced or {}).get(w, a) for w, a in self.dense.items()}


def pruned_value(target: PruneTarget, stored: np.ndarray, nm: NMPattern | None, sparsity: float | None,
                 group: str, score) -> np.ndarray:
    """The stored weight as the weights stage's magnitude/Wanda pass would leave it (not QDQ)."""
    return prune_values(target.layer, stored, nm, sparsity, group, score)[0]


@dataclass(frozen=True)
class Sensitivity:
    """One weight's measured effect: the held-back similarity with only it pruned."""

    weight: str
    layers: tuple[str, ...]
    macs_saved: float
    similarity: float

    @property
    def sensitivity(self) -> float:
        return max(0.0, 1.0 - self.similarity)


def measurable(targets: list[PruneTarget], store: TensorStore, model: onnx.ModelProto
               ) -> tuple[list[PruneTarget], dict[str, str]]:
    """The targets the swap session can measure, and why the others cannot be (left dense)."""
    index, ok, why = GraphIndex(model.graph), [], {}
    for t in targets:
        if t.layer.source.dequant is not None:
            why[t.weight] = "QDQ weight: --min-similarity does not measure it, so it stays dense"
        elif (bad := non_finite_reason(store.read(index.constant(t.layer.source)))) is not None:
            why[t.weight] = bad
        else:
            ok.append(t)
    return ok, why


def measure(swap: WeightSwap, held: HeldBack, targets: list[PruneTarget], pruned: dict[str, np.ndarray],
            macs: dict[str, int | None]) -> tuple[list[list[np.ndarray]], list[Sensitivity]]:
    """The dense outputs and, per target, the similarity with only that weight pruned."""
    dense = run_outputs(swap.session, held, swap.feeds())
    rows = []
    for t in targets:
        before, after = count_nonzero(swap.dense[t.weight]), count_nonzero(pruned[t.weight])
        removed = (before - after) / max(before, 1)
        saved = sum(float(macs.get(la.name) or la.params) * removed for la in t.layers)
        outs = run_outputs(swap.session, held, swap.feeds({t.weight: pruned[t.weight]}))
        rows.append(Sensitivity(t.weight, tuple(la.name for la in t.layers), saved,
                                similarity(dense, outs, held.counts)))
    return dense, rows


def score_fn(method: str, stats) -> object:
    """Magnitude for magnitude; Wanda's score for wanda and sparsegpt (its mask stands in)."""
    if method == "magnitude":
        return magnitude
    return wanda({n: s.sumsq for n, s in stats.layers.items()})
