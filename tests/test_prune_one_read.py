"""Magnitude N:M reads each weight once: the NaN/±Inf check rides on the pruning sweep, weights come off
the disk ahead of the sweep, and two threads prune with the serial result."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import reference_nm_mask
from onnx import TensorProto, helper, numpy_helper

import sparsec.weights.prune_weights as prune_weights
from sparsec.core.graph import load_model
from sparsec.core.layers import find_layers
from sparsec.core.options import CompileOptions, NMPattern
from sparsec.core.pipeline import PassContext
from sparsec.core.tensors import TensorStore
from sparsec.weights.masks import _CHUNK_ELEMENTS, NonFinite, nm_prune, non_finite_reason
from sparsec.weights.prune_weights import PruneWeightsPass
from sparsec.weights.selection import select_targets

NM = NMPattern(2, 4)
SIZES = [(64, 1024), (1024, 1024), (1024, 64)]  # the middle weight spans four sweep chunks


def _chain(path: Path, bad: dict[int, float] | None = None) -> tuple[Path, dict[str, np.ndarray]]:
    """x @ w0 @ w1 @ w2 with external data; `bad` puts a value in the last row of weight i (last chunk)."""
    rng = np.random.default_rng(0)
    inits = {f"w{i}": rng.standard_normal(shape).astype(np.float32) for i, shape in enumerate(SIZES)}
    for i, value in (bad or {}).items():
        inits[f"w{i}"][-1, 3] = value
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"],
                              ["y" if i == len(SIZES) - 1 else f"h{i + 1}"], name=f"mm{i}")
             for i in range(len(SIZES))]
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    return path, inits


def _prune(path: Path) -> tuple[PassContext, dict]:
    loaded = load_model(path)
    found, _ = select_targets(find_layers(loaded.model), CompileOptions(min_params=0, nm=NM))
    ctx = PassContext(loaded.model, loaded.store, {})
    result = PruneWeightsPass(found, nm=NM).run(ctx)
    values = {t.name: np.array(ctx.store.read(t)) for t in ctx.model.graph.initializer}
    return ctx, {"values": values, "weights": result.details["weights"], "left": ctx.facts["left_dense"]}


def test_magnitude_nm_reads_each_weight_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = _chain(tmp_path / "m.onnx")
    loaded = load_model(path)
    found, _ = select_targets(find_layers(loaded.model), CompileOptions(min_params=0, nm=NM))
    reads: Counter[str] = Counter()
    real = TensorStore.read

    def counting(self: TensorStore, tensor: onnx.TensorProto) -> np.ndarray:
        reads[tensor.name] += 1
        return real(self, tensor)

    monkeypatch.setattr(TensorStore, "read", counting)
    PruneWeightsPass(found, nm=NM).run(PassContext(loaded.model, loaded.store, {}))
    assert reads == {"w0": 1, "w1": 1, "w2": 1}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_value_in_the_last_chunk_leaves_the_weight_dense_with_the_same_reason(
        tmp_path: Path, bad: float) -> None:
    assert SIZES[1][0] * SIZES[1][1] > 2 * _CHUNK_ELEMENTS  # the bad value is past the first chunks
    path, inits = _chain(tmp_path / "m.onnx", {1: bad})
    ctx, got = _prune(path)
    reason = non_finite_reason(inits["w1"])
    assert reason is not None and got["left"] == {"w1": reason}
    w1 = next(t for t in ctx.model.graph.initializer if t.name == "w1")
    assert ctx.store.on_disk(w1)  # not rewritten: the original bytes are saved
    np.testing.assert_array_equal(got["values"]["w1"], inits["w1"])
    assert [p.weight for p in got["weights"]] == ["w0", "w2"]
    for name in ("w0", "w2"):
        keep = reference_nm_mask(inits[name], 2, 4, axis=0)
        np.testing.assert_array_equal(got["values"][name], np.where(keep, inits[name], 0.0))


def test_compile_names_the_non_finite_weight_in_one_line(tmp_path: Path) -> None:
    import sparsec

    path, inits = _chain(tmp_path / "m.onnx", {1: np.nan})
    report = sparsec.compile(path, output=tmp_path / "out", nm="2:4", verify=False, min_params=0)
    reasons = {s["weight"]: s["reason"] for s in report.skipped}
    assert reasons["w1"] == "weight holds 1 NaN and 0 ±Inf values: left dense (fix the model's weights)"
    assert "\n" not in reasons["w1"]
    assert [e.pattern for e in report.layers] == ["2:4", "dense", "2:4"]


def test_nm_prune_finite_raises_only_when_asked() -> None:
    values = np.random.default_rng(1).standard_normal((1024, 1024)).astype(np.float32)
    values[-1, 0] = np.nan
    with pytest.raises(NonFinite):
        nm_prune(values, 2, 4, 0, finite=True)
    pruned, _, _ = nm_prune(values, 2, 4, 0)  # without the check a NaN ranks highest and stays
    assert np.isnan(pruned[-1, 0])
    values[-1, 0] = 1.0
    np.testing.assert_array_equal(nm_prune(values, 2, 4, 0, finite=True)[0], nm_prune(values, 2, 4, 0)[0])


def test_two_threads_give_the_serial_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = _chain(tmp_path / "m.onnx", {0: np.nan, 2: np.inf})
    runs = []
    for threads in (1, 2):
        monkeypatch.setattr(prune_weights, "PRUNE_THREADS", threads)
        runs.append(_prune(path)[1])
    serial, threaded = runs
    assert list(threaded["left"].items()) == list(serial["left"].items())  # same order: the report's
    assert threaded["weights"] == serial["weights"]
    for name, values in serial["values"].items():
        assert values.tobytes() == threaded["values"][name].tobytes()
