"""sparsegpt: kept weights are updated, the 2:4 pattern holds, the output error beats magnitude's."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import graph_lines, run
from pass_helpers import calibration, context, mlp, mlp_numpy, run_pass, samples, targets, weights

from sparsec.core.options import NMPattern
from sparsec.core.pipeline import PassError
from sparsec.weights.calibrate_pass import CalibratePass
from sparsec.weights.masks import satisfies_nm
from sparsec.weights.prune_weights import PruneWeightsPass
from sparsec.weights.sparsegpt_pass import SparseGPTPass

NM = NMPattern(2, 4)


def _pruned(model, prune):
    settings = calibration(model, samples=128)
    ctx = context(model)
    run_pass(CalibratePass(targets(model, nm=NM), settings, gram=True), ctx)
    return ctx, run_pass(prune, ctx), samples(settings)


def test_sparsegpt_updates_kept_weights_and_beats_magnitude_on_calibration_data():
    model = mlp()
    ctx, result, x = _pruned(model, SparseGPTPass(targets(model, nm=NM), nm=NM, block_size=8))
    magnitude, _, _ = _pruned(model, PruneWeightsPass(targets(model, nm=NM), nm=NM))
    assert result.modified and graph_lines(ctx.model) == graph_lines(model)
    dense, new = weights(model), weights(ctx.model)
    for name in ("w1", "w2"):
        assert satisfies_nm(new[name], 2, 4, 0)
        kept = new[name] != 0
        assert not np.array_equal(new[name][kept], dense[name][kept])  # OBS moved the kept weights
    assert {(p.method, p.rel_error_basis) for p in result.details["weights"]} == {("sparsegpt", "gram")}
    np.testing.assert_allclose(run(ctx.model, {"x": x})[0], mlp_numpy(new, x), rtol=1e-4, atol=1e-4)
    h = x.astype(np.float64) @ dense["w1"]  # fc1's own output error on the calibration inputs
    err_gpt = np.linalg.norm(x @ new["w1"] - h)
    err_mag = np.linalg.norm(x @ weights(magnitude.model)["w1"] - h)
    assert err_gpt < err_mag  # iid inputs: a near-identity Gram leaves OBS a small, real gain
    reported = next(p.rel_error for p in result.details["weights"] if p.weight == "w1")
    assert reported == pytest.approx(err_gpt / np.linalg.norm(h), rel=1e-3)  # the Gram estimate is exact


def test_nothing_to_prune_is_not_modified():
    model = mlp()
    ctx, result, _ = _pruned(model, SparseGPTPass([], nm=NM))
    assert not result.modified and result.details["weights"] == []
    assert ctx.model.SerializeToString() == model.SerializeToString()


def test_sparsegpt_requires_calibration():
    model = mlp()
    with pytest.raises(PassError, match=r"^pass sparsegpt needs calibration, which no earlier pass made$"):
        run_pass(SparseGPTPass(targets(model, nm=NM), nm=NM), context(model))
