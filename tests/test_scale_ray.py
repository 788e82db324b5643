"""--workers / --ray: calibration sharded over Ray workers and SparseGPT's solves as Ray tasks give the
single-process result (masks identical, float64 statistics equal up to summation order); without Ray
the options are one line that says how to install it."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from cli_helpers import assert_one_line_error, invoke
from onnx import numpy_helper

import sparsec
from models.cnn import build_cnn
from models.mlp import build_mlp
from sparsec.core.graph import load_model
from sparsec.core.layers import find_layers
from sparsec.runtime import calibrate, scale_out
from sparsec.runtime.calib_data import input_specs, open_calibration, parse_ranges
from sparsec.runtime.calibrate import CalibrationSettings, collect_stats
from sparsec.runtime.scale_out import ScaleOut, connect, ordered_map
from sparsec.weights import sparsegpt_pass

ray = pytest.importorskip("ray")
WORKERS = ScaleOut(workers=2)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local 2-CPU instance for the module (ray.init takes seconds); shut down after it."""
    connect(WORKERS)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    onnx.save(build_mlp(hidden=(64, 32)), path)
    return path


def _weights(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _stats(path, scale, batch):
    loaded = load_model(path)
    model, layers = loaded.model, find_layers(loaded.model).layers
    data = open_calibration(input_specs(model), random_samples=13, seed=3)
    settings = CalibrationSettings(data, batch=batch, progress=False, scale=scale)
    return collect_stats(model, loaded.store, layers, settings, {la.name for la in layers})


@pytest.mark.parametrize("path_of", ["mlp", "cnn"])
def test_sharded_statistics_equal_single_process(mlp, tmp_path, path_of):
    path = mlp if path_of == "mlp" else tmp_path / "cnn.onnx"
    if path_of == "cnn":
        onnx.save(build_cnn(), path)
    one, two = _stats(path, None, 2), _stats(path, WORKERS, 2)  # 7 batches: 4 on one worker, 3 on the other
    assert one.samples == two.samples == 13
    assert set(one.layers) == set(two.layers) and one.layers and set(one.patches) == set(two.patches)
    pairs = [(one.layers[k], two.layers[k]) for k in one.layers]
    pairs += [(one.patches[k], two.patches[k]) for k in one.patches]
    for a, b in pairs:
        assert a.rows == b.rows
        np.testing.assert_allclose(b.sumsq, a.sumsq, rtol=1e-12, atol=0)
        np.testing.assert_allclose(b.sums, a.sums, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(b.gram, a.gram, rtol=1e-12, atol=1e-9)
    if path_of == "cnn":
        assert one.patches, "the CNN's k×k convs must have im2col statistics"


@pytest.mark.parametrize(("method", "extra"), [("wanda", {}), ("sparsegpt", {}),
                                               ("sparsegpt", {"sequential": True})])
def test_compile_with_two_workers_equals_one(mlp, tmp_path, monkeypatch, method, extra):
    common = {"nm": "2:4", "method": method, "calib_random": 24, "batch": 4, **extra}
    used = _spy_on_ray(monkeypatch)
    sparsec.compile(mlp, output=tmp_path / "one", **common)
    sparsec.compile(mlp, output=tmp_path / "two", workers=2, **common)
    a, b = _weights(tmp_path / "one" / "model.onnx"), _weights(tmp_path / "two" / "model.onnx")
    pruned = [w for w in a if w.endswith("weight") and np.count_nonzero(a[w]) < a[w].size]
    assert len(pruned) == 3  # fc0, fc1 and the head
    for name in a:
        np.testing.assert_array_equal(b[name] != 0, a[name] != 0, err_msg=name)  # masks identical
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=name)
    levels = 3 if extra else 1  # with --sequential: one calibration pass per depth level
    assert used["shards"] == levels and used["solves"] == (3 if method == "sparsegpt" else 0)


def _spy_on_ray(monkeypatch) -> dict[str, int]:
    """Counts the calibrations sharded over workers and the solves sent to Ray tasks."""
    used = {"shards": 0, "solves": 0}

    def shards(scale, *args, **kwargs):
        used["shards"] += scale is not None
        return scale_out.sharded_sums(scale, *args, **kwargs)

    def solves(scale, fn, jobs):
        for item in scale_out.ordered_map(scale, fn, jobs):
            used["solves"] += scale is not None
            yield item

    monkeypatch.setattr(calibrate, "sharded_sums", shards)
    monkeypatch.setattr(sparsegpt_pass, "ordered_map", solves)
    return used


def test_sparsegpt_on_convs_with_workers_equals_one(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(build_cnn(), path)
    common = {"nm": "2:4", "method": "sparsegpt", "calib_random": 8, "batch": 2}
    sparsec.compile(path, output=tmp_path / "one", **common)
    sparsec.compile(path, output=tmp_path / "two", workers=2, **common)
    a, b = _weights(tmp_path / "one" / "model.onnx"), _weights(tmp_path / "two" / "model.onnx")
    assert sum(np.count_nonzero(v) < v.size for v in a.values()) >= 3
    for name in a:
        np.testing.assert_array_equal(b[name] != 0, a[name] != 0, err_msg=name)
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_ray_option_joins_the_running_instance(mlp, tmp_path, monkeypatch):
    """--ray uses an instance this process is already connected to (as after a user's ray.init) and all
    of its CPUs."""
    used = _spy_on_ray(monkeypatch)
    common = {"nm": "2:4", "method": "sparsegpt", "calib_random": 8, "batch": 2}
    sparsec.compile(mlp, output=tmp_path / "one", **common)
    sparsec.compile(mlp, output=tmp_path / "two", ray="auto", **common)
    a, b = _weights(tmp_path / "one" / "model.onnx"), _weights(tmp_path / "two" / "model.onnx")
    for name in a:
        np.testing.assert_array_equal(b[name] != 0, a[name] != 0, err_msg=name)
    assert used == {"shards": 1, "solves": 3}
    assert connect(ScaleOut(address="auto"))[1] == 2


def test_ordered_map_keeps_the_order_and_reraises_one_line():
    jobs = ((i, (np.full(3, i),), {}) for i in range(7))
    assert [(k, float(v)) for k, v in ordered_map(WORKERS, np.sum, jobs)] == [(i, 3.0 * i) for i in range(7)]
    with pytest.raises(sparsec.SparsecError, match="--calib-range 'bad' is not NAME=lo,hi"):
        list(ordered_map(WORKERS, parse_ranges, [(0, (["bad"],), {})]))  # raised in a worker


@pytest.mark.parametrize("flags", [["--workers", "2"], ["--ray", "auto"]])
def test_without_ray_the_options_are_one_line(mlp, tmp_path, monkeypatch, flags):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = invoke("compile", mlp, "--nm", "2:4", "--method", "wanda", "--calib-random", "4", *flags,
                    "-o", tmp_path / "o")
    assert_one_line_error(result, flags[0], "needs Ray", "pip install 'sparsec[ray]'")
    assert result.exit_code == 3 and not (tmp_path / "o").exists()


def test_workers_must_be_positive(mlp, tmp_path):
    assert_one_line_error(invoke("compile", mlp, "--nm", "2:4", "--workers", "0", "-o", tmp_path / "o"),
                          "--workers 0 must be at least 1")
