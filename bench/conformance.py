"""Conformance matrix: every compile mode on every corpus model, run through the CLI as a user would.

Each cell is **ok** (exit 0, model.onnx passes onnx's full check and loads in onnxruntime, the report shows
the mode did something and agrees with the files), **nothing** (exit 0 with a valid, unchanged model and
the one-line reason in ``report.nothing_pruned``, e.g. a model without BatchNormalization under --fold-bn),
**refused** (non-zero exit with one ``Error:`` line and no traceback) or **failed** (anything else:
traceback, crash, timeout, nothing done without a reason, invalid output, a report that contradicts the
files). Transformers also get the number of attention blocks ``sparsec inspect`` finds.

    python bench/model_corpus.py fetch && python bench/model_corpus.py export
    python bench/conformance.py [--models a,b] [--modes nm,wanda] [--small] [--out FILE.md] [--jobs 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_corpus  # noqa: E402  (bench/model_corpus.py)
from model_corpus import Entry  # noqa: E402

TIMEOUT_S = 300


@dataclass(frozen=True)
class Mode:
    """One compile mode: its CLI options and what the report must show for it to count as done."""

    name: str
    args: tuple[str, ...]
    done: str  # weights | channels | fold_bn | precision | heads | ffn | tokens
    calib: bool = False
    transformer_only: bool = False


MODES: tuple[Mode, ...] = (
    Mode("nm", ("--nm", "2:4"), "weights"),
    Mode("sparsity", ("--sparsity", "0.5"), "weights"),
    Mode("wanda", ("--sparsity", "0.5", "--method", "wanda"), "weights", calib=True),
    Mode("sparsegpt", ("--nm", "2:4", "--method", "sparsegpt"), "weights", calib=True),
    Mode("channels", ("--channels", "0.3"), "channels"),
    Mode("fold-bn", ("--fold-bn",), "fold_bn"),
    Mode("fp16", ("--nm", "2:4", "--precision", "fp16"), "precision"),
    Mode("heads", ("--heads", "0.25"), "heads", transformer_only=True),
    Mode("ffn", ("--ffn", "0.25"), "ffn", transformer_only=True),
    Mode("tokens", ("--tokens", "0.7"), "tokens", transformer_only=True),
    Mode("channels+nm", ("--channels", "0.3", "--fold-bn", "--nm", "2:4"), "steps"),
    Mode("heads+ffn+sparsegpt", ("--heads", "0.25", "--ffn", "0.25", "--nm", "2:4", "--method", "sparsegpt"),
         "steps", calib=True, transformer_only=True),
)
BY_NAME = {m.name: m for m in MODES}


@dataclass
class Cell:
    model: str
    mode: str
    status: str  # ok | nothing | refused | failed | n/a
    detail: str = ""  # the refusal/failure message, or the verify figure for ok
    seconds: float = 0.0
    command: str = ""


def sparsec_cmd() -> list[str]:
    """The CLI as installed (``sparsec``), or the module when the script is not on PATH."""
    exe = shutil.which("sparsec")
    return [exe] if exe else [sys.executable, "-m", "sparsec.cli"]


def calib_file(entry: Entry) -> Path:
    return entry.write_calib(model_corpus.cache_dir() / "calib" / f"{entry.id}.npz")


def command(entry: Entry, mode: Mode, out: Path) -> list[str]:
    cmd = [*sparsec_cmd(), "compile", str(entry.path), "-o", str(out), "--force", "-q",
           *mode.args, *entry.cli_args()]
    if mode.calib:
        cmd += ["--calib", str(calib_file(entry))]
    return cmd


# ---------------------------------------------------------------- checks of an exit-0 cell

def _tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Every constant tensor by name: initializers and Constant outputs, subgraphs included."""
    found: dict[str, onnx.TensorProto] = {}

    def walk(graph: onnx.GraphProto) -> None:
        for t in graph.initializer:
            found[t.name] = t
        for node in graph.node:
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value":
                        found[node.output[0]] = a.t
            for a in node.attribute:
                for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    walk(g)

    walk(model.graph)
    return found


def _ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            for a in node.attribute:
                for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    walk(g)

    walk(model.graph)
    return counts


def _blocks(report: dict) -> list[dict]:
    return list((report.get("transformer") or {}).get("blocks") or [])


def _changed(blocks: list[dict], key: str) -> bool:
    return any((b.get(f"{key}_after") is not None and b.get(f"{key}_before") is not None
                and b[f"{key}_after"] < b[f"{key}_before"]) for b in blocks)


def what_was_done(mode: Mode, report: dict, dense: onnx.ModelProto, pruned: onnx.ModelProto) -> str | None:
    """A failure message when the report or the files show that the mode did nothing; None when it did."""
    totals = report.get("totals") or {}
    if mode.done == "steps":  # a combined compile: some step did something, every other one said why
        steps = [s for s in report.get("steps") or [] if s.get("name") != "encode"]
        if not any(s.get("modified") for s in steps):
            return "exit 0 but no step modified the model"
        silent = [s["name"] for s in steps if not s.get("modified") and not s.get("nothing")]
        return f"exit 0 but steps {silent} did nothing without saying why" if silent else None
    if mode.done in ("weights", "precision") and not totals.get("layers_pruned"):
        return "exit 0 but no layer pruned (totals.layers_pruned = 0)"
    if mode.done == "channels" and not (report.get("channels") or {}).get("removed"):
        return "exit 0 but no channel removed (channels.removed = 0)"
    if mode.done == "fold_bn":
        before, after = _ops(dense).get("BatchNormalization", 0), _ops(pruned).get("BatchNormalization", 0)
        if after >= before:
            return f"exit 0 but BatchNormalization nodes {before} -> {after}: nothing folded"
    if mode.done == "precision":
        halves = sum(t.data_type == onnx.TensorProto.FLOAT16 for t in _tensors(pruned).values())
        if not halves:
            return "exit 0 with --precision fp16 but no float16 tensor in model.onnx"
    if mode.done in ("heads", "ffn", "tokens"):
        blocks = _blocks(report)
        if not blocks:
            return f"exit 0 but transformer.blocks is empty: no {mode.done} removed"
        if not _changed(blocks, mode.done):
            return f"exit 0 but no block has {mode.done}_after < {mode.done}_before"
    return None


def consistency(report: dict, out: Path, pruned: onnx.ModelProto) -> str | None:
    """A failure message when report.json contradicts the files it describes."""
    enc = report.get("encoding") or {}
    for key in ("container", "skeleton"):
        name = enc.get(key)
        if isinstance(name, str) and not (out / Path(name).name).exists():
            return f"report names encoding.{key} {Path(name).name}, which was not written"
    layers = [la for la in report.get("layers") or [] if la.get("skipped_reason") is None]
    skipped = {s.get("name") for s in report.get("skipped") or []}
    both = sorted(la["name"] for la in layers if la.get("name") in skipped)
    if both:
        return f"layers {both[:3]} are both pruned in layers[] and listed in skipped[]"
    if "channels" in report:
        return None  # weight shapes changed; zero counts do not apply
    tensors = _tensors(pruned)
    expected: dict[str, int] = {}
    for la in layers:
        if la.get("params") is not None and la.get("nonzeros") is not None and la.get("weight"):
            expected[la["weight"]] = max(expected.get(la["weight"], 0), la["params"] - la["nonzeros"])
    for name, removed in expected.items():
        if name not in tensors:
            continue  # renamed by a conversion: checked through onnx's check instead
        t = tensors[name]
        if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type not in (1, 10, 16):
            continue
        zeros = int(np.count_nonzero(numpy_helper.to_array(t) == 0))
        if zeros < removed:
            return f"report says {removed} weights of {name} removed, model.onnx has {zeros} zeros"
    return None


def verify_figure(report: dict) -> str:
    v = report.get("verify")
    if not isinstance(v, dict):
        return "verify: none"
    if "skipped" in v:
        return f"verify skipped: {v['skipped']}"
    cos = [o.get("cosine") for o in v.get("outputs") or [] if o.get("cosine") is not None]
    figure = f"cos {min(cos):.3f}" if cos else f"max diff {v.get('max_abs_diff', float('nan')):.2g}"
    masked = v.get("masked") or {}
    if masked.get("max_abs_diff") is not None:
        figure += f", masked {masked['max_abs_diff']:.1g}"
    return figure


def check_ok(mode: Mode, entry: Entry, out: Path) -> str | None:
    """None when an exit-0 cell is really ok; otherwise why it is a failure."""
    model_path, report_path = out / "model.onnx", out / "report.json"
    if not model_path.exists() or not report_path.exists():
        return "exit 0 but model.onnx or report.json missing"
    try:
        onnx.checker.check_model(str(model_path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - any checker complaint is a failed cell
        return f"onnx.checker: {' '.join(str(exc).split())[:200]}"
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        return f"onnxruntime cannot load model.onnx: {' '.join(str(exc).split())[:200]}"
    report = json.loads(report_path.read_text())
    dense = onnx.load(str(entry.path), load_external_data=False)
    pruned = onnx.load(str(model_path), load_external_data=True)
    return what_was_done(mode, report, dense, pruned) or consistency(report, out, pruned)


# ---------------------------------------------------------------- running cells

# A one-line error that reports sparsec's own breakage (an invalid graph it wrote, a crash inside a pass)
# is not a refusal of an unsupported construct.
# The corpus table's shapes and ranges are known to run the dense model (the other modes verify on them),
# so "onnxruntime cannot run the model" there means the rewritten graph is broken.
INTERNAL = re.compile(r"onnxruntime cannot (load|run)|ONNXRuntimeError|ShapeInferenceError|"
                      r"TypeInferenceError|failed: [A-Za-z]*(Error|Exception)\b")


def classify(rc: int | None, stderr: str) -> tuple[str, str]:
    """Status and message of a non-ok exit: one ``Error:`` line and no traceback is a refusal."""
    if rc is None:
        return "failed", f"timeout after {TIMEOUT_S} s"
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error:")]
    if rc > 0 and "Traceback" not in stderr and len(errors) == 1:
        message = " ".join(errors[0][len("Error:"):].split())
        if INTERNAL.search(message):
            return "failed", f"internal error as a one-line message: {message[:300]}"
        return "refused", message
    tail = lines[-1] if lines else f"exit {rc} with no message"
    return "failed", f"exit {rc}: {' '.join(tail.split())[:300]}"


def run_cell(entry: Entry, mode: Mode, work: Path) -> Cell:
    if mode.transformer_only and entry.family != "transformer":
        return Cell(entry.id, mode.name, "n/a")
    out = work / entry.id / mode.name
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        cmd = command(entry, mode, out)
    except Exception as exc:  # noqa: BLE001 - a calibration file we cannot write is a harness failure
        return Cell(entry.id, mode.name, "failed", f"harness: calibration data: {exc}")
    shown = " ".join(["sparsec", *cmd[len(sparsec_cmd()):]])
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env,
                              cwd=str(work))
        rc, stderr = done.returncode, done.stderr
    except subprocess.TimeoutExpired:
        rc, stderr = None, ""
    seconds = time.perf_counter() - start
    if rc == 0:
        problem = check_ok(mode, entry, out)
        status = "failed" if problem else "ok"
        detail = problem or verify_figure(json.loads((out / "report.json").read_text()))
        said = _nothing_said(out) if problem and problem.startswith("exit 0 ") else None
        if said:  # did nothing, and said why in one line: a named non-result, not a silent no-op
            status, detail = "nothing", said
    else:
        status, detail = classify(rc, stderr)
    shutil.rmtree(out, ignore_errors=True)
    return Cell(entry.id, mode.name, status, detail, seconds, shown)


def _nothing_said(out: Path) -> str | None:
    try:
        return json.loads((out / "report.json").read_text()).get("nothing_pruned")
    except (OSError, ValueError):
        return None


def attention_blocks(entry: Entry) -> str:
    """How many attention blocks ``sparsec inspect --json`` finds (a message when it cannot tell)."""
    cmd = [*sparsec_cmd(), "inspect", str(entry.path), "--json"]
    for name, dims in entry.shapes.items():
        cmd += ["--shape", f"{name}={','.join(str(d) for d in dims)}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return "inspect timed out"
    if done.returncode != 0:
        return classify(done.returncode, done.stderr)[1]
    info = json.loads(done.stdout)
    blocks = info.get("attention") or []
    heads = sorted({b.get("heads") for b in blocks if isinstance(b, dict) and b.get("heads")})
    text = f"{len(blocks)}" + (f" × {','.join(map(str, heads))} heads" if heads else "")
    missed = info.get("unexplained_softmax") or []
    if missed:
        reasons = sorted({m.get("reason", "?") for m in missed if isinstance(m, dict)})
        text += f"; {len(missed)} Softmax unmatched ({'; '.join(reasons)[:120]})"
    return text


def run_matrix(entries: list[Entry], modes: list[Mode], jobs: int = 1, work: Path | None = None,
               log=print) -> list[Cell]:
    """Run every (model, mode) cell and return them in table order."""
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="sparsec-conformance-")) if own else work
    pairs = [(e, m) for e in entries for m in modes]
    try:
        def one(pair: tuple[Entry, Mode]) -> Cell:
            cell = run_cell(*pair, work)
            if cell.status != "n/a":
                log(f"{cell.model:22} {cell.mode:10} {cell.status:8} {cell.seconds:6.1f}s  {cell.detail}")
            return cell

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            return list(pool.map(one, pairs))
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- the table

def markdown(entries: list[Entry], modes: list[Mode], cells: list[Cell], blocks: dict[str, str],
             argv: list[str]) -> str:
    by = {(c.model, c.mode): c for c in cells}
    mark = {"ok": "ok", "nothing": "nothing", "refused": "refused", "failed": "**FAILED**", "n/a": "–"}
    lines = [f"Command: `python bench/conformance.py {' '.join(argv)}`  ",
             f"Date: {datetime.datetime.now().isoformat(timespec='minutes')}, {platform.node()}, "
             f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at the end; "
             f"per-cell timeout {TIMEOUT_S} s",
             "", "| model | family | attention blocks | " + " | ".join(m.name for m in modes) + " |",
             "|---|---|---|" + "---|" * len(modes)]
    for e in entries:
        row = [mark[by[(e.id, m.name)].status] if (e.id, m.name) in by else "" for m in modes]
        lines.append(f"| {e.id} | {e.family} | {blocks.get(e.id, '–')} | " + " | ".join(row) + " |")
    counts = {s: sum(c.status == s for c in cells) for s in ("ok", "nothing", "refused", "failed")}
    lines += ["", f"{counts['ok']} ok, {counts['nothing']} nothing (reason said), "
              f"{counts['refused']} refused, {counts['failed']} failed.", ""]
    for status in ("failed", "refused", "nothing", "ok"):
        group = [c for c in cells if c.status == status]
        if group:
            lines.append(f"**{status}** ({'verify figure' if status == 'ok' else 'message'}):")
            lines += [f"- {c.model} × {c.mode} ({c.seconds:.0f} s): {c.detail}" for c in group]
            lines.append("")
    lines.append("Per-model options: " + "; ".join(
        f"{e.id}: `{' '.join(e.cli_args()) or '(none)'}`" for e in entries))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma-separated corpus ids (default: all)")
    ap.add_argument("--modes", help=f"comma-separated modes (default: all of {', '.join(BY_NAME)})")
    ap.add_argument("--small", action="store_true", help="only corpus models under 20 MB")
    ap.add_argument("--out", type=Path, help="also write the markdown table to this file")
    ap.add_argument("--json", type=Path, help="also write every cell (status, message, command) as JSON")
    ap.add_argument("--jobs", type=int, default=1, help="cells run in parallel (default 1)")
    ap.add_argument("--timeout", type=int, default=TIMEOUT_S, help="per-cell timeout in seconds")
    args = ap.parse_args(argv)
    globals()["TIMEOUT_S"] = args.timeout
    entries = model_corpus.select(args.models)
    model_corpus.fetch(entries, log=lambda m: print(m, file=sys.stderr))
    model_corpus.export(entries, log=lambda m: print(m, file=sys.stderr))
    entries = model_corpus.select(args.models, small=args.small)
    modes = [BY_NAME[m] for m in args.modes.split(",")] if args.modes else list(MODES)
    blocks = {e.id: attention_blocks(e) for e in entries if e.family == "transformer"}
    cells = run_matrix(entries, modes, jobs=args.jobs, log=lambda m: print(m, file=sys.stderr, flush=True))
    table = markdown(entries, modes, cells, blocks, argv)
    print(table)
    if args.out:
        args.out.write_text(table)
    if args.json:
        args.json.write_text(json.dumps({"blocks": blocks, "cells": [vars(c) for c in cells]}, indent=1))
    return 1 if any(c.status == "failed" for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
