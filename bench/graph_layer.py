"""Graph-layer benchmark (issue 11): sparsec's GraphIndex/TensorStore I/O against onnx-ir.

The issue asks to adopt onnx-ir (`onnx_ir`) as the graph layer if it is not slower. This
measures, on the 160M-parameter external-data transformer of compile_speed.py and on a
> 2 GB one (same generator, more layers), each run in its own fresh subprocess (peak RSS from
resource.getrusage of that process; peak anonymous memory sampled from /proc/self/statm every
5 ms, since onnx-ir memory-maps the weights and mapped file pages count in RSS):

  sparsec            sparsec.core.graph.load_model + save_model(external=True)
  onnx-ir            ir.load + ir.save(external_data=..., max_workers=1, alignment=64)
  onnx-ir threads    the same with one writer thread per usable CPU (None would mean serial)
  sparsec + edit     load, every MatMul weight: np.array(store.read(t)), zero half (2:4 along
                     axis 0), store.write(t, w); save
  onnx-ir + edit     load, every MatMul weight: np.array(tensor.numpy()), zero half,
                     value.const_value = ir.tensor(w); save (one worker)
  onnx               onnx.load (external data loaded) + onnx.save_model(save_as_external_data)

The 2:4 mask is positional (the first two of every four rows are zeroed): scoring is not what
is measured, and both edit variants do the same numpy work. Tensors under 1 KB stay inside the
.onnx in every variant (sparsec's INLINE_LIMIT). Runs are interleaved (one of each variant,
then the next round, each round starting one variant later) so that load on the shared machine
and position effects spread over all variants; the table
gives the median and range of --repeat runs. After the first run of each variant its output is
checked: every tensor's values must equal the input's (or, for the edit variants, each other's,
with exactly half of every MatMul weight zero), so no variant is timed on a wrong result.

    python bench/graph_layer.py                    # 160M and > 2 GB models, 3 runs each
    python bench/graph_layer.py --record           # also append a section to bench/RESULTS.md
    python bench/graph_layer.py --models small --repeat 1   # quick run
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compile_speed import (  # noqa: E402 - bench scripts import each other by path
    RESULTS,
    ROOT,
    THREAD_ENV,
    WORK,
    describe_source,
    ensure_model,
    fmt_table,
    machine,
    warm_cache,
)

GB = 1e9
INLINE_LIMIT = 1024
EQUAL_BAND = 0.10  # ratios within ±10 % count as equal on a shared 2-core machine
MODELS = {  # gen_transformer parameters; "large" is 2.35 GB of fp32 weights (> 2 GiB)
    "small": {"layers": 12, "d_model": 1024, "ffn": 4096, "vocab": 8192, "seed": 0},
    "large": {"layers": 46, "d_model": 1024, "ffn": 4096, "vocab": 8192, "seed": 0},
}
VARIANTS = ("sparsec", "onnx-ir", "onnx-ir threads", "sparsec + edit", "onnx-ir + edit", "onnx")
EDITED = ("sparsec + edit", "onnx-ir + edit")


# ---------------------------------------------------------------------------------------------
# worker side: one measurement per process


class _AnonPeak:
    """Peak anonymous memory (resident minus file-backed pages), sampled from /proc/self/statm."""

    def __init__(self, period: float = 0.005) -> None:
        self.period = period
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        self.peak = max(self.peak, (int(fields[1]) - int(fields[2])) * self._page)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def __enter__(self) -> _AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def _half_zero(w):
    """Zero the first two of every four rows along axis 0 (a 2:4 pattern), in place."""
    k = w.shape[0] - w.shape[0] % 4
    view = w[:k].reshape(k // 4, 4, *w.shape[1:])
    view[:, :2] = 0
    return w


def _sparsec(model: Path, out: Path, edit: bool, result: dict) -> None:
    import numpy as np

    from sparsec.core.graph import load_model, save_model

    start = time.perf_counter()
    loaded = load_model(model)
    result["load_s"] = time.perf_counter() - start
    start = time.perf_counter()
    if edit:
        graph, store = loaded.model.graph, loaded.store
        inits = {t.name: t for t in graph.initializer}
        names = {n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits}
        for name in sorted(names):
            tensor = inits[name]
            store.write(tensor, _half_zero(np.array(store.read(tensor))))
        result["edited"] = len(names)
    result["edit_s"] = time.perf_counter() - start
    start = time.perf_counter()
    save_model(loaded.model, out / "model.onnx", loaded.store, external=True)
    result["save_s"] = time.perf_counter() - start


def _onnx_ir(model: Path, out: Path, edit: bool, workers: int | None, result: dict) -> None:
    import numpy as np
    import onnx_ir as ir

    start = time.perf_counter()
    m = ir.load(model)
    result["load_s"] = time.perf_counter() - start
    start = time.perf_counter()
    if edit:
        values = {}
        for node in m.graph:
            if node.op_type == "MatMul" and len(node.inputs) > 1:
                v = node.inputs[1]
                if v is not None and v.is_initializer() and v.const_value is not None:
                    values[v.name] = v
        for name in sorted(values):
            v = values[name]
            w = _half_zero(np.array(v.const_value.numpy()))
            v.const_value = ir.tensor(w, name=name)
        result["edited"] = len(values)
    result["edit_s"] = time.perf_counter() - start
    start = time.perf_counter()
    ir.save(m, out / "model.onnx", external_data="model.onnx.data", size_threshold_bytes=INLINE_LIMIT,
            max_workers=workers, alignment=64)
    result["save_s"] = time.perf_counter() - start


def _onnx(model: Path, out: Path, result: dict) -> None:
    import onnx

    start = time.perf_counter()
    proto = onnx.load(str(model), load_external_data=True)
    result["load_s"] = time.perf_counter() - start
    result["edit_s"] = 0.0
    start = time.perf_counter()
    onnx.save_model(proto, str(out / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=INLINE_LIMIT)
    result["save_s"] = time.perf_counter() - start


def worker_main(variant: str, model: Path, out: Path) -> int:
    import numpy  # noqa: F401 - imports are part of the process, not of the measurement
    import onnx  # noqa: F401
    import onnx_ir  # noqa: F401

    import sparsec.core.graph  # noqa: F401

    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"variant": variant}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_start = usage.ru_utime + usage.ru_stime
    with _AnonPeak() as anon:
        start = time.perf_counter()
        if variant.startswith("sparsec"):
            _sparsec(model, out, variant in EDITED, result)
        elif variant.startswith("onnx-ir"):
            workers = len(os.sched_getaffinity(0)) if variant == "onnx-ir threads" else 1
            result["workers"] = workers
            _onnx_ir(model, out, variant in EDITED, workers, result)
        else:
            _onnx(model, out, result)
        result["wall_s"] = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = usage.ru_utime + usage.ru_stime - cpu_start  # all threads, user + system
    result["peak_rss"] = usage.ru_maxrss * 1024  # KiB on Linux
    result["peak_anon"] = anon.peak
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# driver side


def run_worker(variant: str, model: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ)
    env.update({k: "1" for k in THREAD_ENV})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--model", str(model),
           "--out", str(out)]
    os.sync()  # earlier runs' dirty pages should not be flushed during this one
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{variant} on {model.name} failed with exit code {proc.returncode}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["loadavg"] = load
    return result


def tensor_digests(model: Path, edit: frozenset[str] = frozenset()) -> dict[str, str]:
    """Per tensor (initializers and Constant nodes): digest of its values, after the benchmark's
    edit when the tensor is named in `edit` (what an edit variant must have written)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(model), load_external_data=False)
    tensors = list(proto.graph.initializer)
    tensors += [a.t for n in proto.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    digests = {}
    for t in tensors:
        values = np.array(numpy_helper.to_array(t, base_dir=str(model.parent)))
        if t.name in edit:
            _half_zero(values)
        digests[t.name] = hashlib.blake2b(values.data).hexdigest()
    return digests


def check_output(variant: str, out: Path, expected: dict[str, str]) -> None:
    """Refuse a variant whose output values differ from what it was asked to produce."""
    got = tensor_digests(out / "model.onnx")
    if set(got) != set(expected):
        raise SystemExit(f"{variant}: output tensors differ from the input's: "
                         f"{sorted(set(got) ^ set(expected))[:5]}")
    wrong = sorted(name for name, digest in got.items() if digest != expected[name])
    if wrong:
        raise SystemExit(f"{variant}: {len(wrong)} tensors hold other values than expected, e.g. {wrong[0]}")


def matmul_weights(model: Path) -> set[str]:
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    return {n.input[1] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits}


def bench_model(label: str, params: dict, repeat: int, variants: tuple[str, ...]) -> dict:
    path, _ = ensure_model(params)
    data = path.with_name(path.name + ".data")
    weight_bytes = data.stat().st_size
    warm_cache(data)
    reference = tensor_digests(path)
    edited = tensor_digests(path, frozenset(matmul_weights(path)))
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    out = WORK / "runs" / "graph_layer"
    for rep in range(repeat):
        for variant in variants[rep % len(variants):] + variants[:rep % len(variants)]:
            warm_cache(data)  # the previous run's output may have pushed the input out of cache
            result = run_worker(variant, path, out)
            if rep == 0:
                check_output(variant, out, edited if variant in EDITED else reference)
            shutil.rmtree(out, ignore_errors=True)
            runs[variant].append(result)
            print(f"  {label} {variant:16s} run {rep + 1}: {result['wall_s']:.2f}s, "
                  f"CPU {result['cpu_s']:.2f}s "
                  f"(load {result['load_s']:.2f}, edit {result['edit_s']:.2f}, save {result['save_s']:.2f}), "
                  f"peak RSS {result['peak_rss'] / GB:.2f} GB, anon {result['peak_anon'] / GB:.2f} GB, "
                  f"loadavg {result['loadavg']:.2f}", flush=True)
    if out.parent.is_dir() and not any(out.parent.iterdir()):
        out.parent.rmdir()
    return {"label": label, "path": str(path.relative_to(ROOT)), "params": params,
            "weight_bytes": weight_bytes, "runs": runs}


def _med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def table(models: list[dict]) -> str:
    rows = [["model", "variant", "wall s median [min–max]", "CPU s median", "load s", "edit s", "save s",
             "peak RSS GB", "RSS / weight bytes", "peak anon GB"]]
    for m in models:
        name = f"{m['label']} ({m['weight_bytes'] / GB:.2f} GB)"
        for variant, runs in m["runs"].items():
            walls = [r["wall_s"] for r in runs]
            rss = _med(runs, "peak_rss")
            rows.append([name, variant, f"{statistics.median(walls):.2f} [{min(walls):.2f}–{max(walls):.2f}]",
                         f"{_med(runs, 'cpu_s'):.2f}", f"{_med(runs, 'load_s'):.2f}",
                         f"{_med(runs, 'edit_s'):.2f}", f"{_med(runs, 'save_s'):.2f}", f"{rss / GB:.2f}",
                         f"{rss / m['weight_bytes']:.2f}", f"{_med(runs, 'peak_anon') / GB:.2f}"])
    return fmt_table(rows)


def _word(ratio: float, words: tuple[str, str, str]) -> str:
    """onnx-ir / sparsec ratio in words: (better, equal, worse), ±EQUAL_BAND counted as equal."""
    if ratio < 1 - EQUAL_BAND:
        return words[0]
    return words[2] if ratio > 1 + EQUAL_BAND else words[1]


def verdict(models: list[dict]) -> tuple[list[str], bool]:
    """Per model and pair, onnx-ir / sparsec ratios; adopt only if onnx-ir is nowhere slower, in wall
    time or in CPU time (the steadier of the two on a shared machine)."""
    lines, slower = [], False
    for m in models:
        for mine, theirs in (("sparsec", "onnx-ir"), ("sparsec + edit", "onnx-ir + edit")):
            if mine not in m["runs"] or theirs not in m["runs"]:
                continue
            a, b = m["runs"][mine], m["runs"][theirs]
            t = _med(b, "wall_s") / _med(a, "wall_s")
            c = _med(b, "cpu_s") / _med(a, "cpu_s")
            r = _med(b, "peak_rss") / _med(a, "peak_rss")
            n = _med(b, "peak_anon") / max(_med(a, "peak_anon"), 1)
            slower |= t > 1 + EQUAL_BAND or c > 1 + EQUAL_BAND
            speed, mem = ("faster", "equal", "slower"), ("lower", "equal", "higher")
            lines.append(f"{m['label']}, {theirs} vs {mine}: wall time {t:.2f}× ({_word(t, speed)}), "
                         f"CPU time {c:.2f}× ({_word(c, speed)}), peak RSS "
                         f"{r:.2f}× ({_word(r, mem)}), peak anonymous memory {n:.2f}× ({_word(n, mem)})")
    return lines, not slower


def record(text: str) -> None:
    with open(RESULTS, "a") as f:
        f.write("\n" + text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="small,large", help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    ap.add_argument("--repeat", type=int, default=3, help="runs per variant; the table shows the median")
    ap.add_argument("--record", action="store_true", help=f"append a section to {RESULTS.name}")
    ap.add_argument("--delete-large", action="store_true", help="delete the generated > 2 GB model after")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, Path(args.model), Path(args.out))
    variants = tuple(v.strip() for v in args.variants.split(","))
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    import onnx
    import onnx_ir

    before = machine()
    results = []
    for label in args.models.split(","):
        results.append(bench_model(label, MODELS[label], args.repeat, variants))
        if label == "large" and args.delete_large:
            p = ROOT / results[-1]["path"]
            p.unlink(missing_ok=True)
            p.with_name(p.name + ".data").unlink(missing_ok=True)
    lines, adopt = verdict(results)
    loads = [r["loadavg"] for m in results for runs in m["runs"].values() for r in runs]
    cmd = "python bench/graph_layer.py " + " ".join(argv if argv is not None else sys.argv[1:])
    now = dt.datetime.now(dt.timezone.utc)
    sizes = ", ".join(f"{m['label']} = {m['path']} ({m['params']['layers']} layers, "
                      f"{m['weight_bytes'] / GB:.2f} GB of fp32 weights)" for m in results)
    text = "\n".join([
        f"## {now:%Y-%m-%d %H:%M} UTC: graph layer, sparsec TensorStore vs onnx-ir {onnx_ir.__version__} "
        "load/save (issue 11)",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"- Date: {now.isoformat(timespec='seconds')}",
        f"- Machine: {before['nproc']} CPUs ({before['usable_cpus']} usable), "
        f"{before['ram_gib']:.1f} GiB RAM, {before['cpu']}; Python {before['python']}, "
        f"onnx {onnx.__version__}, onnx-ir {onnx_ir.__version__}; "
        f"1-min load average at the start of the runs {min(loads):.2f}–{max(loads):.2f} (shared machine: "
        "compare ratios within this table only)",
        f"- Code: {describe_source(None)}",
        f"- Models (bench/gen_transformer.py, d_model 1024, ffn 4096, vocab 8192): {sizes}",
        f"- Each run a fresh subprocess, OMP/BLAS threads 1, warm page cache; {args.repeat} runs per "
        "variant, interleaved in rotating order; every variant's first output checked value for value. "
        "CPU s = user + system time of the worker (all threads; steadier than wall time under load). "
        "Peak RSS = ru_maxrss (counts memory-mapped weight pages); peak anon = resident minus "
        "file-backed pages, sampled every 5 ms. onnx-ir saves with alignment=64 and one writer thread; "
        "'threads': one per usable CPU.",
        "",
        table(results), "",
        *[f"- {ln}" for ln in lines],
        f"- Verdict (adopt if not slower; ratios within ±{EQUAL_BAND:.0%} count as equal): "
        f"onnx-ir is {'not ' if adopt else ''}slower than sparsec's TensorStore.",
        "",
    ])
    print()
    print(text)
    if args.record:
        record(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
