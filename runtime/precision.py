"""fp16 / bf16 copies of an fp32 ONNX model. TensorRT 10 strongly typed and TensorRT 11 networks
take every precision from the ONNX types, so sparse fp16/bf16 kernels need fp16/bf16 weights.

fp16 is onnxconverter-common's ``convert_float_to_float16`` (keep_io_types=True: callers feed the
same float32 data) plus passes for what it gets wrong with onnx 1.23: Cast names clash for unnamed
nodes, the model's own ``Cast(to=FLOAT)`` stays fp32 and confuses its Cast-pair removal (crash, or
a lost graph output), graph outputs of blocked ops or also used inside the graph get the wrong type,
initializers shared by blocked and unblocked nodes, stale value_info, one input Cast per consumer.
bf16 is the same conversion retyped FLOAT16 -> BFLOAT16, weights re-rounded by ml_dtypes from the
ORIGINAL fp32 values. Exact zeros stay zero in both, so N:M patterns survive.

Kept fp32: onnxconverter-common's DEFAULT_OP_BLOCK_LIST (Resize, Range, TopK, Min/Max, ML ops); the
variance branch of a decomposed LayerNorm/RMSNorm (Pow|x*x -> ReduceMean -> [Add eps] -> Sqrt),
whose squares overflow fp16 once |x| > 256; ops whose schema at the model's opset lacks the type
(``lowp_unsupported_ops``: bf16 Conv/pooling need opset 22). LayerNormalization and Softmax stay
low precision: onnxruntime and TensorRT accumulate them in fp32 internally.
"""

from __future__ import annotations

import copy

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, defs, helper, numpy_helper

from sparsec.errors import SparsecError

PRECISIONS = ("fp32", "fp16", "bf16")
F32, F16, BF16 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16
_VAR = ("Add", "Sqrt")


def _graphs(graph: onnx.GraphProto):
    """``graph`` and every graph nested in node attributes (If/Loop/Scan bodies)."""
    yield graph
    for attr in (a for n in graph.node for a in n.attribute):
        for g in [attr.g] * (attr.type == onnx.AttributeProto.GRAPH) + list(attr.graphs):
            yield from _graphs(g)


def _rename_inputs(graph: onnx.GraphProto, old: str, new: str, skip=lambda n: False) -> None:
    for n in graph.node:
        if not skip(n):
            n.input[:] = [new if x == old else x for x in n.input]


def lowp_unsupported_ops(model: onnx.ModelProto, precision: str) -> list[str]:
    """Op types whose schema at the model's opset takes float but not fp16/bf16: they stay fp32.

    For bf16 below opset 22 that includes Conv, i.e. no sparse bf16 convolution; callers should
    report these (re-exporting at a newer opset lowers them too).
    """
    want = f"tensor({'float16' if precision == 'fp16' else 'bfloat16'})"
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    found: set[str] = set()
    for node in (n for g in _graphs(model.graph) for n in g.node):
        if node.domain in ("", "ai.onnx") and node.op_type not in found:
            try:
                types = [
                    set(c.allowed_type_strs)
                    for c in defs.get_schema(node.op_type, opset).type_constraints
                ]
            except Exception:  # noqa: BLE001 - unknown op: the checker will say so
                continue
            if any("tensor(float)" in t for t in types) and not any(
                {"tensor(float)", want} <= t for t in types
            ):
                found.add(node.op_type)
    return sorted(found)


def _norm_variance_nodes(graph: onnx.GraphProto) -> set[str]:
    """Names on Pow|Mul(x,x) -> ReduceMean -> [Add] -> Sqrt chains (LayerNorm/RMSNorm variance)."""
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    blocked: set[str] = set()
    for red in (n for n in graph.node if n.op_type == "ReduceMean"):
        sq = producer.get(red.input[0])
        if sq is None or not (
            sq.op_type == "Pow" or (sq.op_type == "Mul" and sq.input[0] == sq.input[1])
        ):
            continue
        chain = [sq, red]
        while len(nxt := readers.get(chain[-1].output[0], [])) == 1 and nxt[0].op_type in _VAR:
            chain.append(nxt[0])
            if nxt[0].op_type == "Sqrt":
                blocked.update(n.name for n in chain)
                break
    return blocked


def _prepare(model: onnx.ModelProto, block_ops: set[str]) -> set[str]:
    """Make the model safe for the converter; return the nodes blocked by name (norm variance)."""
    g = model.graph
    if any(t.data_location == TensorProto.EXTERNAL for t in g.initializer):
        raise SparsecError(
            "precision conversion needs the weights in memory",
            hint="load the model with onnx.load(path, load_external_data=True)",
        )
    names, seen = {n.name for n in g.node}, set()
    for i, node in enumerate(g.node):  # unique names: the converter derives Cast names from them
        if not node.name or node.name in seen:
            k = 0
            while f"{node.op_type}_{i}_{k}" in names:
                k += 1
            node.name = f"{node.op_type}_{i}_{k}"
            names.add(node.name)
        seen.add(node.name)
    inits = {t.name: t.data_type for t in g.initializer}
    if any(v.name in inits for v in g.input):  # IR < 4 style: initializers listed as inputs
        kept = [v for v in g.input if v.name not in inits]
        del g.input[:]
        g.input.extend(kept)
        model.ir_version = max(model.ir_version, 4)
    block_nodes = _norm_variance_nodes(g)
    blocked = lambda n: n.op_type in block_ops or n.name in block_nodes  # noqa: E731
    for name in [k for k, dt in inits.items() if dt == F32]:  # fp32 weight read by both kinds
        kinds = {blocked(n) for n in g.node if name in n.input}
        if kinds == {True, False}:
            via = f"{name}__fp32"
            _rename_inputs(g, name, via, skip=lambda n: not blocked(n))
            g.node.insert(0, helper.make_node("Identity", [name], [via], name=via))
    for n in g.node:  # the model's own Cast(to=FLOAT) must produce fp16 like its neighbours
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i == F32 and not blocked(n):
                a.i = F16
    return block_nodes


def _fix_outputs(graph: onnx.GraphProto, blocked: set[str]) -> None:
    """Graph outputs stay float32; nodes inside the graph read their fp16 twin."""
    elem = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info]}
    producer = {o: n for n in graph.node for o in n.output}
    for out in graph.output:
        if (prod := producer.get(out.name)) is None:
            continue
        if out.type.tensor_type.elem_type == F16:  # a blocked op's output the converter made fp16
            low = f"{out.name}__fp16"
            prod.output[:] = [low if o == out.name else o for o in prod.output]
            _rename_inputs(graph, out.name, low)
            graph.value_info.append(copy.deepcopy(out))
            graph.value_info[-1].name = low
            src = prod.input[0] if prod.op_type == "Cast" else ""
            if elem.get(src) == F32:  # take the blocked op's fp32 value itself
                graph.node.append(helper.make_node("Identity", [src], [out.name], name=low))
            else:
                graph.node.append(helper.make_node("Cast", [low], [out.name], name=low, to=F32))
            out.type.tensor_type.elem_type = F32
        elif prod.op_type == "Cast" and elem.get(prod.input[0]) == F16:  # readers got the fp32 copy
            _rename_inputs(
                graph, out.name, prod.input[0], skip=lambda n: n.name in blocked or n is prod
            )


def _cleanup(graph: onnx.GraphProto) -> None:
    """Cast32(Cast16(x)) -> x, merge duplicate Casts, drop dead Casts, unused initializers and
    stale value_info (what the converter's own remove_unnecessary_cast_node gets wrong)."""
    outputs = {o.name for o in graph.output}
    elem = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info]}
    producer = {o: n for n in graph.node for o in n.output}
    rename: dict[str, str] = {}
    first: dict[tuple[str, int], str] = {}
    for node in (n for n in graph.node if n.op_type == "Cast" and n.output[0] not in outputs):
        to, up = helper.get_node_attr_value(node, "to"), producer.get(node.input[0])
        if to == F32 and up is not None and up.op_type == "Cast" and elem.get(up.input[0]) == F32:
            rename[node.output[0]] = up.input[0]
        else:
            key = (rename.get(node.input[0], node.input[0]), to)
            rename[node.output[0]] = first.setdefault(key, node.output[0])
    for node in graph.node:
        node.input[:] = [rename.get(x, x) for x in node.input]
    while True:  # drop Casts nobody reads (repeat: a chain of them dies back to front)
        read = {x for n in graph.node for x in n.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and not {*n.output} & read]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {x for n in graph.node for x in n.input} | outputs
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
    produced = {o for n in graph.node for o in n.output} - outputs
    vis = {v.name: v for v in reversed(graph.value_info) if v.name in produced}
    del graph.value_info[:]
    graph.value_info.extend(vis.values())


def _to_bf16(model: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """FLOAT16 -> BFLOAT16 everywhere; weights re-rounded from the fp32 originals."""
    src = {t.name: t for g in _graphs(original.graph) for t in g.initializer}
    src.update(
        {
            f"{n.name}/{a.name}": a.t
            for g in _graphs(original.graph)
            for n in g.node
            for a in n.attribute
        }
    )

    def redo(t: TensorProto, key: str) -> None:
        if t.data_type == F16:
            arr = numpy_helper.to_array(src[key] if key in src else t).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(arr.astype(ml_dtypes.bfloat16), t.name))

    for g in _graphs(model.graph):
        for t in g.initializer:
            redo(t, t.name)
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    redo(a.t, f"{n.name}/{a.name}")
                elif a.name in ("to", "dtype") and a.i == F16:
                    a.i = BF16
        for v in [*g.input, *g.output, *g.value_info]:
            if v.type.tensor_type.elem_type == F16:
                v.type.tensor_type.elem_type = BF16


def convert_precision(model: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    """An fp16/bf16 copy of an fp32 model with float32 I/O; ``fp32`` returns ``model`` itself.

    The result passes ``onnx.checker.check_model(full_check=True)`` and has no unused
    initializers. A weight exactly 0 stays 0; other fp16 weights keep their sign and magnitude in
    [1e-7, 1e4] (onnxconverter-common's clamp, which keeps masks and eps finite) so they never
    become 0; bf16 weights are ml_dtypes round-to-nearest-even, where only subnormals can.
    """
    if precision not in PRECISIONS:
        raise SparsecError(f"unknown precision {precision!r}", hint="use fp32, fp16 or bf16")
    if precision == "fp32":
        return model
    from onnxconverter_common import float16

    src = copy.deepcopy(model)
    tensors = [t.data_type for g in _graphs(src.graph) for t in g.initializer]
    tensors += [
        v.type.tensor_type.elem_type
        for g in _graphs(src.graph)
        for v in [*g.input, *g.output, *g.value_info]
    ]
    if F16 in tensors or BF16 in tensors:
        raise SparsecError("model already has fp16/bf16 tensors", hint="pass the fp32 model")
    block_ops = set(float16.DEFAULT_OP_BLOCK_LIST) | set(lowp_unsupported_ops(src, precision))
    block_nodes = _prepare(src, block_ops)
    keep = float16.remove_unnecessary_cast_node
    float16.remove_unnecessary_cast_node = lambda graph: None  # breaks on the model's own Casts
    try:
        out = float16.convert_float_to_float16(
            copy.deepcopy(src),
            keep_io_types=True,
            op_block_list=sorted(block_ops),
            node_block_list=sorted(block_nodes),
            check_fp16_ready=False,
        )
    finally:
        float16.remove_unnecessary_cast_node = keep
    _fix_outputs(
        out.graph, block_nodes | {n.name for n in out.graph.node if n.op_type in block_ops}
    )
    _cleanup(out.graph)
    if precision == "bf16":
        _to_bf16(out, src)
    try:
        onnx.checker.check_model(out, full_check=True)
    except Exception as exc:  # noqa: BLE001 - any checker failure here is a conversion bug
        raise SparsecError(
            f"{precision} conversion produced an invalid model: {str(exc).strip()[:300]}",
            hint="build with --precision fp32 and report this model",
        ) from exc
    return out


def _session(model: onnx.ModelProto):
    import onnxruntime as ort
    from sparsec.runtime.session import log_severity

    opts = ort.SessionOptions()
    opts.log_severity_level = log_severity()
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _reason(exc: Exception) -> str:
    return (
        (str(exc).strip() or type(exc).__name__)
        .splitlines()[0]
        .split("NOT_IMPLEMENTED : ")[-1][:200]
    )


def can_run_on_cpu(model: onnx.ModelProto) -> tuple[bool, str]:
    """(True, "") if onnxruntime's CPU provider loads ``model``, else (False, one-line reason).

    ORT 1.32 CPU has no bfloat16 MatMul/Gemm/Relu/Add/BatchNormalization kernels, so bf16 models
    are usually not runnable there: report "not runnable on onnxruntime CPU: <reason>".
    """
    try:
        _session(model)
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated exception types
        return False, _reason(exc)
    return True, ""


def precision_drift(
    dense: onnx.ModelProto, converted: onnx.ModelProto, feeds: dict[str, np.ndarray]
) -> dict:
    """Run both models on ORT CPU with the same float32 ``feeds`` and compare each output.

    Returns {"runnable", "reason", "max_abs", "rel", "outputs": {name: {"max_abs", "ref_max_abs",
    "rel"}}}, rel = max |converted - dense| / max |dense| (relative to the output's range; an
    element-wise ratio explodes near zero). Not runnable: runnable False, the reason, no numbers.
    """
    try:
        sess = _session(converted)
    except Exception as exc:  # noqa: BLE001 - as in can_run_on_cpu
        return {
            "runnable": False,
            "reason": _reason(exc),
            "max_abs": None,
            "rel": None,
            "outputs": {},
        }
    names, ref = [o.name for o in dense.graph.output], _session(dense).run(None, feeds)
    outputs = {}
    for name, a, b in zip(names, ref, sess.run(None, feeds), strict=True):
        err = float(np.max(np.abs(np.float64(a) - np.float64(b)), initial=0.0))
        scale = float(np.max(np.abs(np.float64(a)), initial=0.0))
        outputs[name] = {"max_abs": err, "ref_max_abs": scale, "rel": err / (scale or 1.0)}
    worst = {k: max((o[k] for o in outputs.values()), default=0.0) for k in ("max_abs", "rel")}
    return {"runnable": True, "reason": None, **worst, "outputs": outputs}
