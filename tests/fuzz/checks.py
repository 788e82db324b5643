"""Checks of one compile that recompute everything from the model files, never from the report
(the report is read only to know which weights it claims it pruned, and its totals are checked).

`run_case(model, shapes, mode, workdir)` returns a `Case`: `failures` is a list of (class, detail);
`refused` holds a SparsecError's message (a legitimate outcome when it is one line).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

import sparsec
from sparsec.errors import SparsecError

MODES: dict[str, dict[str, Any]] = {
    "nm24": {"nm": "2:4"},
    "unstructured": {"sparsity": 0.5},
    # the kept-weight checks read biases too: bias correction (default with calibration data) is off here
    "wanda24": {"nm": "2:4", "method": "wanda", "calib_random": 4, "bias_correct": False},
    "wanda_unstructured": {"sparsity": 0.5, "method": "wanda", "calib_random": 4, "bias_correct": False},
    "fold": {"fold_bn": True},
    "channels0": {"channels": 0.0},
    "channels30": {"channels": 0.3},
    "channels50r4": {"channels": 0.5, "round_to": 4},
    "nm24_fold": {"nm": "2:4", "fold_bn": True},
    "channels30_nm24": {"channels": 0.3, "nm": "2:4"},  # a recipe: channels, BN folding, then 2:4
}
LONG_MODES = {**MODES, "sparsegpt24": {"nm": "2:4", "method": "sparsegpt", "calib_random": 4}}
COMMON = {"force": True, "min_params": 1, "quiet": True}
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class Case:
    seed: int
    mode: str
    failures: list[tuple[str, str]] = field(default_factory=list)
    refused: str | None = None
    notes: list[str] = field(default_factory=list)

    def fail(self, cls: str, detail: str) -> None:
        self.failures.append((cls, detail))


# -- reading models without sparsec ----------------------------------------------------------------
def constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every initializer and Constant-node output by name."""
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def weight_reads(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, int, str, list[int] | None]]:
    """(layer node, input index, stored constant, Transpose perm or None) for every constant operand
    of Conv/ConvTranspose/Gemm/MatMul, reached directly or through one Transpose/Identity."""
    consts = constants(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    reads = []
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        slots = (1,) if node.op_type.startswith("Conv") else (0, 1)
        for i in slots:
            name, perm = node.input[i], None
            p = producer.get(name)
            if p is not None and p.op_type in ("Transpose", "Identity") and p.input[0] in consts:
                perm = list(_attrs(p).get("perm", [])) if p.op_type == "Transpose" else None
                name = p.input[0]
            if name in consts and consts[name].ndim >= 2:
                reads.append((node, i, name, perm))
    return reads


def reduction_axis(node: onnx.NodeProto, slot: int, ndim: int) -> int:
    """TensorRT's N:M axis in the layout the layer reads (Polygraphy's axes, README table)."""
    a = _attrs(node)
    if node.op_type == "Conv":
        return 1
    if node.op_type == "ConvTranspose":
        return 0
    if node.op_type == "Gemm":
        if slot == 1:
            return 1 if a.get("transB", 0) else 0
        return 0 if a.get("transA", 0) else 1
    return ndim - 2 if slot == 1 else ndim - 1  # MatMul X@W: K is W's rows; W@X: W's columns


def nm_violations(w: np.ndarray, axis: int, n: int = 2, m: int = 4) -> int:
    """Groups of m consecutive weights along `axis` holding more than n non-zeros (-1: axis not divisible)."""
    moved = np.moveaxis(w, axis, -1)
    if moved.shape[-1] % m:
        return -1
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    return int(((groups != 0).sum(-1) > n).sum())


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def run(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    src = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def random_feeds(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(10_000 + seed)
    return {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}


# -- one case ----------------------------------------------------------------------------------------
def run_case(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], mode: str, workdir: Path,
             seed: int = 0, reference: onnx.ModelProto | None = None) -> tuple[Case, onnx.ModelProto | None]:
    """Compile `model` in `mode` and check the result; returns the case and the written model."""
    case = Case(seed, mode)
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / "model.onnx"
    src.write_bytes(model.SerializeToString())
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    out = workdir / f"out_{mode}"
    opts = {**COMMON, **LONG_MODES[mode]}
    try:
        report = sparsec.compile(src, output=out, shapes=shapes, **opts)
    except SparsecError as exc:
        text = str(exc)
        case.refused = text
        if "\n" in text or not text.strip():
            case.fail("error-not-one-line", text[:200])
        return case, None
    except Exception as exc:  # noqa: BLE001 - anything but SparsecError is a failure
        kind = type(exc).__name__
        case.fail(f"exception {kind}: {_words(str(exc))}", f"{kind}: {str(exc)[:300]}")
        return case, None
    finally:
        if hashlib.sha256(src.read_bytes()).hexdigest() != digest:
            case.fail("input-modified", str(src))
    written = out / "model.onnx"
    try:
        onnx.checker.check_model(str(written), full_check=True)
    except Exception as exc:  # noqa: BLE001
        case.fail("checker", str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
    pruned = onnx.load(str(written))
    feeds = random_feeds(shapes, seed)
    try:
        dense_out, pruned_out = run(model, feeds), run(str(written), feeds)
    except Exception as exc:  # noqa: BLE001
        case.fail("onnxruntime", str(exc).splitlines()[0][:200])
        return case, pruned
    _check_io(case, model, pruned, dense_out, pruned_out)
    combined = "channels" in opts and ("nm" in opts or "sparsity" in opts)
    _check_totals(case, model, pruned, report, structured="channels" in opts and not combined)
    if combined:  # the weights table is the main one; the channel step keeps its own totals
        _check_step_totals(case, model, pruned, report, "channels")
    if "nm" in opts:
        _check_nm(case, model, pruned, report, bit_identical=not opts.get("fold_bn") and opts.get("method")
                  != "sparsegpt" and "channels" not in opts)
    elif "sparsity" in opts:
        _check_kept_bits(case, model, pruned)
    elif opts.get("channels", 0) == 0:  # fold-only or channels=0: a rewrite that must not change outputs
        _check_close(case, "fold-not-equal", dense_out, pruned_out, 1e-4)
    else:
        declared = (report.channels or {}).get("compensation", {}).get("inexact_consumers", [])
        _check_oracle(case, model, reference, pruned, feeds, pruned_out, declared)
    return case, pruned


def _words(text: str, n: int = 5) -> str:
    import re

    words = re.sub(r"'[^']*'|\"[^\"]*\"|\d+(\.\d+)?", "…", text).split()
    return " ".join(words[:n])


def _check_io(case: Case, model, pruned, dense_out, pruned_out) -> None:
    def sig(m):
        return [(o.name, o.type.tensor_type.elem_type, [d.dim_value for d in o.type.tensor_type.shape.dim])
                for o in m.graph.output]
    if sig(model) != sig(pruned):
        case.fail("outputs-changed", f"{sig(model)} -> {sig(pruned)}")
    for name, value in dense_out.items():
        got = pruned_out.get(name)
        if got is None or got.shape != value.shape or got.dtype != value.dtype:
            case.fail("output-shape", f"{name}: {value.shape} -> {None if got is None else got.shape}")
        elif not np.all(np.isfinite(got)):
            case.fail("output-not-finite", name)


def _check_close(case: Case, cls: str, want: dict, got: dict, rtol: float) -> float:
    worst = 0.0
    for name, ref in want.items():
        scale = max(float(np.abs(ref).max()), 1e-6)
        diff = float(np.abs(ref - got[name]).max()) / scale if ref.size else 0.0
        worst = max(worst, diff)
        if diff > rtol:
            case.fail(cls, f"{name}: max|diff|/max|ref| = {diff:.3g} > {rtol}")
    return worst


def _check_kept_bits(case: Case, model, pruned) -> None:
    """Every weight present in both models: same shape, and each non-zero is bit-identical."""
    before, after = constants(model), constants(pruned)
    for name, w in after.items():
        if name not in before or before[name].dtype != w.dtype or w.dtype.kind != "f":
            continue
        b = before[name]
        if b.shape != w.shape:
            case.fail("weight-shape-changed", f"{name}: {b.shape} -> {w.shape}")
            continue
        keep = w != 0
        if not np.array_equal(_bits(w[keep]), _bits(b[keep])):
            case.fail("kept-weight-changed", name)


def _check_nm(case: Case, model, pruned, report, bit_identical: bool) -> None:
    claimed = {e.weight for e in report.layers if e.skipped_reason is None}
    for node, slot, name, perm in weight_reads(pruned):
        if name not in claimed:
            continue
        w = constants(pruned)[name]
        axis = reduction_axis(node, slot, w.ndim)
        if perm:  # the layer reads Transpose(stored): read axis a is stored axis perm[a]
            axis = perm[axis]
        bad = nm_violations(w, axis)
        if bad:
            case.fail("nm-violated" if bad > 0 else "nm-on-indivisible-axis",
                      f"{name} ({node.op_type} {node.name!r} slot {slot}, axis {axis}): {bad} groups")
    if bit_identical:
        _check_kept_bits(case, model, pruned)


def _check_totals(case: Case, model, pruned, report, structured: bool) -> None:
    """The report's params/nonzeros equal counts on the written model (and the input for params)."""
    t = report.totals
    weights = {e.weight for e in report.layers}
    after, before = constants(pruned), constants(model)
    missing = [w for w in weights if w not in after]
    if missing:
        case.fail("report-weight-missing", ", ".join(sorted(missing))[:200])
        return
    if structured:
        params = sum(before[w].size for w in weights if w in before)
        nonzeros = sum(after[w].size for w in weights)
    else:
        params = sum(after[w].size for w in weights)
        nonzeros = sum(int(np.count_nonzero(after[w])) for w in weights)
    if (t["params"], t["nonzeros"]) != (params, nonzeros):
        added = sorted(w for w in weights if w not in before)
        case.fail("report-totals" + ("-added-constants" if added else ""),
                  f"report params/nonzeros {t['params']}/{t['nonzeros']}, written {params}/{nonzeros}"
                  + (f"; weights not in the input: {', '.join(added[:3])}" if added else ""))
    # a constant sparsec added (a border-correction kernel) is no layer of the input model
    mine = {name for _, _, name, _ in weight_reads(pruned) if name in before}
    if not structured and weights != mine:
        case.fail("report-layer-set", f"not reported {sorted(mine - weights)[:3]}, "
                                      f"reported but no layer {sorted(weights - mine)[:3]}")


def _check_step_totals(case: Case, model, pruned, report, step: str) -> None:
    """A combined compile: the structural step's params before equal the input's, and its kept
    weights equal the written shapes (the weights stage zeroes values, it never changes shapes)."""
    entry = next((s for s in (report.steps or []) if s.get("name") == step), None)
    totals = (entry or {}).get("totals")
    if not totals:
        case.fail("step-totals-missing", f"steps[{step}] has no totals")
        return
    before, after = constants(model), constants(pruned)
    weights = [w for w in {e.weight for e in report.layers} if w in before and w in after]
    params = sum(before[w].size for w in weights)
    kept = sum(after[w].size for w in weights)
    if (totals["params"], totals["nonzeros"]) != (params, kept):
        case.fail("step-totals", f"steps[{step}] params/kept {totals['params']}/{totals['nonzeros']}, "
                                 f"input/written {params}/{kept}")


# -- the channel oracle ----------------------------------------------------------------------------
def _out_in_axes(node: onnx.NodeProto, slot: int, ndim: int) -> tuple[int, int]:
    a = _attrs(node)
    if node.op_type == "Conv":
        return 0, 1
    if node.op_type == "ConvTranspose":
        return 1, 0
    if node.op_type == "Gemm":
        if slot == 1:
            return (0, 1) if a.get("transB", 0) else (1, 0)
        return (1, 0) if a.get("transA", 0) else (0, 1)
    return (ndim - 1, ndim - 2) if slot == 1 else (ndim - 2, ndim - 1)


def kept_indices(dense: np.ndarray, small: np.ndarray, out_axis: int, in_axis: int):
    """(kept outputs, kept inputs) such that small == dense[kept_out][:, kept_in] bit for bit, or None."""
    d = np.moveaxis(dense, (out_axis, in_axis), (0, 1))
    s = np.moveaxis(small, (out_axis, in_axis), (0, 1))
    d2, s2 = d.reshape(*d.shape[:2], -1), s.reshape(*s.shape[:2], -1)
    where: dict[bytes, set[tuple[int, int]]] = {}
    for k in range(d2.shape[0]):
        for c in range(d2.shape[1]):
            where.setdefault(d2[k, c].tobytes(), set()).add((k, c))
    outs: list[set[int]] = [set(range(d2.shape[0])) for _ in range(s2.shape[0])]
    ins: list[set[int]] = [set(range(d2.shape[1])) for _ in range(s2.shape[1])]
    for i in range(s2.shape[0]):
        for j in range(s2.shape[1]):
            hits = where.get(s2[i, j].tobytes())
            if not hits:
                return None
            outs[i] &= {k for k, _ in hits}
            ins[j] &= {c for _, c in hits}
    if any(not o for o in outs) or any(not c for c in ins):
        return None
    ko, ki = [min(o) for o in outs], [min(c) for c in ins]
    if not np.array_equal(_bits(d2[np.ix_(ko, ki)]), _bits(s2)):
        return None
    return ko, ki


def _check_oracle(case: Case, model, reference, pruned, feeds, pruned_out, declared: list[str]) -> None:
    """Zero the removed filters of every source myself and compare the pruned model with that.

    A difference is a failure unless the report declares an inexact consumer (a zero-padded border
    that a removed constant reaches): then it is recorded as a note."""
    base = reference if reference is not None else model
    bases = [constants(model), constants(base)]
    after = constants(pruned)
    removed: dict[str, tuple[int, list[int]]] = {}
    inexact = []
    # a depthwise conv cut down to one channel has group=1 in the pruned model: read the dense group
    dense_group = {name: _attrs(node).get("group", 1) for node, _, name, _ in weight_reads(model)}
    for node, slot, name, _ in weight_reads(pruned):
        if name not in bases[0]:  # a constant sparsec added (e.g. a border-correction kernel)
            case.notes.append(f"added constant {name}")
            continue
        small = after[name]
        oa, ia = _out_in_axes(node, slot, small.ndim)
        match = None
        for b in bases:
            match = kept_indices(b[name], small, oa, ia)
            if match is not None:
                break
        if match is None:
            case.fail("oracle-unmatched", f"{name} {bases[0][name].shape} -> {small.shape}")
            return
        ko, ki = match
        full_out, full_in = bases[0][name].shape[oa], bases[0][name].shape[ia]
        group = dense_group.get(name, _attrs(node).get("group", 1))
        sliced_in = len(ki) < full_in or (group > 1 and len(ko) < full_out)
        a = _attrs(node)
        padded = node.op_type == "ConvTranspose" or any(a.get("pads", [])) or (
            a.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"))
        if sliced_in and padded:
            inexact.append(node.name or name)
        if group == 1 and len(ko) < full_out:  # a source (depthwise convs only pass channels through)
            removed[name] = (oa, sorted(set(range(full_out)) - set(ko)))
    if not removed:
        _check_close(case, "channels0-not-equal", run(model, feeds), pruned_out, 1e-4)
        return
    masked = onnx.ModelProto()
    masked.CopyFrom(base)
    for tensor in _tensors(masked):
        if tensor.name in removed:
            oa, gone = removed[tensor.name]
            w = numpy_helper.to_array(tensor).copy()
            idx = [slice(None)] * w.ndim
            idx[oa] = gone
            w[tuple(idx)] = 0
            tensor.CopyFrom(numpy_helper.from_array(w, tensor.name))
    if inexact:
        case.notes.append(f"padded consumer {', '.join(inexact[:3])}")
    probe = Case(case.seed, case.mode)
    worst = _check_close(probe, "oracle-mismatch", run(masked, feeds), pruned_out, 1e-4)
    if probe.failures and declared:
        case.notes.append(f"declared inexact: max rel diff {worst:.3g} ({declared[0][:80]})")
    elif probe.failures:
        cls = "oracle-mismatch-padded" if inexact else "oracle-mismatch"
        case.failures += [(cls, detail) for _, detail in probe.failures]


def _tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    a.t.name = n.output[0]
                    yield a.t


def run_seed(seed: int, modes: list[str] | tuple[str, ...], workdir: Path) -> list[Case]:
    """Every mode on one generated model; the fold-only output is the channel oracle's reference."""
    from fuzz.generator import make_model

    model, shapes = make_model(seed)
    cases, reference = [], None
    order = sorted(modes, key=lambda m: m != "fold")
    for mode in order:
        case, written = run_case(model, shapes, mode, workdir / f"s{seed}", seed,
                                 reference if mode.startswith("channels") else None)
        if mode == "fold" and not case.failures and written is not None:
            reference = written
        cases.append(case)
    return cases
