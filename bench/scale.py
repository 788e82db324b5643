"""Scale-out on Ray: calibration (Gram statistics, as SparseGPT needs) and SparseGPT's per-layer solves with
1 vs 2 workers on this machine (onnxruntime and BLAS one thread per worker), and the scaling expected on a
cluster from the measured costs. Ray's start and the workers' warm-up (a fixed cost per compile) are
timed apart.

Calibration: the parallel part is the onnxruntime work per batch (measured on one worker); the serial part
(instrumenting the graph, shipping the weights, loading the sessions, the float64 reduce) is what remains of
the 1-worker wall time. Solves: each layer's solve is timed in this process; N workers need at least
max(Σ cost / N, the largest single solve) per depth level (Amdahl plus load balance).

    python bench/scale.py                         # MiniLM (dynamo export), 64 random sequences of 128
    python bench/scale.py --model bench/_work/transformer_L12_d1024_f4096_v8192_s0.onnx --samples 16
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core per worker, driver too
    os.environ.setdefault(var, "1")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
MINILM = Path("/root/.cache/sparsec-corpus/exports/minilm-dynamo/model.onnx")

from sparsec.core.graph import load_model  # noqa: E402
from sparsec.core.graph_index import GraphIndex, to_effective  # noqa: E402
from sparsec.core.layers import find_layers  # noqa: E402
from sparsec.core.shapes import fixed_input_shapes  # noqa: E402
from sparsec.runtime.calib_data import input_specs, open_calibration  # noqa: E402
from sparsec.runtime.calibrate import CalibrationSettings, collect_stats  # noqa: E402
from sparsec.runtime.scale_out import ScaleOut, ordered_map  # noqa: E402
from sparsec.weights.scores import as_rows  # noqa: E402
from sparsec.weights.sparsegpt_pass import gram_ready  # noqa: E402
from sparsec.weights.sparsegpt_solver import sparsegpt_prune  # noqa: E402


def _calibrate(loaded, layers, data, batch: int, scale: ScaleOut | None, fixed):
    settings = CalibrationSettings(data, batch=batch, progress=False, fixed_shapes=fixed, scale=scale)
    start = time.perf_counter()
    stats = collect_stats(loaded.model, loaded.store, layers, settings, {la.name for la in layers})
    return stats, time.perf_counter() - start


def _ort_time(loaded, layers, data, batch: int, fixed) -> tuple[float, float]:
    """(onnxruntime time alone, wall time) of an in-process calibration with one thread: the onnxruntime
    part is what shards."""
    from sparsec.runtime import calibrate

    spent = [0.0]
    real = calibrate.run_checked

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    import sparsec.runtime.session as session

    make = session.session_with_values
    calibrate.run_checked = timed
    calibrate.session_with_values = lambda *a, **k: make(*a, **k, threads=1)
    try:
        _, wall = _calibrate(loaded, layers, data, batch, None, fixed)
    finally:
        calibrate.run_checked, calibrate.session_with_values = real, make
    return spent[0], wall


def _jobs(loaded, layers, stats):
    index = GraphIndex(loaded.model.graph)
    for la in layers:
        w = to_effective(loaded.store.read(index.constant(la.source)), la.source.steps)
        s = stats.layers[la.name]
        yield la.name, (as_rows(la, w), s.gram, s.rows), {"n": 2, "m": 4}


def _solve_costs(loaded, layers, stats) -> dict[str, float]:
    costs = {}
    for name, args, kwargs in _jobs(loaded, layers, stats):
        start = time.perf_counter()
        sparsegpt_prune(*args, **kwargs)
        costs[name] = time.perf_counter() - start
    return costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MINILM)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    loaded = load_model(args.model)
    model = loaded.model
    specs = input_specs(model)
    shapes = {s.name: (1, args.seq) for s in specs if len(s.shape) == 2}
    ranges = {s.name: (0, 30522 if s.name == "input_ids" else 2) for s in specs if s.dtype.kind == "i"}
    if "attention_mask" in ranges:
        ranges["attention_mask"] = (1, 2)
    data = open_calibration(specs, random_samples=args.samples, ranges=ranges, shapes=shapes, seed=0)
    fixed = fixed_input_shapes(model, shapes)
    layers = [la for la in find_layers(model).layers if gram_ready(la) and la.reduction_dim % 4 == 0]
    print(f"model {args.model.name}: {len(layers)} layers, {args.samples} samples x {args.seq} tokens, "
          f"batch {args.batch}, {os.cpu_count()} cores")

    ort_s, local_s = _ort_time(loaded, layers, data, args.batch, fixed)
    stats_1, _ = _calibrate(loaded, layers, data, args.batch, None, fixed)
    costs = _solve_costs(loaded, layers, stats_1)
    calib, solve, startup = {}, {}, {}
    for n in (1, 2):  # Ray started and its workers warmed up first: a fixed cost per compile, timed apart
        start = time.perf_counter()
        list(ordered_map(ScaleOut(workers=n), int, [(i, ("1",), {}) for i in range(2 * n)]))
        startup[n] = time.perf_counter() - start
        _, calib[n] = _calibrate(loaded, layers, data, args.batch, ScaleOut(workers=n), fixed)
        start = time.perf_counter()
        for _ in ordered_map(ScaleOut(workers=n), sparsegpt_prune, _jobs(loaded, layers, stats_1)):
            pass
        solve[n] = time.perf_counter() - start

    serial = max(calib[1] - ort_s, 0.0)
    total, biggest = sum(costs.values()), max(costs.values())
    print("\nper-layer SparseGPT 2:4 solve cost (one thread):")
    by_shape: dict[tuple, list[float]] = {}
    for la in layers:
        by_shape.setdefault(tuple(la.shape), []).append(costs[la.name])
    print("| weight shape | layers | s per solve (mean) | s total |\n|---|---|---|---|")
    for shape, cs in sorted(by_shape.items()):
        print(f"| {list(shape)} | {len(cs)} | {np.mean(cs):.3f} | {sum(cs):.2f} |")
    print(f"\nin this process, one thread: calibration {local_s:.2f} s (onnxruntime {ort_s:.2f} s), "
          f"solves {sum(costs.values()):.2f} s")
    print("| workers | Ray start + warm-up s | calibration s | speedup | SparseGPT solves s | speedup |\n"
          "|---|---|---|---|---|---|")
    for n in (1, 2):
        print(f"| {n} (measured) | {startup[n]:.2f} | {calib[n]:.2f} | {calib[1] / calib[n]:.2f}x | "
              f"{solve[n]:.2f} | {solve[1] / solve[n]:.2f}x |")
    print(f"\nserial part of calibration (1-worker wall - onnxruntime time): {serial:.2f} s of "
          f"{calib[1]:.2f} s (fraction {serial / calib[1]:.2f}); solves: sum {total:.2f} s, "
          f"largest {biggest:.3f} s")
    print("| workers | calibration s (expected) | speedup | solves s (expected, one level) | speedup |\n"
          "|---|---|---|---|---|")
    for n in (1, 2, 4, 8, 16, 32, 64):
        c = serial + ort_s / n
        s = max(total / n, biggest)
        print(f"| {n} | {c:.2f} | {(serial + ort_s) / c:.2f}x | {s:.2f} | {total / s:.2f}x |")


if __name__ == "__main__":
    main()
