"""Plan transformer pruning: which heads and FFN neurons go, and what the cost model says.

Head importance is the head's contribution to the block output, ‖X_h·W_o[h]‖ averaged over
calibration data: from the Gram matrix of the output projection's input,
tr(W_o[h]ᵀ·G_hh·W_o[h])/n. Without calibration data the proxy ‖W_v[:, h]‖·‖W_o[h]‖ is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from sparsec.core.layers import find_layers
from sparsec.core.tensors import TensorStore
from sparsec.core.twins import ZeroingStore
from sparsec.errors import SparsecError
from sparsec.runtime.calib_data import input_specs
from sparsec.runtime.calibrate import collect_stats
from sparsec.runtime.kv_cache import plan_cache_fill
from sparsec.transformer.attention import AttentionAnalysis, AttentionBlock, find_attention
from sparsec.transformer.projection_walk import part_columns


@dataclass(frozen=True)
class HeadPlan:
    analysis: AttentionAnalysis
    removed: dict[str, tuple[int, ...]]  # block (Softmax) name -> heads to remove
    scores: dict[str, list[float]]
    basis: str  # "calibration" or "weights"


def head_scores(model: onnx.ModelProto, store: TensorStore, analysis: AttentionAnalysis,
                settings=None) -> tuple[dict[str, np.ndarray], str]:
    weights = {t.name: t for t in model.graph.initializer}
    grams = {}
    if settings is not None:
        layers = {la.node_index: la for la in find_layers(model).layers}
        o_layers = [layers[b.o.matmul] for b in analysis.blocks if b.o.matmul in layers]
        stats = collect_stats(model, store, o_layers, settings, {la.name for la in o_layers})
        grams = {la.node_index: stats.layers[la.name] for la in o_layers}
    scores = {}
    for b in analysis.blocks:
        w_o = np.asarray(store.read(weights[b.o.weight]), dtype=np.float64)
        d = b.head_dim
        if b.o.matmul in grams:
            s = grams[b.o.matmul]
            g = s.gram / max(s.rows, 1)
            scores[b.name] = np.array([np.sqrt(max(np.trace(w_o[h*d:(h+1)*d].T @ g[h*d:(h+1)*d, h*d:(h+1)*d]
                                                           @ w_o[h*d:(h+1)*d]), 0.0))
                                       for h in range(b.heads)])
        elif getattr(b, "fused", False):  # V is the last third of the fused weight
            w_v = np.asarray(store.read(weights[b.q.weight]), dtype=np.float64)[:, 2 * b.heads * d:]
            scores[b.name] = np.array([np.linalg.norm(w_v[:, h * d:(h + 1) * d])
                                       * np.linalg.norm(w_o[h * d:(h + 1) * d]) for h in range(b.heads)])
        else:
            w_v = np.asarray(store.read(weights[b.v.weight]), dtype=np.float64)
            w_v = w_v[:, slice(*part_columns(b.v, w_v.shape[1]))]  # V's third of a fused QKV weight
            group = b.heads // b.kv_heads
            scores[b.name] = np.array([np.linalg.norm(w_v[:, (h // group)*d:(h // group + 1)*d])
                                       * np.linalg.norm(w_o[h*d:(h+1)*d]) for h in range(b.heads)])
    return scores, "calibration" if grams else "weights"


def choose_heads(scores: dict[str, np.ndarray], ratio: float, per_layer: int | None,
                 groups: dict[str, int] | None = None) -> dict[str, tuple]:
    """Global ranking (scores normalised per layer), at least one head kept per layer;
    `per_layer` instead keeps exactly that many heads in every layer.

    With grouped-query attention a K/V head is repeated for a fixed number of query heads, so
    the unit is the whole group: its query heads and its K/V head go together.
    """
    groups = groups or {}
    if any(g > 1 for g in groups.values()):
        sizes = {n: groups.get(n, 1) for n in scores}
        grouped = {n: s.reshape(-1, sizes[n]).sum(1) for n, s in scores.items()}
        per_group = None if per_layer is None else {n: -(-per_layer // sizes[n]) for n in scores}
        chosen = {n: _choose_units({n: grouped[n]}, ratio, per_group[n] if per_group else None)[n]
                  for n in scores} if per_layer is not None else _choose_units(grouped, ratio, None)
        return {n: tuple(h for g in chosen[n] for h in range(g * sizes[n], (g + 1) * sizes[n]))
                for n in scores}
    return _choose_units(scores, ratio, per_layer)


def _choose_units(scores: dict[str, np.ndarray], ratio: float, per_layer: int | None) -> dict[str, tuple]:
    if per_layer is not None:
        return {n: tuple(sorted(np.argsort(s, kind="stable")[: max(len(s) - per_layer, 0)].tolist()))
                for n, s in scores.items()}
    units = [(float(s[h] / (s.mean() or 1.0)), n, h) for n, s in scores.items() for h in range(len(s))]
    target = int(round(ratio * len(units)))
    kept = {n: len(s) for n, s in scores.items()}
    removed: dict[str, list[int]] = {n: [] for n in scores}
    for _, n, h in sorted(units):
        if sum(len(v) for v in removed.values()) >= target:
            break
        if kept[n] > 1:
            removed[n].append(h)
            kept[n] -= 1
    return {n: tuple(sorted(v)) for n, v in removed.items()}


def plan_heads(model, store, ratio: float | None, per_layer: int | None, settings=None) -> HeadPlan:
    _refuse_kv_cache(model)
    analysis = find_attention(model)
    if not analysis.blocks:
        reasons = "; ".join(f"{n}: {r}" for n, r in analysis.unexplained[:3]) or "no Softmax"
        raise SparsecError(f"--heads: no attention block found ({reasons})",
                           "sparsec inspect lists what it sees")
    scores, basis = head_scores(model, store, analysis, settings)
    groups = {b.name: b.heads // b.kv_heads for b in analysis.blocks}
    removed = choose_heads(scores, ratio or 0.0, per_layer, groups)
    return HeadPlan(analysis, removed, {n: s.tolist() for n, s in scores.items()}, basis)


def masked_heads(model: onnx.ModelProto, store: ZeroingStore, blocks: tuple[AttentionBlock, ...],
                 removed: dict[str, tuple[int, ...]]) -> None:
    """The head oracle, on a masked twin: the removed heads' output rows read as zero."""
    inits = {t.name: t for t in model.graph.initializer}
    for b in blocks:
        heads = removed.get(b.name, ())
        rows = [r for h in heads for r in range(h * b.head_dim, (h + 1) * b.head_dim)]
        if rows:
            store.zero(inits[b.o.weight], 0, rows)


def cost_model(blocks, ffn_width: dict[str, int], batch: int, seq: int | dict[str, int], hidden: int,
               removed: dict[str, tuple[int, ...]] | None = None) -> int:
    """Σ over layers of B·L·(4·E·E_attn + 2·E·F) + 2·B·L²·E_attn (12BLE² + 2BL²E when dense);
    `seq` may give each layer its own token count (token pruning)."""
    total = 0
    lengths = seq
    for b in blocks:
        seq = lengths[b.name] if isinstance(lengths, dict) else lengths
        heads = b.heads - len((removed or {}).get(b.name, ()))
        width = heads * b.head_dim
        ffn = ffn_width.get(b.name, 4 * hidden)
        total += batch * seq * (4 * hidden * width + 2 * hidden * ffn) + 2 * batch * seq * seq * width
    return total


def _refuse_kv_cache(model) -> None:
    """Removing a K/V head changes the shape of the cache a decoder reads and writes (every caller's
    cache buffers): refused, named, rather than writing a model whose cache no longer fits."""
    try:
        fill = plan_cache_fill(input_specs(model))
    except SparsecError:  # an input without a tensor shape: not a decoder's cache
        return
    if fill is not None:
        spec = fill.past[0][0]
        dims = ", ".join(str(d) for d in spec.shape)
        raise SparsecError(f"--heads on a decoder with a KV cache ({spec.name} [{dims}]): removing heads "
                           "would change the cache inputs' and outputs' shapes, which sparsec does not do",
                           "use --ffn and --nm/--sparsity on decoders")
