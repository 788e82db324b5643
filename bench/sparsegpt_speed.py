"""SparseGPT at the cost of Wanda: sparsec's SparseGPT 2:4 compile time beside its own Wanda compile.

MiniLM (all-MiniLM-L6-v2, the bench/quality.py export and sentences), same calibration data for every call.
sparsec's compiles alternate, in an order rotated every repeat, so a machine's load drifts over all alike;
ratios are taken per repeat, then their median. Their base is sparsec's Wanda without its default bias
correction (Wanda's pruning alone: the Gram statistics and the solve are SparseGPT's only extra work); Wanda
at its defaults is shown too. onnxsim 0.8.1's SparseGPT runs once on the same model and samples (feed dicts
of `--batch`). Each row gives the mean cosine of pruned to dense sentence embeddings on held-back
sentences. Timed calls include calibration; sparsec runs without verify, as bench/quality.py does (no
progress bar: not a terminal). Target (issue 12): sparsegpt / wanda <= 2.

    python bench/sparsegpt_speed.py [--repeats 3] [--calib-samples 64] [--eval 200] [--no-onnxsim]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # golden builders: models/
import corpus  # noqa: E402  (bench/corpus.py)
import quality  # noqa: E402  (bench/quality.py: the MiniLM task, sparsec/onnxsim runners)

WORK = quality.WORK


def minilm(n_calib: int, n_eval: int, batch: int, seed: int) -> quality.Task:
    """quality.minilm_task with its own calibration file: a quality run beside this one is not disturbed."""
    from models.minilm import embed, export_minilm, tokenizer

    model = export_minilm(WORK / "all-MiniLM-L6-v2.dynamo.onnx")
    calib, evals = corpus.split(corpus.docstring_sentences(), n_calib, n_eval, seed)
    tok = tokenizer()
    eval_feeds = corpus.tokenize(evals, tok, max_len=64)
    dense = embed(model, eval_feeds)

    def evaluate(path: Path) -> dict[str, float]:
        return {"cosine": float(np.mean(np.sum(embed(path, eval_feeds) * dense, axis=1)))}

    return quality._task("minilm_sparsegpt_speed", model, corpus.tokenize(calib, tok, max_len=64), batch,
                         evaluate)


# (label, method, extra sparsec flags); the ratio's base is Wanda's pruning alone: with calibration data
# Wanda also corrects biases by default, which SparseGPT (whose update does that job) does not
RUNS = (("sparsec wanda 2:4 (defaults)", "wanda", ()),
        ("sparsec wanda 2:4 --no-bias-correct", "wanda", ("--no-bias-correct",)),
        ("sparsec sparsegpt 2:4", "sparsegpt", ()))
BASE = RUNS[1][0]


def timed_sparsec(method: str, extra: tuple[str, ...], task: quality.Task, n_calib: int, batch: int
                  ) -> tuple[float, float] | None:
    """(seconds, cosine) of one sparsec 2:4 compile; None when a flag does not exist (yet)."""
    out = WORK / "sparsegpt_speed" / "_".join((method, *extra)).replace("-", "")
    outcome = quality.run_sparsec(quality.Cell(method, "2:4", extra=extra), task, out, n_calib, batch)
    if outcome.note == quality.NA:
        return None
    if outcome.note:
        raise SystemExit(f"sparsec {method} {' '.join(extra)} failed: {outcome.note}")
    return outcome.seconds, outcome.metrics["cosine"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, default in (("--repeats", 3), ("--calib-samples", 64), ("--batch", 16), ("--eval", 200),
                          ("--seed", 0)):
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--no-onnxsim", action="store_true", help="skip onnxsim (minutes on a quiet machine)")
    args = ap.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    task = minilm(args.calib_samples, args.eval, args.batch, args.seed)
    print(f"MiniLM 2:4, {args.calib_samples} calibration samples (batch {args.batch}), {args.eval} "
          f"evaluation sentences; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start",
          flush=True)
    timed_sparsec("sparsegpt", (), task, args.calib_samples, args.batch)  # warm-up: imports, page cache
    times: dict[str, list[float]] = {label: [] for label, _, _ in RUNS}
    cosine: dict[str, float] = {}
    for r in range(args.repeats):
        for label, method, extra in RUNS[r % len(RUNS):] + RUNS[:r % len(RUNS)]:  # rotated each repeat
            got = timed_sparsec(method, extra, task, args.calib_samples, args.batch)
            if got is None:
                times.pop(label, None)
                continue
            times[label].append(got[0])
            cosine[label] = got[1]
            print(f"  repeat {r + 1}: {label} {got[0]:.1f}s", flush=True)
    base = times.get(BASE) or times[RUNS[0][0]]
    rows = []
    for label, secs in times.items():
        ratios = [t / b for t, b in zip(secs, base, strict=True)]
        each = ", ".join(f"{x:.2f}" for x in ratios)
        rows.append((label, secs, f"{statistics.median(ratios):.2f} ({each})", cosine[label]))
    if not args.no_onnxsim:
        import onnxsim

        start = time.perf_counter()
        pruned = onnxsim.apply_sparsegpt_pruning(str(task.model), calibration_data=task.calib_feeds, n=2, m=4)
        seconds = time.perf_counter() - start
        onnx.save(pruned, str(path := WORK / "sparsegpt_speed" / "onnxsim.onnx"))
        rows.append(("onnxsim 0.8.1 sparsegpt 2:4", [seconds], f"{seconds / statistics.median(base):.2f}",
                     task.evaluate(path)["cosine"]))
    print(f"\n| tool / method | seconds (each run) | median s | / {BASE} (median of per-repeat) "
          "| mean cosine |\n|---|---|---|---|---|")
    for label, secs, ratio, cos in rows:
        print(f"| {label} | {', '.join(f'{s:.1f}' for s in secs)} | {statistics.median(secs):.1f} | {ratio} "
              f"| {cos:.4f} |")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
