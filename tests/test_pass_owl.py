"""owl: per-layer sparsities from calibration, an analysis pass (the model is unchanged)."""

from __future__ import annotations

import numpy as np
import pytest
from pass_helpers import calibration, context, mlp, run_pass, targets

from sparsec.core.pipeline import PassError
from sparsec.weights.calibrate_pass import CalibratePass
from sparsec.weights.owl import OwlPass, outlier_ratio


def test_owl_spreads_sparsity_around_the_target_and_leaves_the_graph():
    model = mlp()
    found = targets(model, sparsity=0.5)
    ctx = context(model)
    run_pass(CalibratePass(found, calibration(model)), ctx)
    result = run_pass(OwlPass(found, 0.5, lam=0.08, m=2.0), ctx)
    assert not result.modified
    assert ctx.model.SerializeToString() == model.SerializeToString()
    table = ctx.facts["layer_sparsity"]
    assert set(table) == {"w1", "w2"} and table == result.details["layer_sparsity"]
    params = np.array([16 * 32, 32 * 8], np.float64)
    ratios = np.array([table["w1"], table["w2"]])
    assert abs(float((ratios * params).sum() / params.sum()) - 0.5) < 1e-9
    assert np.all((ratios >= 0.42 - 1e-12) & (ratios <= 0.58 + 1e-12))
    outliers = result.details["outlier_ratio"]
    # more outliers, fewer weights removed
    assert (outliers["w1"] - outliers["w2"]) * (table["w1"] - table["w2"]) <= 0


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    assert outlier_ratio(np.array([1.0, 1.0, 1.0, 13.0]), 2.0) == 0.25


def test_owl_requires_calibration():
    model = mlp()
    with pytest.raises(PassError, match=r"^pass owl needs calibration, which no earlier pass made$"):
        run_pass(OwlPass(targets(model, sparsity=0.5), 0.5), context(model))
