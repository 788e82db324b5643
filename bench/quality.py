"""Pruning quality on real models: sparsec beside onnxsim 0.8.1's pruning, same grid, same data.

MiniLM on stdlib docstring sentences (disjoint calibration / evaluation sets): mean cosine of pruned to dense
sentence embeddings; top-1 retrieval agreement (each evaluation sentence queries all OTHER evaluation
sentences; the fraction whose pruned nearest neighbour is the dense one). Digits CNN: test accuracy. The
corpus OCR CNNs (`--models ocr-det,ocr-rec,ocr-cls`, bench/quality_ocr.py): agreement with the dense model on
rendered text (detector box/pixel IoU, recogniser CTC character agreement, classifier top-1 agreement). Each
cell times one call per tool (calibration included; sparsec without verify), one after the other. Rows with
extra sparsec flags (EXTRA_ROWS, CHANNEL_ROWS) run sparsec only, and are skipped when the flag does not exist.

    python bench/quality.py [--quick] [--record] [--calib-samples 128] [--batch 16] [--eval 500]
    python bench/quality.py --models ocr-det,ocr-rec,ocr-cls [--ocr-calib 32] [--ocr-eval 64]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # golden builders: models/
import corpus  # noqa: E402  (bench/corpus.py)
import quality_ocr  # noqa: E402  (bench/quality_ocr.py)

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
NA = "n/a (not available)"


@dataclass(frozen=True)
class Cell:
    """One grid row: a method at a pattern ("50%", "60%" unstructured or "N:M"), optionally with OWL."""

    method: str
    pattern: str  # "" for none (channel removal rows)
    owl: bool = False
    extra: tuple[str, ...] = ()  # more sparsec CLI flags, e.g. ("--permute",): a sparsec-only row
    name: str = ""  # the label, when method/pattern do not say it

    @property
    def label(self) -> str:
        return self.name or (f"{self.method} {self.pattern}" + (" + owl" if self.owl else "")
                             + "".join(f" {a}" for a in self.extra))

    def pattern_args(self, tool: str) -> dict[str, Any]:
        if not self.pattern:
            return {}
        if ":" not in self.pattern:
            return {"sparsity": float(self.pattern.rstrip("%")) / 100}
        n, m = (int(v) for v in self.pattern.split(":"))
        return {"nm": self.pattern} if tool == "sparsec" else {"n": n, "m": m}


def grid(quick: bool) -> list[Cell]:
    if quick:
        return [Cell("magnitude", "2:4"), Cell("wanda", "2:4"), Cell("sparsegpt", "2:4"),
                Cell("wanda", "60%", owl=True)]
    cells = [Cell(m, p) for m in ("magnitude", "wanda", "sparsegpt") for p in ("50%", "4:8", "2:4")]
    return cells + [Cell("magnitude", "60%"), Cell("wanda", "60%"), Cell("wanda", "60%", owl=True),
                    Cell("sparsegpt", "60%"), Cell("sparsegpt", "60%", owl=True)]


# sparsec's defaults: calibration data and no --method (the "by default options" row)
DEFAULT = "default"
DEFAULT_ROW = Cell(DEFAULT, "2:4", name="sparsec defaults 2:4 (--calib, no --method)")
# sparsec-only rows: (label suffix, extra flags, methods it is added for, at 2:4). Extend freely.
EXTRA_ROWS: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    ("permute", ("--permute",), ("magnitude", "wanda", "sparsegpt")),
    ("bias-correct", ("--bias-correct",), ("magnitude", "wanda", "sparsegpt")),  # forced, unguarded
    ("no-bias-correct", ("--no-bias-correct",), ("magnitude", "wanda")),  # their default: guarded
    ("sequential", ("--sequential",), ("wanda", "sparsegpt")),
    ("bn-reestimate", ("--bn-reestimate",), ("magnitude", "wanda", "sparsegpt")),
    ("min-similarity 0.99", ("--min-similarity", "0.99"), ("magnitude", "wanda", "sparsegpt")),
]
# channel removal on the detector: default options against calibrated scores with least-squares recovery
CHANNEL_ROWS = [Cell("magnitude", "", extra=("--channels", "0.3"), name="channels 0.3"),
                Cell("magnitude", "", extra=("--channels", "0.3", "--channel-score", "act", "--recover"),
                     name="channels 0.3 --channel-score act --recover")]


def ocr_grid(model: str, methods: list[str], known: Callable[[str], bool], extras: str = "all") -> list[Cell]:
    """Base 2:4 rows (both tools), EXTRA_ROWS (those named in `extras`) whose flags exist, and CHANNEL_ROWS
    on the detector."""
    cells = [Cell(m, "2:4") for m in methods] + [DEFAULT_ROW] + extra_rows(methods, known, extras)
    return cells + (CHANNEL_ROWS if model == "ocr-det" else [])


def extra_rows(methods: list[str], known: Callable[[str], bool], extras: str) -> list[Cell]:
    """The sparsec-only EXTRA_ROWS at 2:4 named in `extras` ("all", "none" or labels) whose flags exist."""
    cells = []
    for suffix, extra, which in EXTRA_ROWS:
        if extras != "all" and suffix not in extras.split(","):
            continue
        if not all(known(a) for a in extra if a.startswith("--")):
            print(f"  skipped rows '+ {suffix}': `sparsec compile --help` has no {extra[0]}", flush=True)
            continue
        cells += [Cell(m, "2:4", extra=extra) for m in methods if m in which]
    return cells


def sparsec_flags() -> Callable[[str], bool]:
    """Whether `sparsec compile` has a flag (read from its --help; other helpers add flags over time)."""
    text = subprocess.run([sys.executable, "-m", "sparsec.cli", "compile", "--help"], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "200"}).stdout
    return lambda flag: re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def flag_kwargs(args: tuple[str, ...]) -> dict[str, Any]:
    """CLI flags as API keywords: --x-y V -> x_y=V (numbers parsed), --x -> True, --no-x -> False."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        key = args[i].removeprefix("--").replace("-", "_")
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            value: Any = args[i + 1]
            for kind in (int, float):
                try:
                    value = kind(value)
                    break
                except ValueError:
                    pass
            out[key], i = value, i + 2
        else:
            negated = key.startswith("no_")
            out[key.removeprefix("no_") if negated else key], i = not negated, i + 1
    return out


@dataclass
class Outcome:
    """One tool's result for one cell: metrics, wall time, weight sparsity, skipped layers, or a note."""

    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None
    sparsity: float | None = None
    skipped: int | None = None
    note: str = ""
    macs_cut: float | None = None  # sparsec: 1 − nonzero / dense MACs, from its report


@dataclass
class Task:
    """A model with its calibration data (npz for sparsec, feed dicts for onnxsim) and its evaluation."""

    name: str
    model: Path
    calib_npz: Path
    calib_feeds: list[dict[str, np.ndarray]]
    evaluate: Callable[[Path], dict[str, float]]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # sparsec `shapes=` (symbolic dims)


def weight_sparsity(path: Path) -> float:
    """Fraction of zeros in the constants (initializers or Constant nodes, as Paddle exports them) that
    MatMul/Gemm/Conv nodes read as their weight (input 1)."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    inits |= {n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant"
              for a in n.attribute if a.name == "value"}
    names = {n.input[1] for n in model.graph.node
             if n.op_type in ("MatMul", "Gemm", "Conv") and len(n.input) > 1 and n.input[1] in inits}
    arrays = [numpy_helper.to_array(inits[n]) for n in sorted(names)]
    total = sum(a.size for a in arrays)
    return 1.0 - sum(int(np.count_nonzero(a)) for a in arrays) / total if total else 0.0


def run_sparsec(cell: Cell, task: Task, out: Path, calib_samples: int, batch: int) -> Outcome:
    import sparsec

    kwargs: dict[str, Any] = dict(output=out, verify=False, force=True,
                                  **cell.pattern_args("sparsec"), **flag_kwargs(cell.extra))
    if cell.method != DEFAULT:  # the defaults row gives calibration data and no method
        kwargs["method"] = cell.method
    if cell.method != "magnitude" or cell.extra:  # the extra rows' options (mostly) need calibration
        kwargs.update(calib=str(task.calib_npz), calib_samples=calib_samples, batch=batch)
    if cell.owl:
        kwargs["owl"] = True
    if task.shapes:
        kwargs["shapes"] = task.shapes
    out.parent.mkdir(parents=True, exist_ok=True)
    report, seconds, exc = _timed(lambda: sparsec.compile(task.model, **kwargs), f"sparsec {cell.label}")
    if exc is not None:  # the API without calibrated methods: "unexpected keyword" / "is not available"
        missing = "unexpected keyword argument" in str(exc) or "is not available" in str(exc)
        return Outcome(note=NA if missing else f"error: {type(exc).__name__}")
    path = out / "model.onnx"
    dense, kept = report.totals.get("macs_dense"), report.totals.get("macs_nonzero")
    return Outcome(task.evaluate(path), seconds, weight_sparsity(path), len(report.skipped),
                   macs_cut=1 - kept / dense if dense and kept is not None else None)


def _timed(call: Callable[[], Any], label: str) -> tuple[Any, float, Exception | None]:
    """(result, seconds, None) or (None, 0, the exception): a failed cell must not stop the grid."""
    start = time.perf_counter()
    try:
        result = call()
    except Exception as exc:
        print(f"  {label}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None, 0.0, exc
    return result, time.perf_counter() - start, None


def run_onnxsim(cell: Cell, task: Task, out: Path) -> Outcome:
    import onnxsim

    if cell.owl:
        return Outcome(note="n/a (no OWL)")
    if cell.extra or not cell.pattern or cell.method == DEFAULT:
        return Outcome(note="– (sparsec-only row)")
    fn = {"magnitude": onnxsim.apply_magnitude_pruning, "wanda": onnxsim.apply_wanda_pruning,
          "sparsegpt": onnxsim.apply_sparsegpt_pruning}[cell.method]
    kwargs = cell.pattern_args("onnxsim")
    if cell.method != "magnitude":
        kwargs["calibration_data"] = task.calib_feeds
    pruned, seconds, exc = _timed(lambda: fn(str(task.model), **kwargs), f"onnxsim {cell.label}")
    if exc is not None:
        return Outcome(note=f"error: {type(exc).__name__}")
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(pruned, str(out))
    return Outcome(task.evaluate(out), seconds, weight_sparsity(out))


def _task(name: str, model: Path, feeds: dict[str, np.ndarray], batch: int,
          evaluate: Callable[[Path], dict[str, float]], shapes: dict | None = None) -> Task:
    """Calibration samples as one .npz (sparsec's `calib=`) and as feed dicts of `batch` (onnxsim).

    sparsec's .npz holds [sample, *input shape]: each sample is a feed of batch 1, hence `v[:, None]`.
    """
    np.savez(npz := WORK / f"{name}_calib.npz", **{k: v[:, None] for k, v in feeds.items()})
    n = len(next(iter(feeds.values())))
    return Task(name, model, npz, [{k: v[i:i + batch] for k, v in feeds.items()} for i in range(0, n, batch)],
                evaluate, shapes or {})


def minilm_task(n_calib: int, n_eval: int, batch: int, seed: int) -> tuple[Task, str]:
    from models.minilm import embed, export_minilm, tokenizer

    model = export_minilm(WORK / "all-MiniLM-L6-v2.dynamo.onnx")
    sentences = corpus.docstring_sentences()
    calib, evals = corpus.split(sentences, n_calib, n_eval, seed)
    tok = tokenizer()
    calib_feeds = corpus.tokenize(calib, tok, max_len=64)  # one length: the calibration set's longest
    eval_feeds = corpus.tokenize(evals, tok, max_len=64)
    dense = embed(model, eval_feeds)
    dense_nn = _nearest(dense)

    def evaluate(path: Path) -> dict[str, float]:
        emb = embed(path, eval_feeds)
        return {"cosine": float(np.mean(np.sum(emb * dense, axis=1))),
                "top1": float(np.mean(_nearest(emb) == dense_nn))}

    info = (f"{len(sentences)} docstring sentences; {n_calib} calibration (padded to "
            f"{calib_feeds['input_ids'].shape[1]} tokens), {n_eval} evaluation (disjoint)")
    return _task("minilm", model, calib_feeds, batch, evaluate), info


def _nearest(emb: np.ndarray) -> np.ndarray:
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)  # the corpus is every OTHER evaluation sentence
    return sim.argmax(axis=1)


def digits_task(n_calib: int, batch: int, seed: int) -> tuple[Task, str]:
    from models.digits import accuracy, train_digits_cnn

    data = train_digits_cnn(seed, cache_dir=WORK)
    model = WORK / "digits_cnn.onnx"
    onnx.save(data.model, str(model))
    pick = np.random.default_rng(seed).permutation(len(data.x_train))[:n_calib]

    def evaluate(path: Path) -> dict[str, float]:
        return {"accuracy": accuracy(path, data.x_test, data.y_test)}

    dense = evaluate(model)
    info = (f"{len(data.x_train)} train / {len(data.x_test)} test images; {n_calib} calibration images "
            f"from the training split; dense test accuracy {dense['accuracy']:.4f}")
    return _task("digits", model, {"input": data.x_train[pick]}, batch, evaluate), info


def table(cells: list[Cell], rows: dict[Cell, tuple[Outcome, Outcome]], keys: list[str]) -> str:
    """Markdown: per tool the metrics, wall time, weight sparsity (and sparsec's skipped-layer count)."""
    def cols(o: Outcome, tool: str) -> list[str]:
        vals = [o.note or f"{o.metrics[k]:.4f}" for k in keys]
        vals += ["–" if o.note else f"{o.seconds:.3g}", "–" if o.note else f"{o.sparsity:.1%}"]
        if tool == "onnxsim":
            return vals
        return vals + ["–" if o.skipped is None else str(o.skipped),
                       "–" if o.macs_cut is None else f"{o.macs_cut:.1%}"]

    head = ["method / pattern"] + [f"{tool} {c}" for tool in ("sparsec", "onnxsim") for c in (
        *keys, "time (s)", "weight sparsity",
        *(["skipped layers", "MACs cut"] if tool == "sparsec" else []))]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in cells:
        lines.append("| " + " | ".join([cell.label, *cols(rows[cell][0], "sparsec"),
                                        *cols(rows[cell][1], "onnxsim")]) + " |")
    return "\n".join(lines)


def reading(name: str, key: str, rows: dict[Cell, tuple[Outcome, Outcome]]) -> str:
    """A factual summary: where both tools gave numbers, who is ahead and by how much; what is missing."""
    both = [(c, s, o) for c, (s, o) in rows.items() if not s.note and not o.note]
    if not both:
        return f"{name}: no cell has numbers from both tools."
    ahead = [c.label for c, s, o in both if s.metrics[key] > o.metrics[key] + 1e-4]
    behind = [f"{c.label} ({s.metrics[key]:.3f} vs {o.metrics[key]:.3f})" for c, s, o in both
              if s.metrics[key] < o.metrics[key] - 1e-4]
    ratio = np.median([o.seconds / max(s.seconds, 1e-3) for _, s, o in both])
    text = (f"{name} ({key}): of {len(both)} cells with numbers from both tools, sparsec is ahead in "
            f"{len(ahead)}, tied in {len(both) - len(ahead) - len(behind)}, behind in {len(behind)}"
            + (f" ({'; '.join(behind)})" if behind else "") + f"; median onnxsim/sparsec time {ratio:.1f}x.")
    for pattern in ("2:4", "60%"):
        best = [max(((out.metrics[key], c.label) for c, pair in rows.items() for out in [pair[i]]
                     if c.pattern == pattern and not out.note), default=None) for i in (0, 1)]
        if all(best):
            text += (f" Best at {pattern}: sparsec {best[0][0]:.3f} ({best[0][1]}), "
                     f"onnxsim {best[1][0]:.3f} ({best[1][1]}).")
    missing = [c.label for c, (s, _) in rows.items() if s.note]
    if missing:
        text += f" sparsec gave no numbers for {len(missing)} cells: {', '.join(missing)}."
    return text


def provenance() -> str:
    """Machine and code lines for a RESULTS.md section."""
    mem = next((int(line.split()[1]) / 2**20 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), float("nan"))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    load = "/".join(f"{v:.2f}" for v in os.getloadavg())
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.strip()

    dirty = " + uncommitted working tree" if git("status", "--porcelain") else ""
    return (f"- Machine: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {mem:.1f} GiB RAM, "
            f"{cpu}; Python {platform.python_version()}; load average at start {load}\n"
            f"- Code: sparsec at commit {git('rev-parse', '--short', 'HEAD')}{dirty}\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny grid: 16 calibration, 64 evaluation, 2:4")
    ap.add_argument("--record", action="store_true", help="append a section to bench/RESULTS.md")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt", help="comma list: a sub-grid")
    ap.add_argument("--extras", default="all", help="sparsec-only 2:4 rows: EXTRA_ROWS labels, all, or none")
    ap.add_argument("--models", default="minilm,digits",
                    help="comma list: minilm, digits, ocr-det, ocr-rec, ocr-cls")
    for flag, default in (("--calib-samples", 128), ("--batch", 16), ("--eval", 500), ("--seed", 0),
                          ("--ocr-calib", 32), ("--ocr-eval", 64)):
        ap.add_argument(flag, type=int, default=default)  # --eval: MiniLM sentences; --ocr-*: images
    args = ap.parse_args(argv)
    n_calib, n_eval = (16, 64) if args.quick else (args.calib_samples, args.eval)
    ocr_calib, ocr_eval = (8, 16) if args.quick else (args.ocr_calib, args.ocr_eval)
    WORK.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    host = provenance()
    cells = [c for c in grid(args.quick) if c.method in args.methods.split(",")] + [DEFAULT_ROW]
    sections, readings = [], []
    tasks = []
    if "minilm" in args.models.split(","):
        tasks.append((minilm_task(n_calib, n_eval, args.batch, args.seed), ["cosine", "top1"]))
    if "digits" in args.models.split(","):
        tasks.append((digits_task(n_calib, args.batch, args.seed), ["accuracy"]))
    known = sparsec_flags()
    for name in [m for m in args.models.split(",") if m in quality_ocr.SETUPS]:
        setup = quality_ocr.SETUPS[name](WORK, ocr_calib, ocr_eval, args.seed)
        tasks.append(((_task(name, setup.model, setup.calib_feeds, args.batch, setup.evaluate, setup.shapes),
                       setup.info), setup.keys))
    for (task, info), keys in tasks:
        print(f"## {task.name}: {info}", flush=True)
        rows: dict[Cell, tuple[Outcome, Outcome]] = {}
        task_cells = cells + extra_rows(args.methods.split(","), known, args.extras)
        if task.name in quality_ocr.SETUPS:
            task_cells = ocr_grid(task.name, args.methods.split(","), known, args.extras)
        for cell in task_cells:
            out = WORK / "quality" / task.name / re.sub(r"[^a-z0-9]+", "_", cell.label)
            n_task = sum(len(next(iter(f.values()))) for f in task.calib_feeds)  # OCR: its own count
            rows[cell] = (run_sparsec(cell, task, out / "sparsec", min(n_calib, n_task), args.batch),
                          run_onnxsim(cell, task, out / "onnxsim.onnx"))
            s, o = rows[cell]
            print(f"  {cell.label}: sparsec {s.note or s.metrics} in {s.seconds or 0:.1f}s; "
                  f"onnxsim {o.note or o.metrics} in {o.seconds or 0:.1f}s", flush=True)
        tab = table(task_cells, rows, keys)
        print("\n" + tab + "\n", flush=True)
        sections.append(f"**{task.name}**: {info}.\n\n{tab}\n")
        readings.append(reading(task.name, keys[0], rows))
    print("\n".join(readings))
    if args.record:
        cmd = " ".join(["python bench/quality.py", *(sys.argv[1:] if argv is None else argv)])
        notes = (f"- Calibration: {n_calib} samples, batch {args.batch} (sparsec: `calib=` .npz; onnxsim: "
                 f"the same samples as feed dicts of {args.batch}); sparsec otherwise at its defaults\n"
                 "- Weight sparsity: zeros in the initializers MatMul/Gemm/Conv nodes read as weights\n"
                 f"- OCR models: {ocr_calib} calibration / {ocr_eval} evaluation images (det: a quarter as "
                 "many pages of 6 lines); sparsec-only rows add the flags in their label\n")
        with open(HERE / "RESULTS.md", "a", encoding="utf-8") as fh:  # one append, never a rewrite
            fh.write(f"\n## {started:%Y-%m-%d %H:%M} UTC: pruning quality on real models, sparsec vs onnxsim "
                     f"0.8.1\n\nCommand: `{cmd}`\n\n- Date: {started.isoformat(timespec='seconds')}\n"
                     f"{host}{notes}\n" + "\n".join(sections)
                     + "\nReading (generated): " + " ".join(readings) + "\n")
        print(f"appended to {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
