"""Which found layers a compile prunes, and the reason for every one it leaves dense.

Pure analysis over a LayerAnalysis and the options.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sparsec.core.layers import Layer, LayerAnalysis, Skipped
from sparsec.core.options import CompileOptions
from sparsec.weights.lm_head import LM_HEAD_KIND


@dataclass(frozen=True)
class PruneTarget:
    """One stored weight to prune, with every layer that reads it (same layout)."""

    layers: tuple[Layer, ...]

    @property
    def weight(self) -> str:
        return self.layers[0].weight

    @property
    def layer(self) -> Layer:
        return self.layers[0]


def nm_skip_reason(layer: Layer, m: int, everywhere: bool = False) -> str | None:
    """Why an N:M pattern does not go on this layer, or None when it does.

    By default only layers TensorRT's sparse tensor cores run go sparse: Conv with group 1
    and Gemm/MatMul, with the reduction dimension divisible by M.
    """
    if not everywhere:
        if layer.op == "Conv" and layer.groups > 1:
            kind = "depthwise" if layer.shape[1] == 1 else "grouped"
            return (f"{kind} Conv (group={layer.groups}) has no TensorRT sparse kernels;"
                    " --nm-everywhere prunes it anyway")
        if layer.op == "ConvTranspose":
            return "ConvTranspose has no TensorRT sparse kernels; --nm-everywhere prunes it anyway"
    k = layer.reduction_dim
    if layer.op == "ConvTranspose" and layer.groups > 1:
        k = k // layer.groups
    if k % m:
        return f"reduction dimension {k} is not divisible by {m}"
    return None


def select_targets(
    analysis: LayerAnalysis, options: CompileOptions, lm_heads: dict[str, str] | None = None
) -> tuple[list[PruneTarget], list[Skipped]]:
    """Split the analysis into weights to prune and layers left dense (with reasons); `lm_heads`
    (weight -> logits output, `lm_head.lm_head_layers`) stay dense unless --prune-lm-head."""
    include = re.compile(options.include) if options.include else None
    exclude = re.compile(options.exclude) if options.exclude else None
    targets: list[PruneTarget] = []
    skipped: list[Skipped] = list(analysis.skipped)
    for weight, users in analysis.by_weight().items():
        reason, kind = _reason(users, options, include, exclude)
        if reason is None and weight in (lm_heads or {}) and not options.prune_lm_head:
            reason, kind = (f"LM head (writes {lm_heads[weight]}): left dense like the embeddings; "
                            "--prune-lm-head prunes it"), LM_HEAD_KIND
        if reason is None:
            targets.append(PruneTarget(tuple(users)))
        else:
            skipped.extend(Skipped(u.name, u.op, weight, reason, kind) for u in users)
    return targets, skipped


def _reason(users, options, include, exclude) -> tuple[str | None, str]:
    names = [u.name for u in users]
    if include is not None and not any(include.search(n) for n in names):
        return f"not matched by --include {include.pattern!r}", "--include"
    if exclude is not None and any(exclude.search(n) for n in names):
        return f"excluded by --exclude {exclude.pattern!r}", "--exclude"
    if not options.prunes_weights and not options.structured:
        return "no --nm or --sparsity given: the compile only folds BatchNormalization", "no pattern"
    layer = users[0]
    if layer.params < options.min_params:
        return (f"too small: {layer.params} weights < --min-params {options.min_params}",
                f"below --min-params {options.min_params}")
    if options.nm is not None:
        return nm_skip_reason(layer, options.nm.m, options.nm_everywhere), f"not {options.nm}-able"
    return None, ""


def nothing_pruned(analysis: LayerAnalysis, targets: list[PruneTarget], skipped: list[Skipped]
                   ) -> str | None:
    """One line saying why a weight-pruning compile has nothing to prune, or None."""
    if targets:
        return None
    counts: dict[str, int] = {}
    for s in skipped:
        counts[s.kind] = counts.get(s.kind, 0) + 1
    if not counts:
        return ("nothing pruned: the model has no Conv, ConvTranspose, Gemm or MatMul with a "
                "constant weight")
    why = ", ".join(f"{kind}: {n}" for kind, n in counts.items())
    return f"nothing pruned: 0 of {sum(counts.values())} layers prunable ({why})"


def depth_levels(model, targets: list[PruneTarget]) -> list[list[PruneTarget]]:
    """Targets grouped by how many target layers lie on the longest path before them.

    Sequential calibration runs once per level, so the number of onnxruntime passes is the
    number of levels, not of layers (q, k and v of one attention block share a level).
    """
    target_nodes = {t.layer.node_index: t for t in targets}
    depth: dict[str, int] = {}
    level_of: dict[str, int] = {}
    for i, node in enumerate(model.graph.node):
        before = max((depth.get(name, 0) for name in node.input if name), default=0)
        if i in target_nodes:
            level_of[target_nodes[i].weight] = before
            before += 1
        for out in node.output:
            depth[out] = before
    levels: dict[int, list[PruneTarget]] = {}
    for t in targets:
        levels.setdefault(level_of[t.weight], []).append(t)
    return [levels[k] for k in sorted(levels)]
