"""Transformer pruning on all-MiniLM-L6-v2: attention heads, FFN neurons, tokens, and the combination.

Stdlib docstring sentences (bench/corpus.py): a calibration set (padded to 64 tokens, sparsec's `calib=`) and
a disjoint evaluation set. Quality: mean cosine of pruned to dense sentence embeddings (mean-pooled,
L2-normalised) and top-1 retrieval agreement (each evaluation sentence queries all OTHER evaluation
sentences; the fraction whose pruned nearest neighbour is the dense one), as in bench/quality.py. Speed:
onnxruntime CPU, 1 intra-op / 1 inter-op thread, ORT_ENABLE_ALL, all models' sessions timed round-robin in
one process at B1×L128 and B8×L64 (real docstring tokens, full mask); predicted speedup from sparsec's cost
model, recomputed for each shape from the per-block table. Token pruning is not implemented in sparsec.

    python bench/transformer.py [--quick] [--record] [--runs 30] [--eval 500] [--calib-samples 128]
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "_work"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))  # sparsec and the golden builders (models/) from THIS checkout
import corpus  # noqa: E402  (bench/corpus.py)

SHAPES = ((1, 128), (8, 64))  # latency shapes (batch, sequence); the first is the main table's
COMPILE_SHAPE = (8, 64)  # the cost model is recomputed for each latency shape
CALIB_LEN = 64


def _sparsec() -> Any:
    """sparsec from THIS checkout (ROOT is first on sys.path), whatever an editable install says."""
    return importlib.import_module("sparsec")


def configs(quick: bool) -> list[tuple[str, dict]]:
    """(label, sparsec.compile keywords); the first is the dense model."""
    rows = [("dense", {}), ("heads 25 %", {"heads": 0.25}), ("heads 50 %", {"heads": 0.5}),
            ("ffn 25 %", {"ffn": 0.25}), ("ffn 50 %", {"ffn": 0.5}),
            ("tokens 0.7 from layer 2", {"tokens": 0.7, "tokens_from": 2}),
            ("tokens 0.5 from layer 2", {"tokens": 0.5, "tokens_from": 2}),
            ("heads 25 % + ffn 25 %", {"heads": 0.25, "ffn": 0.25}),
            ("heads 50 % + ffn 50 %", {"heads": 0.5, "ffn": 0.5}),
            ("heads 25 % + ffn 25 % + tokens 0.7 from 2", {"heads": 0.25, "ffn": 0.25, "tokens": 0.7,
                                                           "tokens_from": 2})]
    return [rows[0], rows[2], rows[6]] if quick else rows


def cost(blocks: list[dict], batch: int, seq: int, hidden: int, after: bool, keep: float | None = None
         ) -> int:
    """sparsec's cost model: Σ B·L·(4·E·E_attn + 2·E·F) + 2·B·L²·E_attn, E_attn = heads·head_dim;
    layers after a token cut run on ceil(keep·L) tokens."""
    total = 0
    for b in blocks:
        width = (b["heads_after"] if after else b["heads_before"]) * b["head_dim"]
        ffn = (b["ffn_after"] if after else b["ffn_before"]) or 4 * hidden
        cut = after and keep is not None and b.get("tokens_after", 0) < b.get("tokens_before", 0)
        length = math.ceil(keep * seq) if cut else seq
        total += batch * length * (4 * hidden * width + 2 * hidden * ffn) + 2 * batch * length**2 * width
    return total


def nearest(emb: np.ndarray) -> np.ndarray:
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)  # the corpus is every OTHER evaluation sentence
    return sim.argmax(axis=1)


def latency_feeds(sentences: list[str], tok: Any, batch: int, seq: int) -> dict[str, np.ndarray]:
    """[CLS] + consecutive docstring tokens + [SEP] per row (stream repeated if short), mask all ones."""
    stream = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in
                             tok(sentences, add_special_tokens=False)["input_ids"]])
    body = np.resize(stream, batch * (seq - 2)).reshape(batch, seq - 2)
    ids = np.concatenate([np.full((batch, 1), tok.cls_token_id), body, np.full((batch, 1), tok.sep_token_id)],
                         axis=1).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def time_round_robin(sessions: dict[str, Any], feeds: dict[str, np.ndarray], warmup: int, runs: int
                     ) -> dict[str, float]:
    """Median ms per session; each round runs every session once, the starting session rotating."""
    names = list(sessions)
    for name in names:
        for _ in range(warmup):
            sessions[name].run(None, feeds)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(runs):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            sessions[name].run(None, feeds)
            times[name].append(1e3 * (time.perf_counter() - start))
    return {n: float(np.median(t)) for n, t in times.items()}


def prune(label: str, kwargs: dict, model: Path, calib: Path, n_calib: int) -> dict[str, Any]:
    sparsec = _sparsec()
    out = WORK / "transformer" / re.sub(r"[^a-z0-9]+", "_", label).strip("_")
    out.parent.mkdir(parents=True, exist_ok=True)
    shape = COMPILE_SHAPE
    start = time.perf_counter()
    try:
        report = sparsec.compile(model, output=out, force=True, **kwargs, calib=str(calib),
                                 calib_samples=n_calib, batch=16, verify=True,
                                 shapes={"input_ids": shape, "attention_mask": shape})
    except Exception as exc:
        print(f"  {label}: sparsec failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return {"error": f"{type(exc).__name__}: {exc}"}
    seconds = time.perf_counter() - start
    tr = report.transformer
    cm = tr["cost_model"]
    keep = kwargs.get("tokens")
    mine = (cost(tr["blocks"], *shape, cm["hidden"], True, keep),
            cost(tr["blocks"], *shape, cm["hidden"], False))
    if mine != (cm["after"], cm["before"]):
        print(f"  {label}: recomputed cost {mine} != report's {cm['after'], cm['before']}", file=sys.stderr)
    return {"path": out / "model.onnx", "seconds": seconds, "blocks": tr["blocks"], "hidden": cm["hidden"],
            "scores": tr["head_scores"], "keep": keep,
            "oracle": report.verify.get("masked", {}).get("max_abs_diff")}


def provenance() -> str:
    mem = next(int(line.split()[1]) / 2**20 for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    load = "/".join(f"{v:.2f}" for v in os.getloadavg())

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = " + uncommitted working tree" if git("status", "--porcelain") else ""
    return (f"- Machine: nproc {len(os.sched_getaffinity(0))} ({os.cpu_count()} CPUs), {mem:.1f} GiB RAM, "
            f"load average (1/5/15 min) at start {load}\n"
            f"- Code: sparsec {_sparsec().__file__} at commit {git('rev-parse', '--short', 'HEAD')}{dirty}\n")


def fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def fmt_kept(blocks: list[dict] | None, key: str) -> str:
    """'kept/before' summed over blocks for key 'heads' or 'ffn'."""
    return "–" if blocks is None else (f"{sum(b[key + '_after'] for b in blocks)}/"
                                       f"{sum(b[key + '_before'] for b in blocks)}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 rows, 16 calibration, 64 evaluation")
    ap.add_argument("--record", action="store_true", help="append a section to bench/RESULTS.md")
    for flag, default in (("--calib-samples", 128), ("--eval", 500), ("--runs", 30), ("--seed", 0)):
        ap.add_argument(flag, type=int, default=default)
    args = ap.parse_args(argv)
    n_calib, n_eval, runs, warmup = (16, 64, 5, 1) if args.quick else (args.calib_samples, args.eval,
                                                                        max(args.runs, 20), 3)
    started, host = datetime.datetime.now(datetime.timezone.utc), provenance()
    from models.minilm import embed, export_minilm, tokenizer

    WORK.mkdir(parents=True, exist_ok=True)
    model = export_minilm(WORK / "all-MiniLM-L6-v2.dynamo.onnx")
    sentences = corpus.docstring_sentences()
    calib_s, eval_s = corpus.split(sentences, n_calib, n_eval, args.seed)
    tok = tokenizer()
    calib = WORK / f"transformer_calib_{n_calib}_L{CALIB_LEN}_s{args.seed}.npz"
    cf = corpus.tokenize(calib_s, tok, max_len=CALIB_LEN, pad_to_max=True)
    np.savez(calib, **{k: v[:, None] for k, v in cf.items()})  # [sample, 1, 64]: each sample a batch of 1
    eval_feeds = corpus.tokenize(eval_s, tok, max_len=128)
    dense = embed(model, eval_feeds)
    dense_nn = nearest(dense)
    info = (f"{len(sentences)} docstring sentences; {n_calib} calibration (padded to {CALIB_LEN} tokens), "
            f"{n_eval} evaluation (disjoint, ≤ 128 tokens)")
    print(info, flush=True)

    rows: dict[str, dict[str, Any]] = {}
    for label, kwargs in configs(args.quick):
        if not kwargs:
            rows[label] = {"path": model, "cosine": 1.0, "top1": 1.0}
            continue
        row = rows[label] = prune(label, kwargs, model, calib, n_calib)
        if "error" not in row:
            emb = embed(row["path"], eval_feeds)
            row.update(cosine=float(np.mean(np.sum(emb * dense, axis=1))),
                       top1=float(np.mean(nearest(emb) == dense_nn)))
            print(f"  {label}: cosine {row['cosine']:.4f}, top-1 {row['top1']:.3f}, oracle "
                  f"{fmt(row['oracle'], '.2e')}, {row['seconds']:.1f}s ({row['scores']} head scores)",
                  flush=True)

    ok = {k: r for k, r in rows.items() if "error" not in r}
    sessions = {k: session(r["path"]) for k, r in ok.items()}
    sessions["dense (2nd session)"] = session(model)  # noise yardstick: the dense row's "speedup"
    ms = {sh: time_round_robin(sessions, latency_feeds(eval_s, tok, *sh), warmup, runs) for sh in SHAPES}
    for shape, t in ms.items():
        print(f"  B{shape[0]}×L{shape[1]} ms: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()), flush=True)

    def speed(label: str, shape: tuple[int, int]) -> tuple[float, float, float]:
        t, r = ms[shape], ok[label]
        measured = t["dense"] / t[label if label != "dense" else "dense (2nd session)"]
        predicted = 1.0 if "blocks" not in r else (cost(r["blocks"], *shape, r["hidden"], False)
                                                   / cost(r["blocks"], *shape, r["hidden"], True, r["keep"]))
        return measured, predicted, measured / predicted

    b1, b8 = SHAPES
    head1 = ["config", "cosine", "top-1 agreement", f"latency ms (B{b1[0]}×L{b1[1]})", "measured speedup",
             "predicted speedup", "ratio", "masked-oracle max diff", "compile time s"]
    head2 = ["config", "heads kept", "FFN neurons kept", f"latency ms (B{b8[0]}×L{b8[1]})",
             "measured speedup", "predicted speedup", "ratio"]
    t1, t2 = [head1], [head2]
    for label, r in rows.items():
        if "error" in r:
            t1.append([label, f"error: {r['error']}"] + ["–"] * 7)
            t2.append([label, "error"] + ["–"] * 5)
            continue
        bl = r.get("blocks")
        t1.append([label, f"{r['cosine']:.4f}", f"{r['top1']:.3f}", f"{ms[b1][label]:.2f}",
                   *(f"{v:.2f}" for v in speed(label, b1)), fmt(r.get("oracle"), ".1e"),
                   fmt(r.get("seconds"), ".1f")])
        kept = [fmt_kept(bl, k) for k in ("heads", "ffn")]
        t2.append([label, *kept, f"{ms[b8][label]:.2f}", *(f"{v:.2f}" for v in speed(label, b8))])
    tables = ["\n".join("| " + " | ".join(line) + " |" + ("\n|" + "---|" * len(line) if i == 0 else "")
                        for i, line in enumerate(t)) for t in (t1, t2)]
    print("\n" + "\n\n".join(tables) + "\n", flush=True)

    notes = [f"noise yardstick: a second dense session measured {speed('dense', b1)[0]:.2f}× (B1×L128) and "
             f"{speed('dense', b8)[0]:.2f}× (B8×L64) against the first"]
    for label, r in ok.items():
        if "blocks" in r:
            (m1, p1, _), (m8, p8, _) = speed(label, b1), speed(label, b8)
            notes.append(f"{label}: cosine {r['cosine']:.3f}, top-1 {r['top1']:.2f}; measured {m1:.2f}× of "
                         f"{p1:.2f}× predicted at B1×L128, {m8:.2f}× of {p8:.2f}× at B8×L64")
    notes += [f"{label}: sparsec failed ({r['error']})" for label, r in rows.items() if "error" in r]
    notes.append("the cost model counts matmul multiply-adds only: embeddings and LayerNorm do not shrink "
                 "(pulls the ratio below 1), while per-head softmax/mask/scale and per-neuron GELU work, "
                 "which it also leaves out, shrink with pruning (pushes it above 1)")
    reading = "\n".join(f"- {n}" for n in notes)
    print(reading)
    if args.record:
        cmd = " ".join(["python bench/transformer.py", *(sys.argv[1:] if argv is None else argv)])
        settings = (f"- Latency: onnxruntime CPU, intra_op_num_threads=1, inter_op_num_threads=1, "
                    f"sequential, ORT_ENABLE_ALL; warm-up {warmup}, median of {runs} runs, all sessions "
                    f"round-robin in one process; inputs [CLS] + consecutive docstring tokens + [SEP], "
                    f"attention mask all ones\n"
                    f"- sparsec: heads=R, ffn=R, tokens=KEEP (tokens_from=2: layers 3-6 run pruned), calib= "
                    f"the {n_calib}-sample .npz, batch 16, verify=True, compiled at shapes "
                    f"B{COMPILE_SHAPE[0]}×L{COMPILE_SHAPE[1]}; predicted speedup = cost model before/after "
                    f"recomputed from the per-block table for each latency shape; token pruning has no "
                    f"masked oracle (every later layer sees other tokens)\n"
                    f"- Load average at the end: {'/'.join(f'{v:.2f}' for v in os.getloadavg())}\n")
        with open(HERE / "RESULTS.md", "a", encoding="utf-8") as fh:  # one append, never a rewrite
            fh.write(f"\n## {started:%Y-%m-%d %H:%M} UTC: transformer pruning on all-MiniLM-L6-v2 "
                     f"(heads, FFN, tokens)\n\nCommand: `{cmd}`\n\n"
                     f"- Date: {started.isoformat(timespec='seconds')}\n{host}"
                     f"- Data: {info}\n{settings}\n" + "\n\n".join(tables) + f"\n\nReading:\n{reading}\n")
        print(f"appended to {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
