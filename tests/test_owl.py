"""OWL layer sparsities: bounded by lambda, outlier-heavy layers keep more, total unchanged."""

import numpy as np
import onnx

import sparsec
from models import GOLDEN
from sparsec.weights.owl import outlier_ratio, owl_sparsities


def test_owl_sparsities_keep_weighted_mean_and_order():
    ratios = np.array([0.01, 0.05, 0.02, 0.08])
    params = np.array([100.0, 300.0, 200.0, 400.0])
    s = owl_sparsities(ratios, params, 0.6, 0.08)
    assert abs((s * params).sum() / params.sum() - 0.6) < 1e-12
    assert list(np.argsort(s)) == list(np.argsort(-ratios))  # more outliers, less sparsity
    assert s.max() - s.min() <= 2 * 0.08 + 1e-12
    assert s.min() >= 0.6 - 0.08 - 1e-12 and s.max() <= 0.6 + 0.08 + 1e-12


def test_owl_band_holds_when_one_big_layer_dominates():
    s = owl_sparsities(np.array([0.0, 0.1, 0.2]), np.array([10.0, 10.0, 10000.0]), 0.6, 0.08)
    assert s.max() <= 0.68 + 1e-12 and s.min() >= 0.52 - 1e-12
    assert abs((s * [10, 10, 10000]).sum() / 10020 - 0.6) < 1e-3


def test_outlier_ratio_counts_scores_above_m_times_mean():
    scores = np.array([1.0] * 98 + [100.0, 100.0])
    assert outlier_ratio(scores, 5.0) == 0.02
    assert outlier_ratio(np.ones(10), 5.0) == 0.0


def test_owl_compile_reaches_target_sparsity(tmp_path):
    model = GOLDEN["mlp"](hidden=(64, 64, 32))
    # give one layer heavy outliers so its sparsity must drop
    for t in model.graph.initializer:
        if t.name == "fc1.weight":
            w = onnx.numpy_helper.to_array(t).copy()
            w[:, :3] *= 40.0
            t.CopyFrom(onnx.numpy_helper.from_array(w, t.name))
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((16, 1, 32)).astype(np.float32))
    report = sparsec.compile(src, output=tmp_path / "o", sparsity=0.6, method="wanda", owl=True,
                             calib=tmp_path / "c.npz", min_params=0)
    owl = next(p for p in report.passes if p["name"] == "owl")
    table, ratios = owl["layer_sparsity"], owl["outlier_ratio"]
    assert ratios["fc1.weight"] > ratios["fc0.weight"]
    names = sorted(table)
    assert np.argsort([table[n] for n in names]).tolist() == np.argsort(
        [-ratios[n] for n in names], kind="stable").tolist()
    pruned = [e for e in report.layers if e.skipped_reason is None]
    total = sum(e.params - e.nonzeros for e in pruned) / sum(e.params for e in pruned)
    assert abs(total - 0.6) < 0.01
    for e in pruned:
        assert abs(e.sparsity - table[e.weight]) < 0.02
