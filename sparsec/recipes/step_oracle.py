"""Each step's own oracle for the steps that keep the graph's structure (fold-bn, weights, precision):
the graph right after the step against the graph right before it, each run once in onnxruntime on the
same small random inputs (drawn once per compile, reused by every step). The outputs after one step
are the next step's reference, so a compile runs each graph once."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from sparsec.core.graph import TWO_GB
from sparsec.core.tensors import TensorStore, values_bytes
from sparsec.errors import SparsecError
from sparsec.runtime.session import make_session_from_proto, random_feeds, run_checked, session_on_store
from sparsec.runtime.verify import compare_outputs

FOLD_RTOL = 1e-4  # BatchNorm folding is exact up to float32 rounding
PERMUTE_RTOL = 1e-5  # a channel permutation only reorders float32 sums
AGAINST = "the graph before this step, same random inputs"


@dataclass
class StepOracle:
    """The shared feeds and the outputs of the graph as the last step left it (None: not run yet)."""

    fixed: dict
    seed: int
    ranges: dict
    feeds: dict[str, np.ndarray] | None = None
    names: list[str] = field(default_factory=list)
    reference: list[np.ndarray] | str | None = None  # outputs, or why the graph could not run

    def outputs(self, model: onnx.ModelProto, store: TensorStore | None = None) -> list[np.ndarray] | str:
        """The model's outputs on the shared feeds, or one line saying why it could not run. With
        `store`, the live graph runs on the store's values (no copy of the model, any size)."""
        # over 2 GB, onnxruntime's own copy of the weights would come on top of the rewritten ones:
        # no in-memory oracle (and no copy made to find that out)
        if (model.ByteSize() if store is None else values_bytes(model.graph)) >= TWO_GB:
            return "the graph is over 2 GB: no in-memory step oracle (the final verify still runs)"
        try:
            session = make_session_from_proto(model) if store is None else session_on_store(model, store)
            if self.feeds is None:
                self.feeds = random_feeds(session, self.fixed, self.seed, ranges=self.ranges)
                self.names = [o.name for o in session.get_outputs()]
            return [np.asarray(o) for o in run_checked(session, self.names, self.feeds, "the step oracle")]
        except SparsecError as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
            return " ".join(str(exc).split())[:200]

    def before(self, snapshot) -> list[np.ndarray] | str:
        """The reference outputs (the graph before the step), run now if no step left them."""
        if self.reference is None:
            got = snapshot()  # a self-contained copy, or (model, store) of the live graph
            self.reference = self.outputs(*got) if isinstance(got, tuple) else self.outputs(got)
        return self.reference

    def check(self, before: list[np.ndarray] | str, model: onnx.ModelProto,
              store: TensorStore | None = None) -> dict:
        """Run the graph after the step, compare with `before`, keep its outputs for the next step."""
        after = self.outputs(model, store)
        self.reference = after
        if isinstance(before, str) or isinstance(after, str):
            return {"skipped": before if isinstance(before, str) else after, "against": AGAINST}
        diffs = compare_outputs(before, after, self.names)
        informative = [d for d in diffs if not d.degenerate] or list(diffs)
        return {"max_abs_diff": max((d.max_abs_diff for d in diffs), default=0.0),
                "max_rel_diff": max((d.max_abs_diff / max(d.max_abs_dense, 1.0) for d in diffs), default=0.0),
                "cosine": min((d.cosine for d in informative), default=1.0),
                "against": AGAINST}

    def forget(self) -> None:
        """A structural step changed the graph outside this oracle: the next step runs it again."""
        self.reference = None
