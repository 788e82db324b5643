"""`--heads` / `--ffn`: plan, passes, oracle and report section of a transformer compile."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from sparsec.options import CompileOptions
from sparsec.structured import StructuredPlan, plan_structured
from sparsec.tensors import TensorStore, inline_copy
from sparsec.transformer_plan import HeadPlan, cost_model, masked_heads, plan_heads

FFN_OPS = ("MatMul", "Gemm")


@dataclass(frozen=True)
class TransformerPlan:
    heads: HeadPlan | None
    ffn: StructuredPlan | None
    tokens: tuple[float, int] | None = None  # (keep, after layer)

    def passes(self) -> list:
        from sparsec.passes.prune_channels import PruneChannelsPass
        from sparsec.passes.prune_heads import PruneHeadsPass

        out: list = []
        if self.ffn is not None:  # first: it may insert nodes, and the heads pass re-analyses
            out.append(PruneChannelsPass(self.ffn.analysis, self.ffn.choice.removed,
                                         self.ffn.compensation.constants, name="prune-ffn"))
        if self.heads is not None:
            out.append(PruneHeadsPass(self.heads.removed))
        if self.tokens is not None:  # last: it re-finds attention in the graph as it is then
            from sparsec.passes.prune_tokens import PruneTokensPass

            out.append(PruneTokensPass(*self.tokens))
        return out

    def masked(self, model: onnx.ModelProto, store: TensorStore) -> onnx.ModelProto | None:
        """The oracle: removed neurons' filters and removed heads' output rows set to zero.
        Token pruning changes what every later layer sees: there is no masked twin then."""
        if self.tokens is not None:
            return None
        masked = onnx.ModelProto()
        masked.CopyFrom(self.ffn.compensation.masked if self.ffn else inline_copy(model, store))
        if self.heads is not None:
            masked_heads(masked, self.heads.analysis.blocks, self.heads.removed)
        return masked


def plan_transformer(model: onnx.ModelProto, store: TensorStore, options: CompileOptions, fixed: dict,
                     settings=None) -> TransformerPlan:
    heads = None
    if options.heads is not None or options.heads_per_layer is not None:
        heads = plan_heads(model, store, options.heads, options.heads_per_layer, settings)
    ffn = None
    if options.ffn is not None:
        ffn = plan_structured(model, store, options, fixed, settings, ratio=options.ffn, ops=FFN_OPS,
                              score="act" if settings is not None else "l1")
    tokens = (options.tokens, options.tokens_from) if options.tokens is not None else None
    if tokens is not None:
        from sparsec.attention import find_attention

        count = len(find_attention(model).blocks)
        if not 1 <= options.tokens_from < count:
            from sparsec.errors import SparsecError

            raise SparsecError(f"--tokens-from {options.tokens_from}: the model has {count} attention "
                               "layers; choose one before the last", "e.g. --tokens-from 2")
    return TransformerPlan(heads, ffn, tokens)


def transformer_section(plan: TransformerPlan, model: onnx.ModelProto, fixed: dict) -> dict:
    """Per block heads and FFN width before/after, and the transformer cost model."""
    from sparsec.attention import find_attention

    blocks = plan.heads.analysis.blocks if plan.heads else find_attention(model).blocks
    removed = plan.heads.removed if plan.heads else {}
    channel_analysis = plan.ffn.analysis if plan.ffn else _channel_analysis(model, fixed)
    ffn_sources = [s for s in channel_analysis.sources if s.op in FFN_OPS and _is_ffn(channel_analysis, s)]
    by_block = dict(zip([b.name for b in blocks], ffn_sources, strict=False)) \
        if len(ffn_sources) == len(blocks) else {}
    kept = plan.ffn.choice.kept_per_source if plan.ffn else {}
    weights = {t.name: t for t in model.graph.initializer}
    hidden = int(weights[blocks[0].q.weight].dims[0]) if blocks else 0
    first = next(iter(fixed.values()), (1, 1))
    batch, seq = (first[0], first[1]) if len(first) >= 2 else (1, 1)
    ffn_before = {n: s.channels for n, s in by_block.items()}
    ffn_after = {n: kept.get(s.name, s.channels) for n, s in by_block.items()}
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


def _channel_analysis(model: onnx.ModelProto, fixed: dict):
    from sparsec.channels import analyse_channels
    from sparsec.macs import infer_ranks, infer_shapes

    return analyse_channels(model, infer_shapes(model, fixed), infer_ranks(model, fixed))


def _is_ffn(analysis, source) -> bool:
    """A MatMul/Gemm whose output channels may be removed: in a transformer, an FFN's hidden layer."""
    return any(int(analysis.root[e]) not in analysis.untouchable
               for e in range(source.first, source.first + source.channels))
