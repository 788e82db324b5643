"""Each step's plan as typed data: what the analysis chose, printed as the one line `steps[].plan`
carries (`str(plan)` is `plan.summary()`)."""

from __future__ import annotations

from dataclasses import dataclass, field


class StepPlan:
    """A plan prints as its summary."""

    def summary(self) -> str:
        raise NotImplementedError

    def __str__(self) -> str:
        return self.summary()


@dataclass(frozen=True)
class TransformerStepPlan(StepPlan):
    blocks: int
    heads_removed: int
    ffn_removed: int  # FFN neurons (channel groups: a gated MLP's gate and up columns count once)
    tokens: tuple[float, int] | None = None  # (keep fraction, from layer)

    def summary(self) -> str:
        tokens = f", keep {self.tokens[0]} of the tokens after layer {self.tokens[1]}" if self.tokens else ""
        return (f"{self.blocks} attention blocks: remove {self.heads_removed} heads, {self.ffn_removed} "
                f"FFN channels{tokens}")


@dataclass(frozen=True)
class ChannelsPlan(StepPlan):
    removed: int  # channels (tied channels count once, as report.channels.removed)
    removable: int
    elements: int  # tensor channels cut (a channel tied across tensors counts in each)

    def summary(self) -> str:
        return (f"remove {self.removed} of {self.removable} removable channels "
                f"({self.elements} tensor channels)")


@dataclass(frozen=True)
class FoldBNPlan(StepPlan):
    batchnorms: int  # BatchNormalization nodes in the graph
    fold: int
    kept: list[tuple[str, str]] = field(default_factory=list)  # (node, reason)

    def summary(self) -> str:
        return f"fold {self.fold} of {self.batchnorms} BatchNormalization, keep {len(self.kept)}"


@dataclass(frozen=True)
class WeightsPlan(StepPlan):
    pattern: str  # "2:4" or "unstructured 0.5"
    method: str
    targets: int  # weight tensors to prune
    skipped: int  # layers left dense (each with its reason in report.skipped)
    owl: bool = False

    def summary(self) -> str:
        owl = " with OWL layer sparsities" if self.owl else ""
        return (f"{self.pattern} by {self.method}{owl} on {self.targets} weights, "
                f"{self.skipped} layers left dense")


@dataclass(frozen=True)
class PrecisionPlan(StepPlan):
    dtype: str
    kept_fp32: int  # nodes of ops the conversion keeps in fp32 (block list, no low-precision kernel)
    nodes: int

    def summary(self) -> str:
        return f"convert to {self.dtype}, {self.kept_fp32} of {self.nodes} nodes kept in fp32"


@dataclass(frozen=True)
class EncodePlan(StepPlan):
    tensors: int
    formats: dict[str, int] = field(default_factory=dict)
    skipped: str | None = None

    def summary(self) -> str:
        if self.skipped:
            return self.skipped
        formats = ", ".join(f"{k} {v}" for k, v in self.formats.items())
        return f"encode {self.tensors} tensors" + (f" ({formats})" if formats else "")
