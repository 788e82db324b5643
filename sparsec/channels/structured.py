"""Plan a channel-pruning compile: analyse, score, choose, and work out compensation/recovery.

Everything here reads the dense model; the passes that edit come afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from sparsec.channels.channel_analysis import analyse_channels
from sparsec.channels.channel_select import ChannelChoice, choose_channels, filter_scores
from sparsec.channels.channel_state import ChannelAnalysis, ConsumerCut
from sparsec.channels.compensation import Compensation, compute_compensation
from sparsec.core.graph_index import GraphIndex
from sparsec.core.layers import Layer, find_layers
from sparsec.core.options import ChannelsOptions
from sparsec.core.tensors import TensorStore
from sparsec.runtime.calibrate import collect_stats
from sparsec.runtime.observe import settled_dims


@dataclass(frozen=True)
class StructuredPlan:
    analysis: ChannelAnalysis
    choice: ChannelChoice
    compensation: Compensation
    score_notes: dict[str, str]
    recovery: dict[str, dict]  # consumer node id -> new dense weight (+bias delta) and errors


def consumer_layers(model: onnx.ModelProto, analysis: ChannelAnalysis) -> dict[str, Layer]:
    """Layer descriptions of the consumers that read removable channels, by node id."""
    nodes = {a.node for a in analysis.actions if isinstance(a, ConsumerCut)}
    return {la.name: la for la in find_layers(model).layers if la.name in nodes}


def plan_structured(model: onnx.ModelProto, store: TensorStore, options: ChannelsOptions,
                    fixed: dict, settings=None, *, seed: int = 0, ranges: dict | None = None,
                    ratio: float | None = None, ops: tuple[str, ...] | None = None,
                    score: str | None = None) -> StructuredPlan:
    """Channels to remove; `ratio`/`ops`/`score` override the options (used for --ffn); `seed` and
    `ranges` (--calib-range) draw the compensation's random inputs."""
    dims = settled_dims(model, store, fixed)
    shapes = {name: d for name, d in dims.items() if None not in d}
    analysis = analyse_channels(model, shapes, {name: len(d) for name, d in dims.items()}, store, dims)
    stats = None
    score = score or options.channel_score
    consumers = consumer_layers(model, analysis)  # one find_layers for scoring and recovery
    if settings is not None and (score == "act" or options.recover):
        layers = list(consumers.values())
        stats = collect_stats(model, store, layers, settings,
                              {la.name for la in layers} if options.recover else set())
    energy = _act_energy(model, store, analysis, consumers, stats) if score == "act" else None
    scores, notes = filter_scores(model, store, analysis, score, energy)
    choice = choose_channels(analysis, scores, ratio if ratio is not None else options.channels or 0.0,
                             options.channels_per_layer_max, options.round_to, ops)
    compensation = compute_compensation(model, store, analysis, choice.removed, fixed, seed, ranges)
    recovery = _recover(model, store, analysis, consumers, choice, stats) if options.recover else {}
    return StructuredPlan(analysis, choice, compensation, notes, recovery)


def _act_energy(model, store, analysis: ChannelAnalysis, layers: dict[str, Layer], stats
                ) -> dict[int, float]:
    """Σ over consumers of ‖X_c‖² · ‖W[:, c]‖²: how much each channel feeds the next layers."""
    index = GraphIndex(model.graph)
    energy: dict[int, float] = {}
    for a in analysis.actions:
        layer = layers.get(a.node)
        if not isinstance(a, ConsumerCut) or layer is None or layer.name not in stats.layers:
            continue
        w = np.asarray(store.read(index.constant(layer.source)), dtype=np.float64)
        wnorm = (np.moveaxis(w, a.axis, 0).reshape(w.shape[a.axis], -1) ** 2).sum(1)
        for p, e in enumerate(a.layout):
            energy[e] = energy.get(e, 0.0) + float(stats.layers[layer.name].sumsq[p] * wnorm[p])
    return {e: float(np.sqrt(v)) for e, v in energy.items()}


def _recover(model, store, analysis: ChannelAnalysis, layers: dict, choice: ChannelChoice,
             stats) -> dict[str, dict]:
    """Least-squares refit of each consumer on the channels it keeps (ridge, with intercept).

    Removed inputs are predicted from kept ones, X_r ≈ X_k·T + t₀, from the calibration
    second moments; then W_k' = W_k + W_r·T and the bias gains W_r·t₀. For Gemm, MatMul and
    1×1 Conv this is the exact least-squares solution of ‖WX − W'X_k‖; for k×k Conv the same
    channel map is applied at every kernel position (per-channel Gram).
    """
    index = GraphIndex(model.graph)
    out = {}
    for a in analysis.actions:
        layer = layers.get(a.node)
        if not isinstance(a, ConsumerCut) or layer is None or stats is None or layer.name not in stats.layers:
            continue
        gone = np.array([e in choice.removed for e in a.layout])
        if not gone.any():
            continue
        s = stats.layers[layer.name]
        n = max(s.rows, 1)
        moment = np.block([[s.gram / n, s.sums[:, None] / n], [s.sums[None, :] / n, np.ones((1, 1))]])
        keep_aug = np.append(~gone, True)
        g_kk = moment[np.ix_(keep_aug, keep_aug)]
        ridge = 1e-2 * np.trace(g_kk) / len(g_kk)  # calibration sets are small: shrink T
        g_kr = moment[np.ix_(keep_aug, np.append(gone, False))]
        t = np.linalg.solve(g_kk + ridge * np.eye(len(g_kk)), g_kr)
        w = np.asarray(store.read(index.constant(layer.source)), dtype=np.float64)
        axis = a.axis
        w_moved = np.moveaxis(w, axis, -1)  # [..., K]
        refit = w_moved.copy()
        mix = w_moved[..., gone] @ t.T  # [..., kept + 1]
        refit[..., ~gone] += mix[..., :-1]
        bias = mix[..., -1]
        rows = w_moved.reshape(-1, w_moved.shape[-1])
        before = _rel_error(rows, np.where(gone, 0.0, rows), np.zeros(len(rows)), moment)
        after = _rel_error(rows, np.where(gone, 0.0, refit.reshape(rows.shape)), bias.reshape(-1), moment)
        out[a.node] = {"weight": np.moveaxis(np.where(gone, 0.0, refit), -1, axis),
                       "bias_by_position": bias, "error_before": before, "error_after": after,
                       "basis": "gram" if w.ndim == 2 or w[0, 0].size == 1 else "per-channel gram"}
    return out


def _rel_error(w: np.ndarray, w_new: np.ndarray, bias: np.ndarray, moment: np.ndarray) -> float:
    """‖W x − (W' x + b)‖/‖W x‖ over the calibration distribution (second moments)."""
    a = np.hstack([w, np.zeros((len(w), 1))])
    d = a - np.hstack([w_new, bias[:, None]])
    den = float(((a @ moment) * a).sum())
    return float(np.sqrt(max(((d @ moment) * d).sum(), 0.0) / den)) if den > 0 else 0.0
