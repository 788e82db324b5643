"""Per-channel first and second moments of chosen tensors over the calibration data.

Error correction (bias correction, BatchNorm re-estimation) needs the mean and variance of a layer's
output or a BatchNormalization's input per channel. The reducers of sparsec.runtime.instrument compute
them inside the graph (Σx, Σx², element count over every axis but the channel axis), batch by batch,
accumulated here in float64: host memory is O(channels), never O(activations)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from sparsec.core.shapes import infer_types
from sparsec.core.tensors import TensorStore
from sparsec.errors import SparsecError
from sparsec.runtime.calibrate import CalibrationSettings
from sparsec.runtime.instrument import StatSpec, instrumented_graph, subgraph_reads
from sparsec.runtime.observe import observe_shapes
from sparsec.runtime.session import run_checked, session_with_values

PREFIX = "sparsec_moment"


@dataclass(frozen=True)
class Moments:
    """Σx and Σx² per channel of one tensor, and how many values each channel saw."""

    sums: np.ndarray  # [C] float64
    sumsq: np.ndarray  # [C] float64
    rows: int

    @property
    def mean(self) -> np.ndarray:
        return self.sums / self.rows

    @property
    def var(self) -> np.ndarray:
        """Population variance (÷ rows), what BatchNormalization's inference formula divides by."""
        return np.maximum(self.sumsq / self.rows - self.mean ** 2, 0.0)


def channel_moments(model: onnx.ModelProto, store: TensorStore, wanted: dict[str, int],
                    settings: CalibrationSettings) -> dict[str, Moments]:
    """Moments of each tensor in `wanted` (tensor -> its channel axis, negative from the end) over every
    calibration sample, measured on `model` as it is now (one onnxruntime pass)."""
    if not wanted:
        return {}
    types = infer_types(model, settings.fixed_shapes)
    ranks = {name: rank for name, (_, rank) in types.items()}
    missing = [t for t in wanted if t not in ranks]
    if missing:  # computed shapes: ask onnxruntime once
        ranks.update({k: len(v) for k, v in observe_shapes(model, store, settings.fixed_shapes,
                                                             missing).items()})
    specs = []
    for i, (tensor, axis) in enumerate(wanted.items()):
        if tensor not in ranks:
            raise SparsecError(f"the rank of tensor {tensor} is unknown, so its statistics cannot be "
                               "collected", "give --shape for the symbolic input dims")
        base = f"{PREFIX}/{i}"
        specs.append(StatSpec(tensor, axis % ranks[tensor], 0, False, f"{base}/sumsq", f"{base}/sum",
                              f"{base}/size", None))
    graph = instrumented_graph(model, specs, ranks, {k: v[0] for k, v in types.items()})
    used = {i for n in graph.graph.node for i in [*n.input, *subgraph_reads(n)]}
    session = session_with_values(graph, [t for t in model.graph.initializer if t.name in used], store,
                                  list(settings.providers))
    names = [o.name for o in graph.graph.output]
    totals: dict[str, list] = {s.tensor: [0.0, 0.0, 0] for s in specs}
    seen = 0
    for n, feeds in settings.data.sized_batches(settings.batch):
        outs = dict(zip(names, run_checked(session, names, feeds, "the statistics graph"), strict=True))
        for s in specs:
            acc, total = totals[s.tensor], outs[s.sum_output]
            acc[0] = acc[0] + total.astype(np.float64)
            acc[1] = acc[1] + outs[s.sumsq_output].astype(np.float64)
            acc[2] += int(outs[s.size_output]) // max(total.size, 1)
        seen += n
    if seen == 0:
        raise SparsecError("calibration data yielded no samples", "check --calib")
    return {t: Moments(np.atleast_1d(a[0]), np.atleast_1d(a[1]), a[2]) for t, a in totals.items()}
