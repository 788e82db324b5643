"""Over 2 GB with bounded memory: every mode on a 1.1 B-parameter Llama-shaped decoder.

Generates once into ~/.cache/sparsec-corpus/large/ (or $SPARSEC_CORPUS/large) a decoder with
TinyLlama's shape (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000,
RoPE, RMSNorm, SiLU MLP; random weights, fp32, about 4.4 GB of external data), built with
`transformers` and exported the way users do (torch.onnx.export, TorchScript exporter, to a
folder), then rewritten by sparsec's own streaming writer into one 64-byte aligned .data file.
The export is prompt-only: input_ids, attention_mask -> logits (no past/present KV I/O).
A calibration file of 32 x 128 random token ids is written beside it.

Then, each as a fresh subprocess (peak RSS from os.wait4 of that process alone):

  ort          one onnxruntime InferenceSession on the path + one batch of 1 x 128 tokens
  read+write   sparsec.core.graph.load_model + save_model(external=True)
  modes        sparsec compile ... (verification on, as users run it; nm-noverify without it, for the
               time target, which like bench/compile_speed.py's compares pruning with reading and
               writing the weights)

and prints wall time, peak RSS, peak RSS / ort, peak RSS / the largest layer's working set
(its weight twice: the dense view and the rewritten copy; plus the float64 Gram matrix for
SparseGPT) and, for magnitude 2:4, time / read+write. Targets: peak <= 1.5 x ort for every mode,
magnitude 2:4 <= 1.2 x read+write. A mode is killed at --timeout seconds or past --max-rss GB.

    python bench/large_model.py --generate-only
    python bench/large_model.py --modes nm,ffn      # a subset
    python bench/large_model.py --record            # append the table to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
CACHE = Path(os.environ.get("SPARSEC_CORPUS", Path.home() / ".cache" / "sparsec-corpus")) / "large"
SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
CALIB = (32, 128)  # samples x tokens
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}


def generate(cache: Path, layers: int) -> Path:
    """Export once; a second call returns the cached model."""
    model = cache / "model.onnx"
    if model.exists() and (cache / "calib.npz").exists():
        return model
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsec.core.graph import load_model, save_model

    cache.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**{**SHAPE, "num_hidden_layers": layers}, tie_word_embeddings=False,
                         attn_implementation="eager", use_cache=False)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(config).eval()

    class Prompt(torch.nn.Module):
        def __init__(self, lm: torch.nn.Module) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    raw = cache / "export"
    raw.mkdir(exist_ok=True)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 16))
    dims = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "logits": {0: "batch", 1: "seq"}}
    with torch.no_grad():
        torch.onnx.export(Prompt(lm), (ids, torch.ones_like(ids)), str(raw / "model.onnx"), dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes=dims, opset_version=17)
    del lm
    loaded = load_model(raw / "model.onnx")  # one file per tensor -> one aligned .data file
    save_model(loaded.model, model, loaded.store, external=True)
    rng = np.random.default_rng(0)
    np.savez(cache / "calib.npz", input_ids=rng.integers(0, SHAPE["vocab_size"], CALIB).astype(np.int64),
             attention_mask=np.ones(CALIB, np.int64))
    for f in raw.iterdir():
        f.unlink()
    raw.rmdir()
    return model


MODES = {  # name -> compile flags; --encode none except for the encode row (its cost is its own row)
    "nm": ["--nm", "2:4", "--encode", "none"],
    "nm-noverify": ["--nm", "2:4", "--encode", "none", "--no-verify"],  # the time target's subject
    "wanda": ["--nm", "2:4", "--method", "wanda", "--calib", "{calib}", "--encode", "none"],
    "sparsegpt": ["--nm", "2:4", "--method", "sparsegpt", "--sequential", "--calib", "{calib}",
                  "--calib-samples", "{sgpt_samples}", "--encode", "none"],
    "ffn": ["--ffn", "0.25"],
    "fp16": ["--nm", "2:4", "--precision", "fp16", "--encode", "none"],
    "encode": ["--nm", "2:4", "--encode", "auto"],
}
COMMON = ["--shape", "input_ids=1,128", "--shape", "attention_mask=1,128",
          "--calib-range", "input_ids=0,32000", "--calib-range", "attention_mask=1,2"]

ORT_ONE = """
import sys, numpy as np, onnxruntime as ort
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
ids = np.random.default_rng(0).integers(0, 32000, (1, 128)).astype(np.int64)
s.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
"""
READ_WRITE = """
import sys, pathlib
from sparsec.core.graph import load_model, save_model
m = load_model(sys.argv[1])
out = pathlib.Path(sys.argv[2]); out.mkdir(exist_ok=True)
save_model(m.model, out / "model.onnx", m.store, external=True)
"""


def measure(cmd: list[str], timeout: float, max_rss_gb: float) -> dict:
    """Wall time and peak RSS (os.wait4: this process tree's own maxrss) of one fresh subprocess;
    killed past `timeout` seconds or `max_rss_gb` of RSS (sampled every 0.5 s with psutil)."""
    import psutil

    subprocess.run(["sync"], check=False)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            rss = psutil.Process(proc.pid).memory_info().rss
        except psutil.Error:
            rss = 0
        if time.perf_counter() - start > timeout or rss > max_rss_gb * 2**30:
            killed = "timeout" if rss <= max_rss_gb * 2**30 else f"RSS over {max_rss_gb} GB"
            proc.kill()
        time.sleep(0.5)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace").strip().splitlines() if proc.stderr else []
    rc = os.waitstatus_to_exitcode(status)
    return {"wall_s": wall, "peak_gb": usage.ru_maxrss / 2**20, "rc": rc, "killed": killed,
            "last": err[-1] if err and rc else ""}


def largest_layer_bytes(model: Path) -> tuple[int, int]:
    """(bytes of the largest prunable weight, its float64 Gram matrix bytes) from the graph."""
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    consumers = {i for n in m.graph.node if n.op_type in ("MatMul", "Gemm") for i in n.input}
    dims = [tuple(t.dims) for t in m.graph.initializer if t.name in consumers and len(t.dims) == 2]
    big = max(dims, key=lambda d: d[0] * d[1])
    return big[0] * big[1] * 4, max(d[0] for d in dims) ** 2 * 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument("--sgpt-samples", type=int, default=8, help="calibration samples for SparseGPT (of 32)")
    ap.add_argument("--timeout", type=float, default=1500, help="seconds per mode")
    ap.add_argument("--max-rss", type=float, default=12.0, help="GB: a mode past it is stopped")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--record", action="store_true", help=f"append the table to {RESULTS.name}")
    args = ap.parse_args()
    cache = args.cache if args.layers == SHAPE["num_hidden_layers"] else args.cache.with_name(
        f"large-{args.layers}layer")
    model = generate(cache, args.layers)
    if args.generate_only:
        return
    weights, gram = largest_layer_bytes(model)
    work = cache / "out"
    work.mkdir(exist_ok=True)
    py = sys.executable
    base = {"ort": measure([py, "-c", ORT_ONE, str(model)], args.timeout, args.max_rss),
            "read+write": measure([py, "-c", READ_WRITE, str(model), str(work / "rw")], args.timeout,
                                  args.max_rss)}
    for name, r in base.items():
        if r["rc"] or r["killed"]:
            sys.exit(f"{name} failed: {r['killed'] or r['last']}")
    rows = []
    for name in args.modes.split(","):
        flags = [f.format(calib=cache / "calib.npz", sgpt_samples=args.sgpt_samples) for f in MODES[name]]
        flags += COMMON
        cmd = [py, "-m", "sparsec.cli", "compile", str(model), "-o", str(work / name), "--force", "-q",
               *flags]
        r = measure(cmd, args.timeout, args.max_rss)
        r["set"] = weights * 2 + (gram if name == "sparsegpt" else 0)
        rows.append((name, " ".join(flags).replace(str(cache), "$CACHE"), r))
        print(_row(name, r, base), flush=True)
    table = _table(model, weights, base, rows)
    print(table)
    if args.record:
        with open(RESULTS, "a") as f:
            f.write(f"\n## Over 2 GB, bounded memory ({dt.date.today()})\n\n`python bench/large_model.py "
                    f"{' '.join(sys.argv[1:])}`\n\n{table}\n")


def _row(name: str, r: dict, base: dict) -> str:
    ort, rw = base["ort"], base["read+write"]
    status = "ok" if r["rc"] == 0 and not r["killed"] else (r["killed"] or f"rc {r['rc']}: {r['last'][:80]}")
    rel_t = f"{r['wall_s'] / rw['wall_s']:.2f}" if name.startswith("nm") else ""
    return (f"| {name} | {r['wall_s']:.0f} | {r['peak_gb']:.2f} | {r['peak_gb'] / ort['peak_gb']:.2f} | "
            f"{r['peak_gb'] * 2**30 / r['set']:.1f} | {rel_t} | {status} |")


def _table(model: Path, weights: int, base: dict, rows: list) -> str:
    ort, rw = base["ort"], base["read+write"]
    data = sum(f.stat().st_size for f in model.parent.glob("model.onnx*"))
    lines = [f"model: {model.name}, {data / 1e9:.2f} GB on disk (largest weight {weights / 2**20:.0f} MiB); "
             f"one onnxruntime inference (1 x 128 tokens): {ort['wall_s']:.0f} s, {ort['peak_gb']:.2f} GB; "
             f"load_model + save_model: {rw['wall_s']:.0f} s, {rw['peak_gb']:.2f} GB.", "",
             "| mode | wall s | peak GB | / ort | / layer set | / read+write | status |",
             "|---|---|---|---|---|---|---|"]
    lines += [_row(name, r, base) for name, _, r in rows]
    lines += ["", "flags per mode (plus the common --shape/--calib-range ones):", ""]
    lines += [f"- {name}: `{flags}`" for name, flags, _ in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
