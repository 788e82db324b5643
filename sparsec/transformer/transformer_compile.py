"""`--heads` / `--ffn`: plan, passes, oracle and report section of a transformer compile."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from sparsec.channels.channel_analysis import analyse_channels
from sparsec.channels.prune_channels import PruneChannelsPass
from sparsec.channels.structured import StructuredPlan, plan_structured
from sparsec.core.options import ChannelsOptions, TransformerOptions
from sparsec.core.shapes import infer_dims
from sparsec.core.tensors import TensorStore
from sparsec.core.twins import ZeroingStore, masked_twin
from sparsec.errors import SparsecError
from sparsec.runtime.observe import observe_shapes, settled_dims
from sparsec.transformer.attention import find_attention
from sparsec.transformer.prune_heads import PruneHeadsPass
from sparsec.transformer.prune_tokens import PruneTokensPass
from sparsec.transformer.transformer_plan import HeadPlan, cost_model, masked_heads, plan_heads

FFN_OPS = ("MatMul", "Gemm")


@dataclass(frozen=True)
class TransformerPlan:
    heads: HeadPlan | None
    ffn: StructuredPlan | None
    tokens: tuple[float, int] | None = None  # (keep, after layer)
    batch_seq: tuple[int, int] | None = None  # B and L at the first attention layer's input (dense model)
    blocks: tuple = ()  # attention blocks of the dense model
    ffn_sources: dict | None = None  # block name -> (FFN source name, width) in the dense model
    fixed: dict | None = None  # --shape, for the token pass's probe runs

    def passes(self) -> list:
        out: list = []
        if self.ffn is not None:  # first: it may insert nodes, and the heads pass re-analyses
            out.append(PruneChannelsPass(self.ffn.analysis, self.ffn.choice.removed,
                                         self.ffn.compensation.constants, name="prune-ffn"))
        if self.heads is not None:
            out.append(PruneHeadsPass(self.heads.removed))
        if self.tokens is not None:  # last: it re-finds attention in the graph as it is then
            out.append(PruneTokensPass(*self.tokens, shapes=self.fixed))
        return out

    def masked(self, model: onnx.ModelProto, store: TensorStore
               ) -> tuple[onnx.ModelProto, ZeroingStore] | None:
        """The oracle: removed neurons' filters and removed heads' output rows set to zero, as a twin
        that shares the model's values (sparsec.core.twins.masked_twin). Token pruning changes what
        every later layer sees: there is no masked twin then."""
        if self.tokens is not None:
            return None
        if self.ffn is None:
            masked, zeroing = masked_twin(model, store)
        else:
            masked, zeroing = self.ffn.compensation.masked, self.ffn.compensation.store
        if self.heads is not None:
            masked_heads(masked, zeroing, self.heads.analysis.blocks, self.heads.removed)
        return masked, zeroing


def plan_transformer(model: onnx.ModelProto, store: TensorStore, options: TransformerOptions, fixed: dict,
                     settings=None, *, ffn_shape: ChannelsOptions | None = None, seed: int = 0,
                     ranges: dict | None = None) -> TransformerPlan:
    """Heads, FFN neurons and tokens to remove; `ffn_shape` shapes the FFN's channel removal (--round-to,
    --channels-per-layer-max: CompileOptions.ffn_channels), `seed`/`ranges` its compensation inputs."""
    heads = None
    if options.heads is not None or options.heads_per_layer is not None:
        heads = plan_heads(model, store, options.heads, options.heads_per_layer, settings)
    ffn = None
    if options.ffn is not None:
        shape = ffn_shape or ChannelsOptions(channels=options.ffn)
        ffn = plan_structured(model, store, shape, fixed, settings, seed=seed, ranges=ranges,
                              ratio=options.ffn, ops=FFN_OPS, score="act" if settings is not None else "l1")
    tokens = (options.tokens, options.tokens_from) if options.tokens is not None else None
    if tokens is not None:
        count = len(find_attention(model).blocks)
        if not 1 <= options.tokens_from < count:
            raise SparsecError(f"--tokens-from {options.tokens_from}: the model has {count} attention "
                               "layers; choose one before the last", "e.g. --tokens-from 2")
    blocks = heads.analysis.blocks if heads else find_attention(model).blocks
    channels = ffn.analysis if ffn else _channel_analysis(model, store, fixed)
    return TransformerPlan(heads, ffn, tokens, _batch_seq(model, store, fixed, blocks), blocks,
                           _ffn_by_block(blocks, channels), fixed)


def _ffn_by_block(blocks, analysis) -> dict[str, tuple[str, int]]:
    """Each block's FFN: the first removable MatMul/Gemm after its output projection and before the
    next block's attention (other MatMuls, a classifier head, stay out of the table)."""
    ordered = sorted(blocks, key=lambda b: b.softmax)
    sources = sorted((s for s in analysis.sources if s.op in FFN_OPS and _is_ffn(analysis, s)),
                     key=lambda s: s.node)
    found = {}
    for k, b in enumerate(ordered):
        end = min((ordered[k + 1].q.matmul, ordered[k + 1].softmax)) if k + 1 < len(ordered) else None
        inside = [s for s in sources if s.node > b.o.matmul and (end is None or s.node < end)]
        if inside:
            found[b.name] = (inside[0].name, inside[0].channels)
    return found


def _batch_seq(model: onnx.ModelProto, store: TensorStore, fixed: dict, blocks) -> tuple[int, int] | None:
    """B and L of the [B, L, E] tensor the first attention layer projects: the token count, which for
    an image model is not any input dim (patches + CLS)."""
    if not blocks:
        return None
    first = min(blocks, key=lambda b: b.softmax)
    name = model.graph.node[first.q.matmul].input[0]
    dims = infer_dims(model, fixed).get(name)
    if dims is None or len(dims) < 2 or None in (dims[0], dims[-2]):
        dims = observe_shapes(model, store, fixed, [name]).get(name)
    return (int(dims[0]), int(dims[-2])) if dims is not None and len(dims) >= 3 else None


def transformer_section(plan: TransformerPlan, model: onnx.ModelProto, store: TensorStore,
                        fixed: dict) -> dict:
    """Per block heads and FFN width before/after, and the transformer cost model."""
    blocks = plan.blocks or (plan.heads.analysis.blocks if plan.heads else find_attention(model).blocks)
    removed = plan.heads.removed if plan.heads else {}
    by_block = plan.ffn_sources or {}
    kept = plan.ffn.choice.kept_per_source if plan.ffn else {}
    weights = {t.name: t for t in model.graph.initializer}
    hidden = int(weights[blocks[0].q.weight].dims[0]) if blocks else 0
    first = next(iter(fixed.values()), (1, 1))
    batch, seq = plan.batch_seq or ((first[0], first[1]) if len(first) >= 2 else (1, 1))
    ffn_before = {n: width for n, (_, width) in by_block.items()}
    ffn_after = {n: kept.get(source, width) for n, (source, width) in by_block.items()}
    ordered = sorted(blocks, key=lambda b: b.softmax)
    short = -(-int(plan.tokens[0] * seq * 1_000_000) // 1_000_000) if plan.tokens else seq
    tokens_after = {b.name: (max(short, 1) if plan.tokens and k >= plan.tokens[1] else seq)
                    for k, b in enumerate(ordered)}
    rows = [{"block": b.name, "heads_before": b.heads, "heads_after": b.heads - len(removed.get(b.name, ())),
             "head_dim": b.head_dim, "ffn_before": ffn_before.get(b.name), "ffn_after": ffn_after.get(b.name),
             "tokens_before": seq, "tokens_after": tokens_after[b.name]}
            for b in ordered]
    return {
        "blocks": rows,
        "head_scores": plan.heads.basis if plan.heads else None,
        "unexplained": [{"node": n, "reason": r} for n, r in
                        (plan.heads.analysis.unexplained if plan.heads else ())],
        "cost_model": {"formula": "sum over layers of B*L*(4*E*E_attn + 2*E*F) + 2*B*L^2*E_attn "
                                  "(12*B*L*E^2 + 2*B*L^2*E when dense, F = 4E)",
                       "batch": batch, "seq": seq, "hidden": hidden,
                       "before": cost_model(blocks, ffn_before, batch, seq, hidden),
                       "after": cost_model(blocks, ffn_after, batch, tokens_after, hidden, removed)},
    }


def _channel_analysis(model: onnx.ModelProto, store: TensorStore, fixed: dict):
    dims = settled_dims(model, store, fixed)
    shapes = {name: d for name, d in dims.items() if None not in d}
    return analyse_channels(model, shapes, {name: len(d) for name, d in dims.items()}, store, dims)


def _is_ffn(analysis, source) -> bool:
    """A MatMul/Gemm whose output channels may be removed: in a transformer, an FFN's hidden layer."""
    return any(int(analysis.root[e]) not in analysis.untouchable
               for e in range(source.first, source.first + source.channels))
