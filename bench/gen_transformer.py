"""Generate a large BERT-like encoder (fp32, external data) for the compile-speed benchmark.

The graph is built with onnx.helper; every weight is streamed straight into ONE external
data file (``<name>.onnx.data`` next to the ``.onnx``) as it is drawn, so peak memory while
generating is about one tensor, not the whole model.

Per layer: Q/K/V/O MatMul with [d, d] weights + Add biases, attention core (Reshape to heads,
Transpose, MatMul, scale, Softmax, MatMul, Transpose, Reshape) over symbolic batch/seq,
residual Add + LayerNormalization, FFN MatMul [d, ffn] -> Gelu (Erf pattern) or Relu ->
MatMul [ffn, d], residual Add + LayerNormalization. The token embedding is a Gather.

Usage:
    python bench/gen_transformer.py OUT.onnx [--layers 12 ...]   # write a model
    python bench/gen_transformer.py --check                      # small model through onnxruntime
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
ALIGN = 64  # byte alignment of each tensor in the .data file (lets runtimes mmap it)
META_KEY = "bench.gen_transformer"


def default_params(layers: int = 12, d_model: int = 1024, ffn: int = 4096, vocab: int = 8192,
                   heads: int | None = None, activation: str = "gelu", seed: int = 0) -> dict:
    heads = heads or max(1, d_model // 64)
    return {"layers": layers, "d_model": d_model, "ffn": ffn, "vocab": vocab, "heads": heads,
            "activation": activation, "seed": seed}


def count_params(layers: int, d_model: int, ffn: int, vocab: int) -> int:
    """Float parameters the generated model holds (weights, biases, LayerNorm scale/bias)."""
    d = d_model
    per_layer = 4 * (d * d + d) + (d * ffn + ffn) + (ffn * d + d) + 2 * (2 * d)
    return vocab * d + 2 * d + layers * per_layer


class _DataWriter:
    """Appends tensors to one external data file and returns TensorProtos that point into it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = path.name
        self.f = open(path, "wb")
        self.bytes = 0
        self.params = 0

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array, dtype=np.float32)
        pad = (-self.f.tell()) % ALIGN
        if pad:
            self.f.write(b"\0" * pad)
        offset = self.f.tell()
        self.f.write(array.data)  # no bytes copy
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = TensorProto.FLOAT
        tensor.dims.extend(array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)),
                           ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key = key
            entry.value = value
        self.bytes += array.nbytes
        self.params += array.size
        return tensor

    def close(self) -> None:
        self.f.close()


def generate(path: str | os.PathLike, layers: int = 12, d_model: int = 1024, ffn: int = 4096,
             vocab: int = 8192, seed: int = 0, heads: int | None = None,
             activation: str = "gelu") -> dict:
    """Write the encoder to `path` (+ `path`.data). Returns the parameters and the counts."""
    if activation not in ("gelu", "relu"):
        raise ValueError("activation must be 'gelu' or 'relu'")
    params = default_params(layers, d_model, ffn, vocab, heads, activation, seed)
    heads = params["heads"]
    d = d_model
    if d % heads:
        raise ValueError(f"d_model {d} is not divisible by heads {heads}")
    dh = d // heads
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_path = path.with_name(path.name + ".data")
    rng = np.random.default_rng(seed)
    writer = _DataWriter(data_path)

    def weight(name: str, shape: tuple[int, ...]) -> TensorProto:
        w = rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(1.0 / math.sqrt(shape[0]))  # fan-in scaled: activations stay O(1)
        return writer.add(name, w)

    def vector(name: str, n: int, mean: float, std: float) -> TensorProto:
        v = rng.standard_normal(n, dtype=np.float32)
        v *= np.float32(std)
        v += np.float32(mean)
        return writer.add(name, v)

    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, array: np.ndarray) -> str:  # small constants stay inside the .onnx
        inits.append(numpy_helper.from_array(array, name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def linear(x: str, prefix: str, k: int, n: int) -> str:
        inits.append(weight(f"{prefix}.weight", (k, n)))
        inits.append(vector(f"{prefix}.bias", n, 0.0, 0.02))
        y = node("MatMul", [x, f"{prefix}.weight"], f"{prefix}/MatMul")
        return node("Add", [y, f"{prefix}.bias"], f"{prefix}/Add")

    def layernorm(x: str, prefix: str) -> str:
        inits.append(vector(f"{prefix}.scale", d, 1.0, 0.1))
        inits.append(vector(f"{prefix}.bias", d, 0.0, 0.1))
        return node("LayerNormalization", [x, f"{prefix}.scale", f"{prefix}.bias"],
                    f"{prefix}/LayerNormalization", axis=-1, epsilon=1e-5)

    heads_shape = const("shape.heads", np.array([0, 0, heads, dh], dtype=np.int64))
    merge_shape = const("shape.merge", np.array([0, 0, d], dtype=np.int64))
    scale = const("attn.scale", np.array(1.0 / math.sqrt(dh), dtype=np.float32))
    half = const("gelu.half", np.array(0.5, dtype=np.float32))
    one = const("gelu.one", np.array(1.0, dtype=np.float32))
    sqrt2 = const("gelu.sqrt2", np.array(math.sqrt(2.0), dtype=np.float32))

    inits.append(weight("embed.tok.weight", (vocab, d)))
    x = node("Gather", ["embed.tok.weight", "input_ids"], "embed/Gather", axis=0)
    x = layernorm(x, "embed.ln")
    for i in range(layers):
        p = f"layer{i}"
        q = linear(x, f"{p}.attn.q", d, d)
        k = linear(x, f"{p}.attn.k", d, d)
        v = linear(x, f"{p}.attn.v", d, d)
        q = node("Reshape", [q, heads_shape], f"{p}.attn/q/Reshape")
        q = node("Transpose", [q], f"{p}.attn/q/Transpose", perm=[0, 2, 1, 3])  # B,H,S,dh
        k = node("Reshape", [k, heads_shape], f"{p}.attn/k/Reshape")
        k = node("Transpose", [k], f"{p}.attn/k/Transpose", perm=[0, 2, 3, 1])  # B,H,dh,S
        v = node("Reshape", [v, heads_shape], f"{p}.attn/v/Reshape")
        v = node("Transpose", [v], f"{p}.attn/v/Transpose", perm=[0, 2, 1, 3])  # B,H,S,dh
        s = node("MatMul", [q, k], f"{p}.attn/scores/MatMul")
        s = node("Mul", [s, scale], f"{p}.attn/scores/Mul")
        s = node("Softmax", [s], f"{p}.attn/Softmax", axis=-1)
        c = node("MatMul", [s, v], f"{p}.attn/context/MatMul")
        c = node("Transpose", [c], f"{p}.attn/context/Transpose", perm=[0, 2, 1, 3])
        c = node("Reshape", [c, merge_shape], f"{p}.attn/context/Reshape")
        o = linear(c, f"{p}.attn.o", d, d)
        x = node("Add", [x, o], f"{p}.attn/residual/Add")
        x = layernorm(x, f"{p}.ln1")
        h = linear(x, f"{p}.ffn.fc1", d, ffn)
        if activation == "gelu":  # 0.5 * h * (1 + erf(h / sqrt(2))), as exporters emit it
            e = node("Div", [h, sqrt2], f"{p}.ffn/gelu/Div")
            e = node("Erf", [e], f"{p}.ffn/gelu/Erf")
            e = node("Add", [e, one], f"{p}.ffn/gelu/Add")
            e = node("Mul", [h, e], f"{p}.ffn/gelu/Mul")
            h = node("Mul", [e, half], f"{p}.ffn/gelu/Mul_1")
        else:
            h = node("Relu", [h], f"{p}.ffn/Relu")
        h = linear(h, f"{p}.ffn.fc2", ffn, d)
        x = node("Add", [x, h], f"{p}.ffn/residual/Add")
        x = layernorm(x, f"{p}.ln2")
    nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="output/Identity"))
    writer.close()

    graph = helper.make_graph(
        nodes, "bench_transformer",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", d])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="sparsec.bench")
    model.ir_version = IR_VERSION
    info = dict(params, params_total=writer.params, data_bytes=writer.bytes, data_file=data_path.name)
    helper.set_model_props(model, {META_KEY: json.dumps(info, sort_keys=True)})
    path.write_bytes(model.SerializeToString())  # weights are already in the .data file
    expected = count_params(layers, d_model, ffn, vocab)
    assert writer.params == expected, (writer.params, expected)
    return info


def read_info(path: str | os.PathLike) -> dict | None:
    """The generation parameters stored in a model written by `generate`, or None."""
    p = Path(path)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception:
        return None
    for prop in model.metadata_props:
        if prop.key == META_KEY:
            return json.loads(prop.value)
    return None


def check(layers: int = 2, d_model: int = 256, ffn: int = 1024, vocab: int = 512) -> None:
    """Generate a small model, run the ONNX checker and one onnxruntime inference on [1, 16]."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "check.onnx"
        info = generate(path, layers=layers, d_model=d_model, ffn=ffn, vocab=vocab)
        onnx.checker.check_model(str(path), full_check=True)  # path form reads external data
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ids = np.random.default_rng(1).integers(0, vocab, size=(1, 16), dtype=np.int64)
        (out,) = sess.run(None, {"input_ids": ids})
        assert out.shape == (1, 16, d_model), out.shape
        assert np.isfinite(out).all()
        (out2,) = sess.run(None, {"input_ids": np.repeat(ids, 2, axis=0)[:, :7]})
        assert out2.shape == (2, 7, d_model), out2.shape  # symbolic batch and seq
        print(f"check ok: {info['params_total']:,} params, output {out.shape}, "
              f"mean {out.mean():.4f} std {out.std():.4f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", nargs="?", help="the .onnx to write (weights go to OUTPUT.data)")
    ap.add_argument("--check", action="store_true", help="generate a small model and run it in onnxruntime")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--activation", choices=("gelu", "relu"), default="gelu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.check:
        check()
        return 0
    if not args.output:
        ap.error("give an output path, or --check")
    start = time.perf_counter()
    info = generate(args.output, layers=args.layers, d_model=args.d_model, ffn=args.ffn,
                    vocab=args.vocab, seed=args.seed, heads=args.heads, activation=args.activation)
    print(f"wrote {args.output} (+ {info['data_file']}): {info['params_total']:,} params, "
          f"{info['data_bytes'] / 1e6:.1f} MB in {time.perf_counter() - start:.1f}s")
    if info["params_total"] < 150_000_000:
        print("note: fewer than 150 M parameters (the benchmark's size target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
