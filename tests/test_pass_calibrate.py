"""calibrate: statistics gathered inside onnxruntime equal numpy's; the model is unchanged."""

from __future__ import annotations

import numpy as np
from pass_helpers import calibration, context, mlp, mlp_numpy, run_pass, samples, targets, weights

from sparsec.core.options import NMPattern
from sparsec.weights.calibrate_pass import CalibratePass

NM = NMPattern(2, 4)


def test_statistics_equal_numpy_and_the_graph_is_untouched():
    model = mlp()
    settings = calibration(model)
    ctx = context(model)
    result = run_pass(CalibratePass(targets(model, nm=NM), settings, gram=True), ctx)
    assert not result.modified and result.details == {"layers": 2, "samples": 64, "level": None, "gram": True}
    assert ctx.model.SerializeToString() == model.SerializeToString()  # no instrumentation left
    x = samples(settings).astype(np.float64)
    w = weights(model)
    hidden = np.maximum(x @ w["w1"] + w["b1"], 0.0)
    stats = ctx.facts["calibration"]
    assert stats.samples == 64 and set(stats.layers) == {"fc1", "fc2"}
    for layer, act in (("fc1", x), ("fc2", hidden)):
        np.testing.assert_allclose(stats.layers[layer].sumsq, (act ** 2).sum(0), rtol=1e-5)
        np.testing.assert_allclose(stats.layers[layer].gram, act.T @ act, rtol=1e-5, atol=1e-4)
        assert stats.layers[layer].rows == 64
    assert np.allclose(mlp_numpy(w, x[:2]), mlp_numpy(weights(ctx.model), x[:2]))


def test_wanda_statistics_have_no_gram():
    model = mlp()
    ctx = context(model)
    run_pass(CalibratePass(targets(model, nm=NM), calibration(model)), ctx)
    assert all(s.gram is None for s in ctx.facts["calibration"].layers.values())


def test_nothing_to_measure_is_not_modified_and_leaves_empty_statistics():
    model = mlp()
    ctx = context(model)
    result = run_pass(CalibratePass([], calibration(model)), ctx)
    assert not result.modified and result.details["layers"] == 0
    assert ctx.facts["calibration"].layers == {} and ctx.facts["calibration"].samples == 0


def test_a_later_level_adds_to_the_earlier_statistics():
    model = mlp()
    settings = calibration(model)
    first, second = targets(model, nm=NM)
    ctx = context(model)
    run_pass(CalibratePass([first], settings, level=0), ctx)
    result = run_pass(CalibratePass([second], settings, level=1), ctx)
    assert result.details["level"] == 1 and set(ctx.facts["calibration"].layers) == {"fc1", "fc2"}
