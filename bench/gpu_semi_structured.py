"""GPU evidence for 2:4: sparsec's pruned weights through PyTorch's cuSPARSELt semi-structured kernels.

Two steps, on two machines:

    python bench/gpu_semi_structured.py --prepare            # here (CPU): prune, pack into .gpuw/
    python bench/gpu_semi_structured.py --weights .gpuw      # on a CUDA machine: convert, check, time

``--prepare`` prunes all-MiniLM-L6-v2 (every MatMul sparsec marks 2:4) and one MatMul per unique linear
shape of a 1.1 B Llama decoder (TinyLlama-1.1B: hidden 2048, intermediate 5632, 32 query / 4 KV heads of
64) with ``sparsec.compile(nm="2:4")``, and stores each pruned weight in PyTorch's Linear layout
``[out, in]`` (the reduction axis last, where cuSPARSELt needs the 2:4 groups) as its kept fp16 values
plus a bit mask, so the GPU side needs only torch and numpy.

The GPU run converts every weight with ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt backend,
fp16 and bf16) and counts it accepted only if the conversion raised nothing, ``to_dense()`` gives back the
pruned weight bit for bit (cuSPARSELt's compress silently drops values of a non-2:4 tensor) and
``F.linear`` agrees with the dense product within ``TOL``. Then, per unique shape, dtype and
batch × tokens in ``TOKENS``, it times dense ``F.linear(x, W)`` against the sparse one: each timed sample
is ``INNER`` calls captured in a CUDA graph (GPU time without Python dispatch; the subclass' dispatch
costs tens of µs per call) or, where capture fails, launched eagerly (marked), median over ``REPS``
samples after warm-up, CUDA events. Beside it: the alg id cuSPARSELt's search picks, torch's CUTLASS
backend (sm_8x only) and the bare kernels (``torch.mm`` vs ``torch._cslt_sparse_mm`` on pre-transposed,
padded x). Output: a markdown report on stdout and in ``$OUT/gpu.md``; variants that fail are n/a and
tallied by reason. Recorded run (H100, torch 2.11): bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # golden builders: models/
TOKENS = (1, 128, 2048)
REPS = 50
INNER = 20
WARMUP = 10
FAILS: dict[str, int] = {}  # optional variant failures: "variant dtype: reason" -> rows
TOL = {"float16": 1e-2, "bfloat16": 2e-2}  # relative Frobenius error of sparse vs dense F.linear

# TinyLlama-1.1B linear layers, torch layout [out, in]; roles sharing a shape are timed once.
LLAMA = {"hidden": 2048, "intermediate": 5632, "heads": 32, "kv_heads": 4, "head_dim": 64}
LLAMA_SHAPES = {
    "q_proj,o_proj": (2048, 2048),
    "k_proj,v_proj": (256, 2048),
    "gate_proj,up_proj": (5632, 2048),
    "down_proj": (2048, 5632),
}


# ---------------------------------------------------------------------------------------------------------
# --prepare (CPU, needs sparsec)
# ---------------------------------------------------------------------------------------------------------

def _llama_onnx(path: Path, seed: int = 0) -> None:
    """One MatMul ``X @ W`` (W stored [in, out], reduction axis 0) per unique TinyLlama linear shape."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, outputs = [], [], []
    x_in = {2048: "x2048", 5632: "x5632"}
    for i, (roles, (out_f, in_f)) in enumerate(LLAMA_SHAPES.items()):
        w = (rng.standard_normal((in_f, out_f), dtype=np.float32) * 0.02).astype(np.float32)
        name = roles.split(",")[0]
        inits.append(numpy_helper.from_array(w, f"{name}.weight"))
        nodes.append(helper.make_node("MatMul", [x_in[in_f], f"{name}.weight"], [f"y{i}"], name=name))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, out_f]))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, k]) for k, n in x_in.items()]
    graph = helper.make_graph(nodes, "llama_1b1_linears", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))


def _pruned_weights(out_dir: Path) -> list[dict]:
    """Every 2:4 layer of a compile's report, with its weight moved to [out, in] (reduction axis last)."""
    import onnx
    from onnx import numpy_helper

    report = json.loads((out_dir / "report.json").read_text())
    model = onnx.load(str(out_dir / "model.onnx"), load_external_data=True)
    inits = {t.name: t for t in model.graph.initializer}
    rows = []
    for layer in report["layers"]:
        if layer.get("pattern") != "2:4" or layer.get("skipped_reason"):
            continue
        w = numpy_helper.to_array(inits[layer["weight"]])
        if w.ndim != 2:
            print(f"  skip {layer['name']}: weight {layer['weight']} is {w.ndim}-D", file=sys.stderr)
            continue
        w = np.ascontiguousarray(np.moveaxis(w, layer["reduction_axis"], -1))
        rows.append({"layer": layer["name"], "weight": layer["weight"], "w": w})
    return rows


def _check_24(w: np.ndarray) -> int:
    """Number of 4-groups along the last axis holding more than 2 non-zeros (0 = valid 2:4)."""
    groups = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
    return int((groups > 2).sum())


def prepare(dest: Path, work: Path) -> None:
    """Prune both models with sparsec and pack the 2:4 weights as kept fp16 values + bit masks."""
    import sparsec
    from models.minilm import export_minilm

    work.mkdir(parents=True, exist_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    sources = []
    minilm = work / "minilm.onnx"
    if not minilm.exists():
        export_minilm(minilm)
    sparsec.compile(minilm, output=work / "minilm_24", nm="2:4", verify=False, force=True)
    sources.append(("minilm", work / "minilm_24"))
    llama = work / "llama_1b1_linears.onnx"
    _llama_onnx(llama)
    sparsec.compile(llama, output=work / "llama_24", nm="2:4", verify=True, force=True)
    sources.append(("llama-1.1b", work / "llama_24"))

    arrays, meta = {}, []
    for model_name, out_dir in sources:
        for row in _pruned_weights(out_dir):
            w16 = row["w"].astype(np.float16)
            bad = _check_24(w16)
            if bad:
                raise SystemExit(f"{model_name}/{row['weight']}: {bad} groups break 2:4 along `in`")
            key = f"w{len(meta)}"
            mask = w16 != 0
            arrays[f"{key}_values"] = w16[mask]
            arrays[f"{key}_mask"] = np.packbits(mask.reshape(-1))
            role = row["layer"]
            if model_name.startswith("llama"):
                role = next(r for r in LLAMA_SHAPES if r.split(",")[0] == row["layer"])
            meta.append({"key": key, "model": model_name, "layer": row["layer"], "weight": row["weight"],
                         "role": role, "shape": list(w16.shape)})
    np.savez(dest / "weights.npz", **arrays)
    (dest / "meta.json").write_text(json.dumps({"llama": LLAMA, "weights": meta}, indent=1))
    size = sum(f.stat().st_size for f in dest.iterdir())
    print(f"packed {len(meta)} weights into {dest} ({size / 2**20:.1f} MiB)")


# ---------------------------------------------------------------------------------------------------------
# GPU run (needs torch + numpy only)
# ---------------------------------------------------------------------------------------------------------

def load_weights(src: Path) -> list[dict]:
    """Unpack .gpuw/: each entry gets ``w``, the pruned fp16 weight [out, in] as numpy."""
    meta = json.loads((src / "meta.json").read_text())["weights"]
    data = np.load(src / "weights.npz")
    for m in meta:
        shape = tuple(m["shape"])
        mask = np.unpackbits(data[f"{m['key']}_mask"], count=shape[0] * shape[1]).astype(bool)
        w = np.zeros(shape[0] * shape[1], np.float16)
        w[mask] = data[f"{m['key']}_values"]
        m["w"] = w.reshape(shape)
    return meta


def _time(fn, torch, graph: bool) -> tuple[float, bool]:
    """Median µs per call of ``fn``; ``graph`` tries CUDA-graph capture of INNER calls first."""
    if graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(INNER):
                    fn()
            run = g.replay
        except Exception:  # noqa: BLE001 - any capture failure falls back to eager timing
            torch.cuda.synchronize()
            return _time(fn, torch, graph=False)[0], False
    else:
        def run() -> None:
            for _ in range(INNER):
                fn()
    for _ in range(WARMUP):
        run()
    torch.cuda.synchronize()
    samples = []
    for _ in range(REPS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b) * 1000 / INNER)
    return statistics.median(samples), graph


def _fail(variant: str, dtype, e: Exception) -> None:
    """Tally an optional variant's failure (reported once per reason at the end)."""
    key = f"{variant}, {str(dtype).split('.')[-1]}: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    FAILS[key] = FAILS.get(key, 0) + 1


def _opt(name: str, fn, torch, dtype) -> tuple[float | None, bool]:
    """``_time`` for an optional variant: None (and the reason on stderr) where it fails."""
    try:
        return _time(fn, torch, graph=True)
    except Exception as e:  # noqa: BLE001 - optional variants may be unsupported for a shape
        _fail(name, dtype, e)
        torch.cuda.synchronize()
        return None, True


def _measure(x, w, ws, wc, torch) -> tuple[dict[str, float | None], bool]:
    """µs per call of every variant for one (weight, dtype, tokens); True if any ran eager.

    ``dense``/``sparse``/``tuned``/``cutlass``: ``F.linear(x, ·)`` with the dense weight, the cuSPARSELt
    subclass (alg 0, then the alg id cuSPARSELt's search picks) and the CUTLASS subclass. ``raw_*``: the
    kernels alone on ``x`` padded to 16 tokens and pre-transposed (``torch.mm(W, xT)`` vs
    ``torch._cslt_sparse_mm(packed, xT)``), i.e. without the wrapper's padding and transposes.
    """
    import torch.nn.functional as F  # noqa: N812

    dt = w.dtype
    ws.alg_id_cusparselt = 0
    t: dict[str, float | None] = {}
    t["dense"], gd = _time(partial(F.linear, x, w), torch, graph=True)
    t["sparse"], gs = _time(partial(F.linear, x, ws), torch, graph=True)
    t["cutlass"], gc = (None, True) if wc is None else _opt("cutlass", partial(F.linear, x, wc), torch, dt)
    pad = -x.shape[0] % 16
    xt = torch.nn.functional.pad(x, (0, 0, 0, pad)).t().contiguous()
    t["raw_dense"], g1 = _opt("raw dense", partial(torch.mm, w, xt), torch, dt)
    t["raw_sparse"], g2 = _opt("raw sparse", partial(torch._cslt_sparse_mm, ws.packed, xt), torch, dt)
    t["tuned"], gt = None, True
    try:
        alg = torch._cslt_sparse_mm_search(ws.packed, xt)
        alg = int(alg[0] if isinstance(alg, tuple) else alg)
        if alg == 0:
            t["tuned"] = t["sparse"]
        else:
            ws.alg_id_cusparselt = alg
            t["tuned"], gt = _opt("tuned (searched alg id)", partial(F.linear, x, ws), torch, dt)
    except Exception as e:  # noqa: BLE001 - tuning is optional
        _fail("alg search", dt, e)
        torch.cuda.synchronize()
    finally:
        ws.alg_id_cusparselt = 0
    return t, not all((gd, gs, gc, g1, g2, gt))


def gpu_run(src: Path, out: Path | None, dry: bool) -> int:
    """Convert every weight, check it, time the unique shapes; print and write the markdown report."""
    import torch
    import torch.nn.functional as F  # noqa: N812
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    weights = load_weights(src)
    lines: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    cuda = torch.cuda.is_available() and not dry
    dev = "cuda" if cuda else "cpu"
    say("## GPU: sparsec 2:4 weights through torch semi-structured sparsity (cuSPARSELt)")
    say()
    if cuda:
        p = torch.cuda.get_device_properties(0)
        cslt = torch.backends.cusparselt
        say(f"- device: {torch.cuda.get_device_name(0)} ({p.multi_processor_count} SMs, "
            f"{p.total_memory / 2**30:.0f} GiB), capability {p.major}.{p.minor}")
        say(f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuSPARSELt "
            f"{cslt.version() if cslt.is_available() else 'NOT AVAILABLE'}")
    else:
        say(f"- DRY run on CPU (torch {torch.__version__}): no conversion, no timing")
    SparseSemiStructuredTensor._FORCE_CUTLASS = False  # cuSPARSELt, not the CUTLASS fallback
    say(f"- weights: {len(weights)} sparsec-pruned 2:4 weights from {src} "
        f"({', '.join(sorted({m['model'] for m in weights}))}); layout [out, in], 2:4 along `in`")
    say()

    # 1. conversion acceptance, every weight, both dtypes
    dtypes = (torch.float16, torch.bfloat16)
    counts = {str(d).split(".")[-1]: [0, 0] for d in dtypes}
    failures = []
    converted: dict[tuple[str, str], tuple] = {}
    g = torch.Generator(device=dev).manual_seed(0)
    for m in weights:
        bad = _check_24(m["w"])
        for dt in dtypes:
            dname = str(dt).split(".")[-1]
            w = torch.from_numpy(m["w"]).to(dev).to(dt if cuda else torch.float32).contiguous()
            try:
                if bad:
                    raise ValueError(f"{bad} groups have >2 non-zeros along `in`")
                x = torch.randn(128, w.shape[1], device=dev, generator=g).to(w.dtype)
                ref = F.linear(x, w)
                if cuda:
                    ws = to_sparse_semi_structured(w)
                    backend = type(ws).__name__
                    if not torch.equal(ws.to_dense(), w):
                        raise ValueError("to_dense() differs from the pruned weight")
                    y = F.linear(x, ws)
                    err = (torch.linalg.norm((y - ref).float()) / torch.linalg.norm(ref.float())).item()
                    if not err <= TOL[dname]:
                        raise ValueError(f"F.linear rel. error {err:.2e} > {TOL[dname]}")
                    converted[(m["key"], dname)] = (w, ws, backend, err)
                counts[dname][0] += 1
            except Exception as e:  # noqa: BLE001 - every failure is counted and named
                counts[dname][1] += 1
                failures.append(f"{m['model']}/{m['weight']} {tuple(m['w'].shape)} {dname}: "
                                f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    say("### Conversion (`to_sparse_semi_structured`, exact `to_dense()` round trip, F.linear vs dense)"
        if cuda else "### 2:4 pattern along `in` (dry: no conversion)")
    say()
    backends = sorted({v[2] for v in converted.values()})
    say(f"backend: {', '.join(backends) or 'n/a'}")
    say()
    say("| dtype | accepted | failed |")
    say("|---|---|---|")
    for dname, (ok, ko) in counts.items():
        say(f"| {dname} | {ok} | {ko} |")
    if converted:
        worst = max(v[3] for v in converted.values())
        say()
        say(f"max relative error sparse vs dense F.linear (128 tokens): {worst:.2e}")
    for f in failures:
        say(f"- FAILED {f}")
    say()

    # 2. timing, one weight per unique (model, shape)
    if not cuda:
        say("(dry: timing skipped)")
        _write(out, lines)
        return 0 if not failures else 1
    uniq: dict[tuple[str, tuple], dict] = {}
    for m in weights:
        uniq.setdefault((m["model"], tuple(m["w"].shape)), m)
    roles: dict[tuple[str, tuple], int] = {}
    for m in weights:
        k = (m["model"], tuple(m["w"].shape))
        roles[k] = roles.get(k, 0) + (len(m["role"].split(",")) if m["model"].startswith("llama") else 1)
    try:
        min_rows = torch.sparse.SparseSemiStructuredTensorCUSPARSELT._DTYPE_SHAPE_CONSTRAINTS[
            torch.float16].dense_min_rows
    except (AttributeError, KeyError):
        min_rows = "?"
    say(f"### Timing: y = F.linear(x, W), x [tokens, in]; µs per call, median of {REPS} samples of "
        f"{INNER} calls (CUDA graph unless marked eager), {WARMUP} warm-ups")
    say()
    say(f"sparse = cuSPARSELt subclass, alg 0 (torch pads x to a multiple of {min_rows} tokens; the padding "
        "is in the time); tuned = the alg id `torch._cslt_sparse_mm_search` picks (n/a: search failed); "
        "cutlass = the CUTLASS subclass; raw = the kernels alone, x padded to 16 tokens and pre-transposed: "
        "`torch.mm(W, xT)` vs `torch._cslt_sparse_mm(packed, xT)`. (×) = dense / sparse.")
    say()
    say("| model | W [out, in] | roles | dtype | tokens | dense | sparse | tuned | cutlass | raw dense "
        "| raw sparse |")
    say("|---|---|---|---|---|---|---|---|---|---|---|")

    def cell(ref: float | None, v: float | None) -> str:
        return "n/a" if v is None or ref is None else f"{v:.1f} ({ref / v:.2f}×)"

    cols = ("dense", "sparse", "best", "raw_dense", "raw_sparse")
    totals: dict[tuple[str, str, int], dict[str, float]] = {}
    for (model, shape), m in uniq.items():
        for dt in dtypes:
            dname = str(dt).split(".")[-1]
            if (m["key"], dname) not in converted:
                continue
            w, ws, _, _ = converted[(m["key"], dname)]
            try:
                if torch.cuda.get_device_capability()[0] != 8:
                    raise RuntimeError("torch's CUTLASS 2:4 kernels run on compute capability 8.x only")
                SparseSemiStructuredTensor._FORCE_CUTLASS = True
                wc = to_sparse_semi_structured(w)
            except Exception as e:  # noqa: BLE001 - CUTLASS is an extra column only
                _fail("cutlass", dt, e)
                wc = None
            finally:
                SparseSemiStructuredTensor._FORCE_CUTLASS = False
            for tok in TOKENS:
                x = torch.randn(tok, shape[1], device="cuda", generator=g).to(dt)
                try:
                    t, eager = _measure(x, w, ws, wc, torch)
                except Exception as e:  # noqa: BLE001 - one failed row must not lose the others
                    say(f"| {model} | {shape[0]}×{shape[1]} | | {dname} | {tok} | FAILED: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:120]} | | | | | |")
                    torch.cuda.synchronize()
                    continue
                t["best"] = min(t[k] for k in ("sparse", "tuned", "cutlass") if t[k] is not None)
                n = roles[(model, shape)]
                tot = totals.setdefault((model, dname, tok), dict.fromkeys(cols, 0.0))
                for k in cols:
                    tot[k] += n * t[k] if t[k] is not None else float("nan")
                d, rd = t["dense"], t["raw_dense"]
                say(f"| {model} | {shape[0]}×{shape[1]} | {n} | {dname} | {tok} | {d:.1f}"
                    f"{' (eager)' if eager else ''} | {cell(d, t['sparse'])} | {cell(d, t['tuned'])} | "
                    f"{cell(d, t['cutlass'])} | {cell(None, rd) if rd is None else f'{rd:.1f}'} | "
                    f"{cell(rd, t['raw_sparse'])} |")
    say()
    say("### Per block (sum over the block's linear layers, each timed alone; µs and dense/sparse)")
    say()
    say("| model | dtype | tokens | dense | sparse | best sparse (alg 0, tuned, cutlass) | raw dense "
        "| raw sparse |")
    say("|---|---|---|---|---|---|---|---|")
    n_minilm = sum(1 for w in weights if w["model"] == "minilm")
    blocks = {"minilm": max(1, n_minilm // 6)}  # 6 linear weights per encoder layer; llama: one layer
    for (model, dname, tok), tot in totals.items():
        n = blocks.get(model, 1)
        d, rd = tot["dense"] / n, tot["raw_dense"] / n
        say(f"| {model} | {dname} | {tok} | {d:.1f} | {cell(d, tot['sparse'] / n)} | "
            f"{cell(d, tot['best'] / n)} | {rd:.1f} | {cell(rd, tot['raw_sparse'] / n)} |")
    say()
    if FAILS:
        say("Optional variants that did not run (n/a above), count per reason:")
        say()
        for reason, n in FAILS.items():
            say(f"- {n} × {reason}")
        say()
    say("minilm: one encoder layer = Q, K, V, O 384×384 + FFN 1536×384 + 384×1536 (the 6 layers' sum / 6); "
        "llama-1.1b: one decoder layer = q, k, v, o, gate, up, down (shapes from TinyLlama-1.1B).")
    _write(out, lines)
    return 0 if not failures else 1


def _write(out: Path | None, lines: list[str]) -> None:
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepare", action="store_true", help="prune and pack the weights (CPU, needs sparsec)")
    ap.add_argument("--weights", type=Path, default=ROOT / ".gpuw", help="packed weights folder")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "_work" / "gpu24",
                    help="scratch folder for --prepare's ONNX models")
    ap.add_argument("--dry", action="store_true", help="CPU check of the unpacking and numerics, no timing")
    args = ap.parse_args(argv)
    if args.prepare:
        t0 = time.time()
        prepare(args.weights, args.work)
        print(f"prepared in {time.time() - t0:.0f} s")
        return 0
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    return gpu_run(args.weights, out, args.dry)


if __name__ == "__main__":
    raise SystemExit(main())
