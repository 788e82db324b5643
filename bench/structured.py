"""Channel pruning: onnxruntime CPU latency vs the MAC-reduction ideal, digits accuracy, onnxsim beside it.

Models: ``resnet_224`` (ResNet-style, 224×224, BN unfused, batch 1) and the digits CNN (batch 64).
sparsec prunes 25 % / 50 % of channels (``--channel-score l1`` for latency; every score and ``--recover``
for digits accuracy, no fine-tuning). onnxsim 0.8.1's ``apply_structured_pruning`` / ``..._wanda_pruning``
(+ ``apply_pruning_finetune``) run on the same models, as given (BN unfused) and after ``onnxsim.simplify``
(its BN folding, which its channel pruning expects).

Latency: CPUExecutionProvider, 1 intra-op / 1 inter-op thread, ORT_ENABLE_ALL, 5 warm-up runs, then the
median of N runs, every model of one table run once per round (round-robin) in one process.
efficiency = (t_dense / t_pruned) / (MACs_dense / MACs_pruned), target >= 0.9.

    python bench/structured.py --quick      # smoke run
    python bench/structured.py --record     # full run, appends a section to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # golden builders: models/
import sparsec  # noqa: E402
from models import GOLDEN  # noqa: E402
from models.digits import accuracy, train_digits_cnn  # noqa: E402

ROOT = Path(__file__).resolve().parent
FRACS = (0.25, 0.5)
SCORES = ("l1", "l2", "bn", "act")


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def time_round_robin(paths: dict[str, Path], feed: dict, warm: int, reps: int) -> dict[str, float]:
    """Median seconds per run of each model; one run of each model per round, so noise hits all alike."""
    sess = {k: session(p) for k, p in paths.items()}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for i in range(warm + reps):
        for k, s in sess.items():
            t0 = time.perf_counter()
            s.run(None, feed)
            if i >= warm:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def nchwc_convs(path: Path, work: Path) -> str:
    """How many Convs onnxruntime put on its blocked NCHWc path (the rest run as plain FusedConv/Conv)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath, opts.log_severity_level = str(work / "_optimized.onnx"), 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    nodes = onnx.load(work / "_optimized.onnx").graph.node
    blocked = sum(n.op_type == "Conv" and n.domain == "com.microsoft.nchwc" for n in nodes)
    return f"{blocked}/{sum(n.op_type in ('Conv', 'FusedConv') for n in nodes)}"


def macs(path: Path, shapes: dict) -> int:
    return int(sparsec.inspect(path, shapes=shapes).totals["macs"])


def run_sparsec(src: Path, out: Path, shapes: dict, **kw) -> dict:
    try:
        r = sparsec.compile(src, output=out, shapes=shapes, force=True, **kw)
    except Exception as e:  # noqa: BLE001 - a failing cell is reported, not fatal
        return {"error": f"{type(e).__name__}: {e}"}
    c = r.channels or {}
    return {"path": out / "model.onnx", "macs": int(r.totals["macs_nonzero"]),
            "macs_dense": int(r.totals["macs_dense"]), "removed": f"{c.get('removed')}/{c.get('removable')}",
            "masked": (r.verify or {}).get("masked", {}).get("max_abs_diff")}


def check_output(model: onnx.ModelProto, path: Path, feed: dict, ref: np.ndarray) -> tuple[str, float | None]:
    """'ok' or what fails (full checker, onnxruntime run, output shape); cosine of the output to dense."""
    fails = []
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # noqa: BLE001
        fails.append(f"checker: {str(e).splitlines()[0][:160]}")
    try:
        (y,) = session(path).run(None, feed)[:1]
    except Exception as e:  # noqa: BLE001
        return "; ".join([*fails, f"onnxruntime: {str(e).splitlines()[0][:160]}"]), None
    if y.shape != ref.shape:
        fails.append(f"output shape {list(y.shape)} != dense {list(ref.shape)}")
        return "; ".join(fails), None
    a, b = y.ravel().astype(np.float64), ref.ravel().astype(np.float64)
    return "; ".join(fails) or "ok", float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def run_onnxsim(src: onnx.ModelProto, out: Path, frac: float, wanda: bool, cal: list, feed: dict,
                ref: np.ndarray, shapes: dict) -> dict:
    import onnxsim

    cells = {}
    try:
        copy = onnx.ModelProto.FromString(src.SerializeToString())
        if wanda:
            pruned = onnxsim.apply_structured_wanda_pruning(copy, calibration_data=cal, sparsity=frac)
        else:
            pruned = onnxsim.apply_structured_pruning(copy, sparsity=frac)
    except Exception as e:  # noqa: BLE001
        return {"": {"error": f"{type(e).__name__}: {e}"}}
    steps = [("", lambda: pruned), (" +finetune", lambda: onnxsim.apply_pruning_finetune(src, pruned,
                                                                                       calibration_data=cal))]
    for suffix, make in steps:
        try:
            model = make()
            path = out.with_name(out.stem + suffix.strip().replace("+", "_") + ".onnx")
            onnx.save(model, path)
            status, cos = check_output(model, path, feed, ref)
            cells[suffix] = {"path": path, "status": status, "cos": cos, "macs": macs(path, shapes)}
        except Exception as e:  # noqa: BLE001
            cells[suffix] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return cells


def table(head: list[str], rows: list[list]) -> str:
    fmt = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |"
                                                                                 for r in fmt])


def bench_model(name: str, src: Path, feed: dict, cal: list, shapes: dict, work: Path, warm: int, reps: int,
                digits=None) -> tuple[str, str, list[dict]]:
    """Compile every cell of one model, time them round-robin; return (latency, accuracy tables, cells)."""
    import onnxsim

    dense_model = onnx.load(src)
    ref = session(src).run(None, feed)[0]
    dense_macs = macs(src, shapes)
    cells: list[dict] = [{"tool": "dense", "cfg": "-", "path": src, "macs": dense_macs, "timed": True}]
    cal_npz = work / f"{name}_calib.npz"
    for frac in FRACS:
        for score, rt, rec in [("l1", 1, False), ("l1", 16, False)] + (
                [(s, 1, False) for s in SCORES[1:]] + [("l1", 1, True)] if digits else []):
            kw = {"channels": frac, "channel_score": score, "round_to": rt, "recover": rec}
            if score == "act" or rec:
                kw["calib"] = str(cal_npz)
            cfg = f"{frac:.0%} {score}" + (f" round_to={rt}" if rt > 1 else "") + (" recover" if rec else "")
            res = run_sparsec(src, work / f"{name}_sc_{frac}_{score}_{rt}_{int(rec)}", shapes, **kw)
            cells.append({"tool": "sparsec", "cfg": cfg, "timed": score == "l1" and not rec, **res})
    folded_path = work / f"{name}_onnxsim_folded.onnx"
    folded, ok = onnxsim.simplify(dense_model)
    onnx.save(folded, folded_path)
    cells.append({"tool": "onnxsim", "cfg": f"simplify only (BN fold, check={ok})", "path": folded_path,
                  "macs": macs(folded_path, shapes), "timed": True})
    for label, base in [("as given", dense_model), ("BN-folded", folded)]:
        for frac in FRACS:
            for wanda in (False, True):
                tag = f"{name}_os_{label[:2]}_{frac}_{int(wanda)}"
                got = run_onnxsim(base, work / f"{tag}.onnx", frac, wanda, cal, feed, ref, shapes)
                for suffix, res in got.items():
                    cfg = f"{label}, {frac:.0%} {'wanda' if wanda else 'l2'}{suffix}"
                    cells.append({"tool": "onnxsim", "cfg": cfg, "timed": suffix == "", **res})
    timed = {i: c["path"] for i, c in enumerate(cells) if c.get("timed") and "path" in c}
    t = time_round_robin(timed, feed, warm, reps)
    lat_rows, acc_rows = [], []
    for i, c in enumerate(cells):
        c["model_name"] = name
        if digits is not None and "path" in c:
            c["acc"] = accuracy(str(c["path"]), digits.x_test, digits.y_test)
        if i in t:
            c["ms"], c["ideal"] = t[i] * 1e3, dense_macs / max(c["macs"], 1)
            c["speedup"] = t[0] / t[i]
            c["eff"] = c["speedup"] / c["ideal"]
        masked = c.get("masked") is not None and f"masked max diff {c['masked']:.2g}, removed {c['removed']}"
        status = c.get("error") or c.get("status") or masked or ""
        mac = f"{c['macs'] / 1e6:.1f}M" if "macs" in c else "-"
        if i in t:
            c["nchwc"] = nchwc_convs(c["path"], work)
            lat_rows.append([c["tool"], c["cfg"], mac, c["ideal"], c["ms"], c["speedup"], c["eff"],
                             c["nchwc"], status])
        if digits is not None or c["tool"] == "onnxsim":
            extra = [c.get("acc", "-")] if digits is not None else [c.get("cos") if c.get("cos") else "-"]
            acc_rows.append([c["tool"], c["cfg"], mac, *extra, status])
    lat = table(["tool", "config", "MACs", "ideal ×", "median ms", "measured ×", "efficiency", "NCHWc convs",
                 "status"], lat_rows)
    metric = "test accuracy" if digits else "cosine to dense"
    acc = table(["tool", "config", "MACs", metric, "status"], acc_rows)
    return lat, acc, cells


def machine() -> str:
    mem = next(int(x.split()[1]) for x in open("/proc/meminfo") if x.startswith("MemTotal")) / 2**20
    la = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"{platform.processor() or platform.machine()}, nproc {os.cpu_count()}, RAM {mem:.1f} GiB, "
            f"load average {la}; onnxruntime {ort.__version__}, Python {platform.python_version()}")


def reading(cells: list[dict]) -> str:
    out, dense = [], {c["model_name"]: c for c in cells if c["tool"] == "dense"}
    for c in cells:
        if "simplify" in c["cfg"]:
            out.append(f"{c['model_name']} noise yardstick: onnxsim's BN-folded copy (the same work as dense "
                       f"once onnxruntime fuses BN) measured {c['speedup']:.2f}× against dense")
        elif c["tool"] != "dense" and "eff" in c and c["ideal"] > 1.01:
            gap = "" if c["eff"] >= 0.9 else f" ({0.9 - c['eff']:.2f} below target)"
            out.append(f"{c['model_name']} {c['tool']} {c['cfg']}: {c['speedup']:.2f}× of {c['ideal']:.2f}× "
                       f"ideal, efficiency {c['eff']:.2f}{gap}; NCHWc convs {c['nchwc']}")
    noop = [f"{c['model_name']} {c['cfg']} ({1 - c['macs'] / dense[c['model_name']]['macs']:.1%})"
            for c in cells if c["tool"] != "dense" and "macs" in c and "(" not in c["cfg"]
            and "+" not in c["cfg"] and c["macs"] > 0.99 * dense[c["model_name"]]["macs"]]
    fails = [f"{c['model_name']} {c['tool']} {c['cfg']}: {c.get('error') or c.get('status')}" for c in cells
             if c.get("error") or c.get("status", "ok") != "ok"]
    off = [c for c in cells if c.get("eff", 1) < 0.9 and c.get("nchwc") != dense[c["model_name"]]["nchwc"]]
    skip = ("round_to", "(", "as given")
    accs = [f"{c['tool']} {c['cfg'].replace('BN-folded, ', '')} {c['acc']:.2f}" for c in cells
            if "acc" in c and c["tool"] != "dense" and not any(k in c["cfg"] for k in skip)]
    out.append(f"digits test accuracy (dense {dense['digits'].get('acc', 0):.2f}; onnxsim after its BN fold; "
               f"MACs differ per row, see the table): {', '.join(accs)}")
    text = "- " + "\n- ".join(out)
    if off:
        text += (f"\n- {len(off)} below-target rows have fewer Convs on onnxruntime's blocked NCHWc kernels "
                 "than dense (column NCHWc convs); likely cause: channel counts that are not multiples of "
                 "the CPU's NCHWc block fall back to the plain im2col conv (compare the round_to=16 rows)")
    if noop:
        text += "\n- removed < 1 % of MACs: " + "; ".join(noop)
    text += "\n- failures / incorrect outputs: " + ("; ".join(fails) if fails else "none")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 warm-up runs, 5 / 10 timed runs")
    ap.add_argument("--record", action="store_true", help="append a section to bench/RESULTS.md")
    ap.add_argument("--work", type=Path, default=ROOT / "_work" / "structured")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    warm, reps_r, reps_d = (2, 5, 10) if args.quick else (5, 50, 300)
    before = machine()
    sections = []
    all_cells: list[dict] = []

    d = train_digits_cnn(0, cache_dir=ROOT / "_work")
    dpath = args.work / "digits.onnx"
    onnx.save(d.model, dpath)
    in_name = d.model.graph.input[0].name
    xcal = d.x_train[:256]
    np.savez(args.work / "digits_calib.npz", **{in_name: xcal[:, None]})  # [256, 1, 1, 8, 8]: keep batch dim
    dcal = [{in_name: xcal[i:i + 32]} for i in range(0, 256, 32)]
    dfeed = {in_name: d.x_test[:64]}
    lat, acc, cells = bench_model("digits", dpath, dfeed, dcal, {in_name: (64, 1, 8, 8)}, args.work, warm,
                                  reps_d, digits=d)
    dense_acc = cells[0]["acc"]
    sections += [f"### digits CNN, batch 64, {reps_d} timed runs (dense accuracy {dense_acc:.3f})\n\n{lat}",
                 f"### digits accuracy (no fine-tuning unless marked; {len(d.x_test)} test images)\n\n{acc}"]
    all_cells += cells

    rpath = args.work / "resnet_224.onnx"
    rmodel = GOLDEN["resnet_224"]()
    onnx.save(rmodel, rpath)
    rname = rmodel.graph.input[0].name
    rng = np.random.default_rng(0)
    rcal_x = rng.standard_normal((4, 1, 3, 224, 224), dtype=np.float32)
    np.savez(args.work / "resnet_224_calib.npz", **{rname: rcal_x})
    rfeed = {rname: rng.standard_normal((1, 3, 224, 224), dtype=np.float32)}
    lat, acc, cells = bench_model("resnet_224", rpath, rfeed, [{rname: x} for x in rcal_x],
                                  {rname: (1, 3, 224, 224)}, args.work, warm, reps_r)
    sections += [f"### resnet_224, batch 1, {reps_r} timed runs\n\n{lat}",
                 f"### resnet_224 onnxsim outputs (random weights: cosine to dense, 1 N(0,1) image)\n\n{acc}"]
    all_cells += cells

    body = "\n\n".join(sections)
    print(body)
    print("\nreading:\n" + reading(all_cells))
    if args.record:
        cmd = "python bench/structured.py " + " ".join(sys.argv[1:])
        section = (f"\n\n## {datetime.date.today()}: channel pruning latency vs MAC ideal, digits accuracy, "
                   f"onnxsim 0.8.1 beside it\n\nCommand: `{cmd}`. Machine: {machine()} (load at start: "
                   f"{before.split('load average ')[1].split(';')[0]}). Threads: intra_op 1, inter_op 1, "
                   f"ORT_ENABLE_ALL, CPUExecutionProvider; {warm} warm-up runs, median, models interleaved "
                   f"round-robin in one process.\n\n{body}\n\n**Reading.**\n{reading(all_cells)}\n")
        with open(ROOT / "RESULTS.md", "a") as f:
            f.write(section)


if __name__ == "__main__":
    main()
