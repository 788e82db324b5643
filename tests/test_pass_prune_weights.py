"""prune-weights: N:M and unstructured masks; kept weights bit for bit, outputs as numpy says."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import graph_lines, reference_nm_mask, run
from pass_helpers import calibration, context, mlp, mlp_numpy, run_pass, samples, targets, weights

from sparsec.core.options import NMPattern
from sparsec.core.pipeline import PassError
from sparsec.weights.calibrate_pass import CalibratePass
from sparsec.weights.prune_weights import PruneWeightsPass

NM = NMPattern(2, 4)


def test_magnitude_2_4_zeroes_exactly_the_reference_mask():
    model = mlp()
    ctx = context(model)
    result = run_pass(PruneWeightsPass(targets(model, nm=NM), nm=NM), ctx)
    assert result.modified
    assert graph_lines(ctx.model) == graph_lines(model)  # same nodes, names, edges
    dense, pruned = weights(model), weights(ctx.model)
    for name in ("w1", "w2"):  # MatMul X @ W: groups of 4 along axis 0
        keep = reference_nm_mask(dense[name], 2, 4, axis=0)
        np.testing.assert_array_equal(pruned[name], np.where(keep, dense[name], 0.0))
        assert pruned[name].dtype == dense[name].dtype and pruned[name].shape == dense[name].shape
    assert [(p.weight, p.nonzeros) for p in result.details["weights"]] == [("w1", 256), ("w2", 128)]
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    np.testing.assert_allclose(run(ctx.model, {"x": x})[0], mlp_numpy(pruned, x), rtol=1e-5, atol=1e-5)


def test_unstructured_removes_the_fraction_per_output():
    model = mlp()
    ctx = context(model)
    run_pass(PruneWeightsPass(targets(model, sparsity=0.5), sparsity=0.5), ctx)
    w1 = weights(ctx.model)["w1"]
    assert np.all((w1 == 0).sum(axis=0) == 8)  # each of the 32 outputs loses 8 of its 16 weights


def test_an_already_pruned_model_is_not_modified():
    model = mlp()
    ctx = context(model)
    run_pass(PruneWeightsPass(targets(model, nm=NM), nm=NM), ctx)
    before = ctx.model.SerializeToString()
    again = run_pass(PruneWeightsPass(targets(ctx.model, nm=NM), nm=NM), ctx)
    assert not again.modified and ctx.model.SerializeToString() == before


def test_wanda_requires_calibration_and_uses_it():
    model = mlp()
    found = targets(model, nm=NM)
    needs = r"^pass prune-weights needs calibration, which no earlier pass made$"
    with pytest.raises(PassError, match=needs):
        run_pass(PruneWeightsPass(found, nm=NM, method="wanda"), context(model))
    settings = calibration(model)
    ctx = context(model)
    run_pass(CalibratePass(found, settings), ctx)
    result = run_pass(PruneWeightsPass(found, nm=NM, method="wanda"), ctx)
    x = samples(settings).astype(np.float64)
    norm = np.sqrt((x ** 2).sum(0))
    keep = reference_nm_mask(np.abs(weights(model)["w1"]) * norm[:, None], 2, 4, axis=0)
    np.testing.assert_array_equal(weights(ctx.model)["w1"] != 0, keep)
    assert {p.method for p in result.details["weights"]} == {"wanda"}
