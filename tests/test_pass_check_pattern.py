"""check-pattern: an analysis pass that proves N:M holds, and fails loudly when it does not."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper
from pass_helpers import context, mlp, run_pass, targets

from sparsec.core.options import NMPattern
from sparsec.errors import SparsecError
from sparsec.weights.check_pattern import CheckPatternPass
from sparsec.weights.prune_weights import PruneWeightsPass

NM = NMPattern(2, 4)


def test_a_pruned_model_passes_unmodified():
    model = mlp()
    found = targets(model, nm=NM)
    ctx = context(model)
    run_pass(PruneWeightsPass(found, nm=NM), ctx)
    before = ctx.model.SerializeToString()
    result = run_pass(CheckPatternPass(found, NM), ctx)
    assert not result.modified and result.details == {"checked": 2}
    assert ctx.model.SerializeToString() == before


def test_a_broken_pattern_fails_loudly_naming_weight_and_layer():
    model = mlp()
    found = targets(model, nm=NM)
    ctx = context(model)
    run_pass(PruneWeightsPass(found, nm=NM), ctx)
    w2 = next(t for t in ctx.model.graph.initializer if t.name == "w2")
    values = numpy_helper.to_array(w2).copy()
    values[0:4, 5] = 1.0  # three non-zeros too many in one group of 4 along the reduction axis
    w2.CopyFrom(numpy_helper.from_array(values, "w2"))
    with pytest.raises(SparsecError, match=r"^weight w2 of fc2 breaks the 2:4 pattern after the rewrite"):
        run_pass(CheckPatternPass(found, NM), ctx)


def test_a_dense_model_fails_and_a_weight_left_dense_is_not_checked():
    model = mlp()
    found = targets(model, nm=NM)
    with pytest.raises(SparsecError, match="weight w1 of fc1 breaks the 2:4 pattern"):
        run_pass(CheckPatternPass(found, NM), context(model))
    ctx = context(model, left_dense={"w1": "NaN weight", "w2": "NaN weight"})
    assert run_pass(CheckPatternPass(found, NM), ctx).details == {"checked": 2}
    assert np.all(numpy_helper.to_array(ctx.model.graph.initializer[0]) != 0)
