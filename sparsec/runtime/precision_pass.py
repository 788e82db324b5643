"""Convert the pruned model to fp16 or bf16: TensorRT's sparse kernels need one of them."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from sparsec.core.graph import TWO_GB
from sparsec.core.pipeline import PassContext, PassResult
from sparsec.core.tensors import inline_copy, values_bytes
from sparsec.runtime.precision import convert_precision
from sparsec.runtime.precision_external import convert_external

DRIFT_LIMIT = TWO_GB  # fp32 weights up to this size are kept (inlined) to measure the conversion drift


@dataclass
class PrecisionPass:
    """Replace the model by its fp16/bf16 conversion (graph inputs and outputs stay fp32).

    Weights in external data are converted one at a time (precision_external.py), never all in memory."""

    precision: str
    name: str = "precision"
    requires: frozenset[str] = frozenset()

    def run(self, ctx: PassContext) -> PassResult:
        external = ctx.store.has_external(ctx.model)
        if values_bytes(ctx.model.graph) < DRIFT_LIMIT:  # verify measures the conversion drift against it
            ctx.facts["model_before_precision"] = inline_copy(ctx.model, ctx.store) if external else ctx.model
        else:
            ctx.facts["precision_drift_skipped"] = (
                f"fp32 weights over {DRIFT_LIMIT / 2**30:g} GiB are not kept in memory to measure the "
                "conversion drift alone; verify compares the dense model with the final one")
        with warnings.catch_warnings():  # the converter warns per clamped value; we report drift
            warnings.simplefilter("ignore", UserWarning)
            if external:
                ctx.model = convert_external(ctx.model, ctx.store, self.precision)
            else:
                ctx.model = convert_precision(ctx.model, self.precision)
        return PassResult(self.name, True, {"precision": self.precision})
