"""Reduced-precision (fp16 / bf16) copies of an fp32 ONNX model, for TensorRT strongly typed builds.

TensorRT 10 strongly typed networks and TensorRT 11 take every precision from the ONNX types, so
sparse fp16/bf16 kernels need an ONNX whose weights are fp16/bf16. fp16 uses onnxconverter-common's
``convert_float_to_float16`` (keep_io_types=True: graph inputs/outputs stay float32) wrapped in
pre/post passes that fix what it gets wrong with onnx 1.23: duplicate cast names for unnamed nodes,
original ``Cast(to=FLOAT)`` left at fp32, blocked ops feeding graph outputs turning them fp16,
initializers shared by blocked and unblocked nodes, stale value_info and duplicated input casts.
bf16 runs the same conversion, then retypes FLOAT16 -> BFLOAT16 and re-rounds every weight from the
ORIGINAL fp32 values with ml_dtypes (no detour through fp16). Zeros stay exactly zero either way.

Ops kept in fp32: onnxconverter-common's DEFAULT_OP_BLOCK_LIST (ML/ranking ops, Resize, Range,
TopK, Min/Max, ...); the variance branch of a decomposed LayerNorm/RMSNorm (Pow or x*x ->
ReduceMean -> Add(eps) -> Sqrt), whose squares overflow fp16 past |x| = 256 and whose small eps
underflows; and ops whose schema at the model's opset has no fp16/bf16 type (e.g. Conv/MaxPool
have bf16 only from opset 22), see ``lowp_unsupported_ops``. LayerNormalization and Softmax are
NOT blocked: ONNX Runtime and TensorRT accumulate them in fp32 internally.
"""

from __future__ import annotations

import copy

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, defs, helper, numpy_helper

from sparsec.errors import SparsecError

PRECISIONS = ("fp32", "fp16", "bf16")
_LOWP = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


def _subgraphs(graph: onnx.GraphProto):
    """Yield ``graph`` and every graph nested in node attributes (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _subgraphs(attr.g)
            for g in attr.graphs:
                yield from _subgraphs(g)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def lowp_unsupported_ops(model: onnx.ModelProto, precision: str) -> list[str]:
    """Op types whose schema at the model's opset accepts float but not fp16/bf16.

    They stay fp32 after conversion (for bf16 at opset < 22 this includes Conv: no sparse bf16
    conv). Callers should report them; re-export at a newer opset to lower them too.
    """
    want = f"tensor({'float16' if precision == 'fp16' else 'bfloat16'})"
    opset, found = _opset(model), set()
    for graph in _subgraphs(model.graph):
        for node in graph.node:
            if node.domain not in ("", "ai.onnx") or node.op_type in found:
                continue
            try:
                schema = defs.get_schema(node.op_type, opset)
            except Exception:  # noqa: BLE001 - unknown op: leave it to the checker
                continue
            for tc in schema.type_constraints:
                if "tensor(float)" in tc.allowed_type_strs and want not in tc.allowed_type_strs:
                    found.add(node.op_type)
    return sorted(found)


def _norm_variance_nodes(graph: onnx.GraphProto) -> set[str]:
    """Names of Pow|Mul(x,x) -> ReduceMean -> [Add] -> Sqrt chains (LayerNorm/RMSNorm variance)."""
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    blocked: set[str] = set()
    for red in (n for n in graph.node if n.op_type == "ReduceMean"):
        sq = producer.get(red.input[0])
        if sq is None or not (
            sq.op_type == "Pow" or (sq.op_type == "Mul" and sq.input[0] == sq.input[1])
        ):
            continue
        chain, cur = [sq, red], red
        while len(nxt := consumers.get(cur.output[0], [])) == 1 and nxt[0].op_type in (
            "Add",
            "Sqrt",
        ):
            cur = nxt[0]
            chain.append(cur)
            if cur.op_type == "Sqrt":
                blocked.update(n.name for n in chain)
                break
    return blocked


def _prepare(model: onnx.ModelProto, block_ops: set[str], block_nodes: set[str]) -> None:
    """In-place fixes so onnxconverter-common's output is valid (see module docstring)."""
    g = model.graph
    names = {n.name for n in g.node if n.name}
    seen: set[str] = set()
    for i, node in enumerate(g.node):  # unique names: the converter derives cast names from them
        if not node.name or node.name in seen:
            base, k = f"{node.op_type}_{i}", 0
            while (cand := base if k == 0 else f"{base}_{k}") in names:
                k += 1
            node.name = cand
            names.add(cand)
        seen.add(node.name)
    inits = {t.name for t in g.initializer}
    if any(t.data_location == TensorProto.EXTERNAL for t in g.initializer):
        raise SparsecError(
            "precision conversion needs the weights in memory",
            hint="load the model with onnx.load(path, load_external_data=True)",
        )
    kept_inputs = [v for v in g.input if v.name not in inits]  # IR<4 style: initializers as inputs
    if len(kept_inputs) != len(g.input):
        del g.input[:]
        g.input.extend(kept_inputs)
        model.ir_version = max(model.ir_version, 4)
    is_blocked = {n.name: n.op_type in block_ops or n.name in block_nodes for n in g.node}
    users: dict[str, set[bool]] = {}
    for n in g.node:
        for name in n.input:
            if name in inits:
                users.setdefault(name, set()).add(is_blocked[n.name])
    for name in (k for k, v in users.items() if v == {True, False}):  # shared by both kinds
        via = f"{name}__to_fp32"
        g.node.insert(0, helper.make_node("Identity", [name], [via], name=f"{name}__fp32_id"))
        for n in g.node:
            if is_blocked.get(n.name):
                n.input[:] = [via if x == name else x for x in n.input]


def _retype_casts(graph: onnx.GraphProto, names: set[str], to: int) -> None:
    for node in graph.node:
        if node.name in names:
            for a in node.attribute:
                if a.name == "to":
                    a.i = to


def _fix_outputs(graph: onnx.GraphProto, low: int) -> None:
    """Graph outputs the converter turned fp16 (blocked producer) become float32 again."""
    vi = {v.name: v for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    for out in graph.output:
        if out.type.tensor_type.elem_type != low:
            continue
        prod = next(n for n in graph.node if out.name in n.output)
        low_name = f"{out.name}__lowp"
        prod.output[:] = [low_name if o == out.name else o for o in prod.output]
        for n in graph.node:
            n.input[:] = [low_name if x == out.name else x for x in n.input]
        graph.value_info.append(copy.deepcopy(out))
        graph.value_info[-1].name = low_name
        src = prod.input[0] if prod.op_type == "Cast" else None
        if src and vi.get(src) and vi[src].type.tensor_type.elem_type == TensorProto.FLOAT:
            graph.node.append(helper.make_node("Identity", [src], [out.name], name=low_name))
        else:
            graph.node.append(
                helper.make_node("Cast", [low_name], [out.name], to=TensorProto.FLOAT, name=low_name)
            )
        out.type.tensor_type.elem_type = TensorProto.FLOAT


def _cleanup(graph: onnx.GraphProto) -> None:
    """Merge duplicate Casts of one tensor, drop unused initializers and stale value_info."""
    outputs = {o.name for o in graph.output}
    first: dict[tuple[str, int], str] = {}
    rename: dict[str, str] = {}
    for node in list(graph.node):
        if node.op_type != "Cast" or node.output[0] in outputs:
            continue
        key = (node.input[0], node.attribute[0].i)
        if key in first:
            rename[node.output[0]] = first[key]
            graph.node.remove(node)
        else:
            first[key] = node.output[0]
    for node in graph.node:
        node.input[:] = [rename.get(x, x) for x in node.input]
    used = {x for n in graph.node for x in n.input} | outputs
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    produced = {o for n in graph.node for o in n.output}
    vis, seen = [], set()
    for v in graph.value_info:
        if v.name in produced and v.name not in seen and v.name not in outputs:
            vis.append(v)
            seen.add(v.name)
    del graph.value_info[:]
    graph.value_info.extend(vis)


def _to_bf16(model: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Retype FLOAT16 -> BFLOAT16 everywhere, re-rounding weights from the fp32 originals."""
    src_init = {t.name: t for g in _subgraphs(original.graph) for t in g.initializer}
    src_attr = {
        (n.name, a.name): a.t
        for g in _subgraphs(original.graph)
        for n in g.node
        for a in n.attribute
        if a.type == onnx.AttributeProto.TENSOR
    }

    def redo(t: TensorProto, src: TensorProto | None) -> None:
        if t.data_type != TensorProto.FLOAT16:
            return
        arr = numpy_helper.to_array(src) if src is not None else numpy_helper.to_array(t)
        t.CopyFrom(numpy_helper.from_array(arr.astype(np.float32).astype(ml_dtypes.bfloat16), t.name))

    for g in _subgraphs(model.graph):
        for t in g.initializer:
            redo(t, src_init.get(t.name))
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    redo(a.t, src_attr.get((n.name, a.name)))
                elif a.name in ("to", "dtype") and a.i == TensorProto.FLOAT16:
                    a.i = TensorProto.BFLOAT16
        for v in list(g.input) + list(g.output) + list(g.value_info):
            if v.type.tensor_type.elem_type == TensorProto.FLOAT16:
                v.type.tensor_type.elem_type = TensorProto.BFLOAT16


def convert_precision(model: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    """Return an fp16/bf16 copy of an fp32 model (float32 I/O kept); ``fp32`` returns ``model``.

    The result passes ``onnx.checker.check_model(full_check=True)`` and has no unused
    initializers. A weight that is exactly 0 stays 0, so N:M patterns survive; non-zero fp16
    weights are clamped into [1e-7, 1e4] in magnitude (onnxconverter-common's defaults, which keep
    masks and eps finite) and never become 0; bf16 weights are ml_dtypes round-to-nearest-even.
    """
    if precision not in PRECISIONS:
        raise SparsecError(f"unknown precision {precision!r}", hint="use fp32, fp16 or bf16")
    if precision == "fp32":
        return model
    from onnxconverter_common import float16

    src = copy.deepcopy(model)
    for g in _subgraphs(src.graph):
        for t in list(g.initializer) + [v for v in g.value_info]:
            dt = t.data_type if isinstance(t, TensorProto) else t.type.tensor_type.elem_type
            if dt in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
                raise SparsecError(
                    f"model already has fp16/bf16 tensors ({t.name})",
                    hint="convert_precision expects the fp32 model",
                )
    block_ops = set(float16.DEFAULT_OP_BLOCK_LIST) | set(lowp_unsupported_ops(src, precision))
    block_nodes = _norm_variance_nodes(src.graph)
    _prepare(src, block_ops, block_nodes)
    casts = {
        n.name
        for n in src.graph.node
        if n.op_type == "Cast" and n.op_type not in block_ops and n.name not in block_nodes
        and any(a.name == "to" and a.i == TensorProto.FLOAT for a in n.attribute)
    }
    out = float16.convert_float_to_float16(
        copy.deepcopy(src),
        keep_io_types=True,
        op_block_list=sorted(block_ops),
        node_block_list=sorted(block_nodes),
    )
    _retype_casts(out.graph, casts, TensorProto.FLOAT16)
    _fix_outputs(out.graph, TensorProto.FLOAT16)
    _cleanup(out.graph)
    if precision == "bf16":
        _to_bf16(out, src)
    try:
        onnx.checker.check_model(out, full_check=True)
    except Exception as exc:  # noqa: BLE001 - any checker failure is a conversion bug
        first = str(exc).strip().splitlines()[0][:300]
        raise SparsecError(
            f"{precision} conversion produced an invalid model: {first}",
            hint="build with --precision fp32 and report this model",
        ) from exc
    return out


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )


def can_run_on_cpu(model: onnx.ModelProto) -> tuple[bool, str]:
    """Whether onnxruntime's CPU provider can load ``model``; else a one-line reason.

    ORT 1.32 CPU has no bfloat16 MatMul/Gemm/Relu/Softmax kernels, so bf16 models are usually
    not runnable there; report "not runnable on onnxruntime CPU: <reason>" instead of failing.
    """
    try:
        _session(model)
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated exception types
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return False, text.split("NOT_IMPLEMENTED : ")[-1][:200]
    return True, ""


def precision_drift(
    dense: onnx.ModelProto, converted: onnx.ModelProto, feeds: dict[str, np.ndarray]
) -> dict:
    """Run both models on ORT CPU with the same float32 ``feeds`` and compare outputs.

    Returns ``{"runnable", "reason", "max_abs", "rel", "outputs": {name: {...}}}`` where ``rel`` is
    max |converted - dense| / max |dense| (relative to the output range, which unlike an
    element-wise ratio does not explode near zero). Not runnable -> runnable False and a reason.
    """
    ok, reason = can_run_on_cpu(converted)
    result: dict = {"runnable": ok, "reason": reason or None, "max_abs": None, "rel": None}
    result["outputs"] = {}
    if not ok:
        return result
    ref = dict(zip([o.name for o in dense.graph.output], _session(dense).run(None, feeds), strict=True))
    got = _session(converted).run(None, feeds)
    for name, val in zip([o.name for o in converted.graph.output], got, strict=True):
        a, b = np.asarray(ref[name], np.float64), np.asarray(val, np.float64)
        err = float(np.max(np.abs(a - b))) if a.size else 0.0
        scale = float(np.max(np.abs(a))) if a.size else 0.0
        result["outputs"][name] = {"max_abs": err, "ref_max_abs": scale, "rel": err / (scale or 1)}
    stats = result["outputs"].values()
    result["max_abs"] = max((s["max_abs"] for s in stats), default=0.0)
    result["rel"] = max((s["rel"] for s in stats), default=0.0)
    return result
