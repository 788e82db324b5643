"""Random valid ONNX graphs of the kinds a pruning compiler meets, one per seed.

`make_model(seed)` composes random blocks (convs of every shape, unfused BatchNorm, residuals,
Concat/Split on channels, squeeze-excite, pools, Resize, ConvTranspose, Flatten→Gemm, MLPs,
attention, LayerNorm) on small tensors so that one compile takes well under a second. Every
model is checked (onnx full check + an onnxruntime run) before it is returned: a generator bug
fails loudly instead of being regenerated away.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_FOR_OPSET = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}
F32 = TensorProto.FLOAT


class _Builder:
    """Graph under construction: nodes, constants and the shape of every tensor."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.opset = int(self.rng.integers(13, 22))
        self.padless = self.rng.random() < 0.35  # no zero padding anywhere: the channel oracle is exact
        self.const_nodes = self.rng.random() < 0.3  # weights as Constant nodes instead of initializers
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.extra_outputs: list[str] = []
        self.count = 0

    # -- plumbing -------------------------------------------------------------------------------
    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def node(self, op: str, inputs: list[str], shapes: list[tuple[int, ...]], **attrs) -> list[str]:
        outs = [self.fresh(op.lower()) for _ in shapes]
        name = self.fresh(f"n_{op}") if self.rng.random() < 0.7 else ""
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        for o, s in zip(outs, shapes, strict=True):
            self.shapes[o] = tuple(int(d) for d in s)
        return outs

    def one(self, op: str, inputs: list[str], shape: tuple[int, ...], **attrs) -> str:
        return self.node(op, inputs, [shape], **attrs)[0]

    def const(self, value: np.ndarray, prefix: str = "w") -> str:
        name = self.fresh(prefix)
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
        if self.const_nodes and value.dtype == np.float32 and self.rng.random() < 0.7:
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
        else:
            self.inits.append(tensor)
        self.shapes[name] = tuple(value.shape)
        return name

    def weight(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))).astype(np.float32)

    def channels(self) -> int:
        if self.rng.random() < 0.7:
            return int(self.rng.choice([4, 8, 12, 16, 20, 24]))
        return int(self.rng.integers(4, 25))

    def maybe_output(self, t: str) -> None:
        if self.rng.random() < 0.12:
            self.extra_outputs.append(t)

    # -- elementwise ----------------------------------------------------------------------------
    def act(self, t: str) -> str:
        s = self.shapes[t]
        kinds = ["Relu", "Relu", "Sigmoid", "LeakyRelu", "Clip", "Tanh", "none"]
        kinds += ["HardSwish"] if self.opset >= 14 else []
        kinds += ["Gelu"] if self.opset >= 20 else []
        kind = str(self.rng.choice(kinds))
        if kind == "none":
            return t
        if kind == "LeakyRelu":
            return self.one(kind, [t], s, alpha=0.1)
        if kind == "Clip":
            lo = self.const(np.array(0.0, np.float32), "clip_lo")
            hi = self.const(np.array(6.0, np.float32), "clip_hi")
            return self.one(kind, [t, lo, hi], s)
        return self.one(kind, [t], s)

    def bn(self, t: str) -> str:
        c = self.shapes[t][1]
        r = self.rng
        params = [r.uniform(0.5, 1.5, c), r.normal(0, 0.5, c), r.normal(0, 0.3, c), r.uniform(0.5, 2.0, c)]
        names = [self.const(p.astype(np.float32), n) for p, n in zip(params, ("gamma", "beta", "mean", "var"),
                                                                         strict=True)]
        return self.one("BatchNormalization", [t, *names], self.shapes[t], epsilon=1e-5)

    # -- 4D blocks ------------------------------------------------------------------------------
    def conv(self, t: str, cout: int, *, group: int = 1, k: int | None = None, stride: int | None = None,
             pad: bool | None = None) -> str:
        n, c, h, w = self.shapes[t]
        r = self.rng
        small = min(h, w)
        dil = 2 if r.random() < 0.15 else 1
        if k is None:
            k = int(r.choice([1, 3, 3, 5]))
        pad = (not self.padless) and (r.random() < 0.8) if pad is None else pad and not self.padless
        while k > 1 and dil * (k - 1) + 1 > small:
            if dil > 1:
                dil = 1
            else:
                k -= 2
        eff = dil * (k - 1) + 1
        pads = [0, 0, 0, 0]
        if pad and k > 1:
            p = dil * (k - 1) // 2
            pads = [p, p, p, p]
            if r.random() < 0.2:
                pads = [p, 0, p, 0]
        oh, ow = h + pads[0] + pads[2] - eff + 1, w + pads[1] + pads[3] - eff + 1
        if stride is None:
            stride = 2 if min(oh, ow) >= 6 and r.random() < 0.3 else 1
        oh, ow = (oh - 1) // stride + 1, (ow - 1) // stride + 1
        wt = self.const(self.weight((cout, c // group, k, k), c // group * k * k), "conv_w")
        inputs = [t, wt]
        if r.random() < 0.6:
            inputs.append(self.const(r.normal(0, 0.2, cout).astype(np.float32), "conv_b"))
        attrs = {"kernel_shape": [k, k]}
        if any(pads) or r.random() < 0.5:
            attrs["pads"] = pads
        if stride != 1 or r.random() < 0.3:
            attrs["strides"] = [stride, stride]
        if dil != 1 or r.random() < 0.2:
            attrs["dilations"] = [dil, dil]
        if group != 1 or r.random() < 0.2:
            attrs["group"] = group
        return self.one("Conv", inputs, (n, cout, oh, ow), **attrs)

    def conv_bn_act(self, t: str, cout: int | None = None, **kw) -> str:
        y = self.conv(t, cout or self.channels(), **kw)
        if self.rng.random() < 0.7:
            y = self.bn(y)
        return self.act(y)

    def block_4d(self, t: str) -> str:
        r = self.rng
        n, c, h, w = self.shapes[t]
        kinds = ["conv", "conv", "dw", "residual", "concat", "se", "pool"]
        kinds += ["grouped"] if c % 2 == 0 and c >= 4 else []
        kinds += ["split"] if c >= 4 else []
        kinds += ["resize"] if max(h, w) <= 8 else []
        kinds += ["convT"] if max(h, w) <= 8 else []
        kind = str(r.choice(kinds))
        if kind == "conv":
            return self.conv_bn_act(t)
        if kind == "dw":
            y = self.act(self.bn(self.conv(t, c, group=c, k=3)))
            return self.conv_bn_act(y, k=1)
        if kind == "grouped":
            g = 2 if c % 4 else int(r.choice([2, 4]))
            return self.conv_bn_act(t, c, group=g, k=3, stride=1)
        if kind == "residual":
            y = self.conv_bn_act(t, c, k=3, stride=1, pad=True)
            y = self.bn(self.conv(y, c, k=1, stride=1))
            if self.shapes[y] != self.shapes[t]:
                return y
            return self.act(self.one("Add", [t, y], self.shapes[t]))
        if kind == "concat":
            a = self.conv_bn_act(t, k=1, stride=1)
            b = self.conv_bn_act(t, k=1, stride=1)
            ca, cb = self.shapes[a][1], self.shapes[b][1]
            parts = [a, b, t] if r.random() < 0.3 else [a, b]
            total = ca + cb + (c if len(parts) == 3 else 0)
            return self.one("Concat", parts, (n, total, h, w), axis=1)
        if kind == "split":
            first = int(r.integers(1, c))
            sizes = [first, c - first]
            split = self.const(np.array(sizes, np.int64), "split")
            a, b = self.node("Split", [t, split], [(n, s, h, w) for s in sizes], axis=1)
            a = self.conv_bn_act(a, k=1, stride=1)
            b = self.conv_bn_act(b, k=1, stride=1)
            return self.one("Concat", [a, b], (n, self.shapes[a][1] + self.shapes[b][1], h, w), axis=1)
        if kind == "se":
            mid = max(2, c // 4)
            s = self.one("GlobalAveragePool", [t], (n, c, 1, 1))
            s = self.one("Relu", [self.conv(s, mid, k=1, stride=1)], (n, mid, 1, 1))
            s = self.one("Sigmoid", [self.conv(s, c, k=1, stride=1)], (n, c, 1, 1))
            return self.one("Mul", [t, s], (n, c, h, w))
        if kind == "pool":
            if min(h, w) < 4:
                return self.conv_bn_act(t, k=1)
            op = str(r.choice(["MaxPool", "AveragePool"]))
            k, s = int(r.choice([2, 3])), int(r.choice([1, 2]))
            return self.one(op, [t], (n, c, (h - k) // s + 1, (w - k) // s + 1), kernel_shape=[k, k],
                            strides=[s, s])
        if kind == "resize":
            scales = self.const(np.array([1, 1, 2, 2], np.float32), "scales")
            roi = "" if r.random() < 0.5 else self.const(np.zeros(0, np.float32), "roi")
            y = self.one("Resize", [t, roi, scales], (n, c, 2 * h, 2 * w), mode="nearest")
            return self.conv_bn_act(y, stride=1)
        # ConvTranspose, group 1, stride 2 (its channels are consumed, and it starts a source)
        cout = self.channels()
        k = int(r.choice([2, 3]))
        wt = self.const(self.weight((c, cout, k, k), c * k * k), "convT_w")
        inputs = [t, wt] + ([self.const(r.normal(0, 0.2, cout).astype(np.float32), "convT_b")]
                            if r.random() < 0.5 else [])
        y = self.one("ConvTranspose", inputs, (n, cout, (h - 1) * 2 + k, (w - 1) * 2 + k),
                     kernel_shape=[k, k], strides=[2, 2])
        return self.act(self.bn(y) if r.random() < 0.5 else y)

    def head_4d(self, t: str) -> str:
        r = self.rng
        n, c, h, w = self.shapes[t]
        kind = str(r.choice(["gap_gemm", "flatten_gemm", "gap_matmul", "spatial"]))
        if kind == "spatial":
            return self.conv(t, self.channels(), k=1, stride=1)
        if kind == "flatten_gemm" and c * h * w <= 1200:
            x, feat = self.one("Flatten", [t], (n, c * h * w), axis=1), c * h * w
        else:
            g = self.one("GlobalAveragePool", [t], (n, c, 1, 1))
            x, feat = self.one("Flatten", [g], (n, c), axis=1), c
        out = int(r.integers(3, 17))
        if kind == "gap_matmul":
            y = self.one("MatMul", [x, self.const(self.weight((feat, out), feat), "fc_w")], (n, out))
            bias = self.const(r.normal(0, 0.1, out).astype(np.float32), "fc_b")
            return self.one("Add", [y, bias], (n, out))
        return self.gemm(x, out)

    # -- 2D / 3D blocks -------------------------------------------------------------------------
    def gemm(self, x: str, out: int) -> str:
        r = self.rng
        n, k = self.shapes[x]
        trans_b = int(r.random() < 0.6)
        w = self.weight((out, k) if trans_b else (k, out), k)
        inputs = [x, self.const(w, "gemm_w")]
        attrs = {"transB": trans_b} if trans_b or r.random() < 0.3 else {}
        if r.random() < 0.3:  # the activation arrives transposed: Gemm transA=1
            inputs[0] = self.one("Transpose", [x], (k, n), perm=[1, 0])
            attrs["transA"] = 1
        if r.random() < 0.7:
            inputs.append(self.const(r.normal(0, 0.1, out).astype(np.float32), "gemm_b"))
        return self.one("Gemm", inputs, (n, out), **attrs)

    def gemm_const_a(self, x: str, out: int) -> str:
        """Gemm(W, Xᵀ): the constant on the left, then back to [N, out]."""
        n, k = self.shapes[x]
        trans_a = int(self.rng.random() < 0.5)
        w = self.weight((k, out) if trans_a else (out, k), k)
        xt = self.one("Transpose", [x], (k, n), perm=[1, 0])
        y = self.one("Gemm", [self.const(w, "gemmA_w"), xt], (out, n), **({"transA": 1} if trans_a else {}))
        return self.one("Transpose", [y], (n, out), perm=[1, 0])

    def linear(self, x: str, out: int, bias: bool = True) -> str:
        """X @ W (+ b) on the last axis; W sometimes stored transposed behind a Transpose node."""
        s = self.shapes[x]
        k = s[-1]
        w = self.weight((k, out), k)
        if self.rng.random() < 0.15:
            stored = self.const(np.ascontiguousarray(w.T), "lin_wT")
            wt = self.one("Transpose", [stored], (k, out), perm=[1, 0])
        else:
            wt = self.const(w, "lin_w")
        y = self.one("MatMul", [x, wt], (*s[:-1], out))
        if bias:
            y = self.one("Add", [y, self.const(self.rng.normal(0, 0.1, out).astype(np.float32), "lin_b")],
                         self.shapes[y])
        return y

    def seq_act(self, t: str) -> str:
        kinds = ["Relu", "Sigmoid", "Tanh"] + (["Gelu"] if self.opset >= 20 else [])
        return self.one(str(self.rng.choice(kinds)), [t], self.shapes[t])

    def block_seq(self, t: str) -> str:
        r = self.rng
        s = self.shapes[t]
        e = s[-1]
        kinds = ["mlp", "mlp", "shared", "linear"]
        kinds += ["attention", "attention"] if len(s) == 3 else ["gemm", "gemm", "gemm_const_a"]
        kinds += ["token_mix"] if len(s) == 3 else []
        kinds += ["layernorm"] if self.opset >= 17 else []
        kind = str(r.choice(kinds))
        if kind == "mlp":
            hid = self.channels() * 2
            y = self.linear(self.seq_act(self.linear(t, hid)), e)
            return self.one("Add", [t, y], s)
        if kind == "linear":
            return self.seq_act(self.linear(t, self.channels(), bias=r.random() < 0.5))
        if kind == "shared":  # one weight read by two MatMuls
            w = self.const(self.weight((e, e), e), "shared_w")
            a = self.one("MatMul", [t, w], s)
            b = self.one("MatMul", [self.seq_act(t), w], s)
            return self.one("Add", [a, b], s)
        if kind == "gemm":
            return self.seq_act(self.gemm(t, self.channels()))
        if kind == "gemm_const_a":
            return self.seq_act(self.gemm_const_a(t, self.channels()))
        if kind == "token_mix":  # W @ X: the constant on the left of a batched MatMul
            b, length, _ = s
            w = self.const(self.weight((length, length), length), "mix_w")
            return self.one("Add", [t, self.one("MatMul", [w, t], s)], s)
        if kind == "layernorm":
            scale = self.const(r.uniform(0.5, 1.5, e).astype(np.float32), "ln_g")
            bias = self.const(r.normal(0, 0.1, e).astype(np.float32), "ln_b")
            return self.one("LayerNormalization", [t, scale, bias], s, axis=-1, epsilon=1e-5)
        return self.attention(t)

    def attention(self, x: str) -> str:
        b, length, e = self.shapes[x]
        heads = int(self.rng.choice([h for h in (1, 2, 4) if e % h == 0]))
        d = e // heads
        bias = self.rng.random() < 0.6
        q, k, v = (self.linear(x, e, bias) for _ in range(3))
        shape = self.const(np.array([b, length, heads, d], np.int64), "shape")
        split = (b, length, heads, d)
        q = self.one("Transpose", [self.one("Reshape", [q, shape], split)], (b, heads, length, d),
                     perm=[0, 2, 1, 3])
        k = self.one("Transpose", [self.one("Reshape", [k, shape], split)], (b, heads, d, length),
                     perm=[0, 2, 3, 1])
        v = self.one("Transpose", [self.one("Reshape", [v, shape], split)], (b, heads, length, d),
                     perm=[0, 2, 1, 3])
        scores = self.one("MatMul", [q, k], (b, heads, length, length))
        scale = self.const(np.array(1.0 / np.sqrt(d), np.float32), "scale")
        scores = self.one("Mul", [scores, scale], (b, heads, length, length))
        probs = self.one("Softmax", [scores], (b, heads, length, length), axis=-1)
        ctx = self.one("MatMul", [probs, v], (b, heads, length, d))
        ctx = self.one("Transpose", [ctx], (b, length, heads, d), perm=[0, 2, 1, 3])
        back = self.const(np.array([b, length, e], np.int64), "shape")
        ctx = self.one("Reshape", [ctx, back], (b, length, e))
        return self.one("Add", [x, self.linear(ctx, e, bias)], (b, length, e))


def make_model(seed: int) -> tuple[onnx.ModelProto, dict[str, tuple[int, ...]]]:
    """A random valid model and its input shapes; the same seed always gives the same bytes."""
    g = _Builder(seed)
    r = g.rng
    family = str(r.choice(["cnn", "cnn", "cnn", "seq", "mlp"]))
    batch = int(r.choice([1, 1, 2]))
    if family == "cnn":
        c, h = int(r.choice([1, 3, 4, 8])), int(r.integers(5, 13))
        shape: tuple[int, ...] = (batch, c, h, int(r.integers(5, 13)) if r.random() < 0.3 else h)
        g.shapes["x"] = shape
        t = g.conv_bn_act("x")
        for _ in range(int(r.integers(1, 5))):
            t = g.block_4d(t)
            g.maybe_output(t)
        t = g.head_4d(t)
    else:
        e = int(r.choice([8, 12, 16, 20, 24]))
        shape = (batch, int(r.integers(3, 9)), e) if family == "seq" else (batch * int(r.integers(1, 4)), e)
        g.shapes["x"] = shape
        t = "x"
        for _ in range(int(r.integers(1, 4))):
            t = g.block_seq(t)
            g.maybe_output(t)
    outputs = [t] + [o for o in dict.fromkeys(g.extra_outputs) if o != t]
    graph = helper.make_graph(
        g.nodes, f"fuzz_{seed}", [helper.make_tensor_value_info("x", F32, list(shape))],
        [helper.make_tensor_value_info(o, F32, list(g.shapes[o])) for o in outputs], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", g.opset)],
                              producer_name="sparsec-fuzz")
    model.ir_version = IR_FOR_OPSET[g.opset]
    _assert_valid(model, {"x": shape}, seed)
    return model, {"x": shape}


def _assert_valid(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], seed: int) -> None:
    """The generator's contract: the full checker passes and onnxruntime runs it to the declared shapes."""
    import onnxruntime as ort

    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {k: np.random.default_rng(seed).standard_normal(v).astype(np.float32) for k, v in shapes.items()}
    outs = sess.run(None, feeds)
    for info, value in zip(model.graph.output, outs, strict=True):
        want = tuple(d.dim_value for d in info.type.tensor_type.shape.dim)
        assert value.shape == want, f"seed {seed}: output {info.name} is {value.shape}, declared {want}"
