"""Convert the pruned model to fp16 or bf16: TensorRT's sparse kernels need one of them."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from sparsec.core.pipeline import PassContext, PassResult
from sparsec.runtime.precision import convert_precision


@dataclass
class PrecisionPass:
    """Replace the model by its fp16/bf16 conversion (graph inputs and outputs stay fp32)."""

    precision: str
    name: str = "precision"
    requires: frozenset[str] = frozenset()

    def run(self, ctx: PassContext) -> PassResult:
        ctx.store.materialize(ctx.model)  # the converter needs every value in memory
        ctx.facts["model_before_precision"] = ctx.model  # verify measures the conversion drift
        with warnings.catch_warnings():  # the converter warns per clamped value; we report drift
            warnings.simplefilter("ignore", UserWarning)
            ctx.model = convert_precision(ctx.model, self.precision)
        return PassResult(self.name, True, {"precision": self.precision})
