"""fp16 / bf16 copies of an fp32 ONNX model. TensorRT 10 strongly typed and TensorRT 11 networks
take every precision from the ONNX types, so sparse fp16/bf16 kernels need fp16/bf16 weights.

fp16 is onnxconverter-common's ``convert_float_to_float16`` (keep_io_types=True: callers feed the
same float32 data) plus passes for what it gets wrong with onnx 1.23: Cast names clash for unnamed
nodes, the model's own ``Cast(to=FLOAT)`` stays fp32 and confuses its Cast-pair removal (crash, or
a lost graph output), graph outputs of blocked ops or also used inside the graph get the wrong type,
initializers shared by blocked and unblocked nodes, stale value_info, one input Cast per consumer;
If/Loop/Scan bodies that read outer-scope tensors (its sort, cleanup and casts only see each graph's
own names), and shape inference carrying the model's retyped Casts into blocked ops (Resize).
bf16 is the same conversion retyped FLOAT16 -> BFLOAT16, weights re-rounded by ml_dtypes from the
ORIGINAL fp32 values. Exact zeros stay zero in both, so N:M patterns survive.

Kept fp32: onnxconverter-common's DEFAULT_OP_BLOCK_LIST (Resize, Range, TopK, Min/Max, ML ops); the
variance branch of a decomposed LayerNorm/RMSNorm (Pow|x*x -> ReduceMean -> [Add eps] -> Sqrt),
whose squares overflow fp16 once |x| > 256; ops whose schema at the model's opset lacks the type
(``lowp_unsupported_ops``: bf16 Conv/pooling need opset 22; contrib ops by onnxruntime's schemas).
LayerNormalization and Softmax stay low precision: onnxruntime and TensorRT accumulate them in fp32
internally.
"""

from __future__ import annotations

import copy
import functools
import heapq

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, defs, helper, numpy_helper
from onnxconverter_common import float16

from sparsec.errors import SparsecError
from sparsec.runtime.session import log_severity

PRECISIONS = ("fp32", "fp16", "bf16")
F32, F16, BF16 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16
_VAR = ("Add", "Sqrt")


def _graphs(graph: onnx.GraphProto):
    """``graph`` and every graph nested in node attributes (If/Loop/Scan bodies)."""
    yield graph
    for attr in (a for n in graph.node for a in n.attribute):
        for g in [attr.g] * (attr.type == onnx.AttributeProto.GRAPH) + list(attr.graphs):
            yield from _graphs(g)


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [g for a in node.attribute for g in [a.g] * (a.type == onnx.AttributeProto.GRAPH) + list(a.graphs)]


def _nested_reads(graph: onnx.GraphProto) -> set[str]:
    """Names read inside the bodies of ``graph``'s If/Loop/Scan nodes (any depth)."""
    return {x for n in graph.node for x in _body_reads(n)}


def _rename_inputs(graph: onnx.GraphProto, old: str, new: str, skip=lambda n: False) -> None:
    """Rename reads of ``old`` in ``graph`` and in the bodies nested in it (they see outer names)."""
    for n in graph.node:
        if not skip(n):
            n.input[:] = [new if x == old else x for x in n.input]
        for sub in _subgraphs(n):
            _rename_inputs(sub, old, new, skip)


def _route_outer_reads(graph: onnx.GraphProto, top: onnx.GraphProto, names: set[str]) -> None:
    """Every outer-scope read of a body goes through one Identity at the top of that body.

    The converter types a body's tensors from its own value_info: an outer name has none there, so
    a blocked op (Resize) reading one got no Cast back to fp32. Local Identity outputs get inferred
    types like any tensor. A graph input read only inside bodies first goes through an Identity in
    the main graph, so that it gets the converter's fp16 input Cast.
    """
    for node in list(graph.node):
        for body in _subgraphs(node):
            defined = {v.name for g in _graphs(body) for v in [*g.input, *g.initializer]}
            defined |= {o for g in _graphs(body) for m in g.node for o in m.output}
            outer = [x for x in dict.fromkeys(x for g in _graphs(body) for m in g.node for x in m.input)
                     if x and x not in defined]
            for k, name in enumerate(outer):
                if graph is top and name in {v.name for v in top.input} and not any(
                    name in m.input for m in top.node
                ):  # read only inside bodies: give it a main-graph reader first
                    via = _fresh(f"{name}__main", names)
                    _rename_inputs(top, name, via)
                    top.node.insert(0, helper.make_node("Identity", [name], [via], name=via))
                    name, outer[k] = via, via
                local = _fresh(f"{name}__{body.name or 'body'}", names)
                for m in body.node:
                    m.input[:] = [local if x == name else x for x in m.input]
                    for sub in _subgraphs(m):
                        _rename_inputs(sub, name, local)
                body.node.insert(0, helper.make_node("Identity", [name], [local], name=local))
            _route_outer_reads(body, top, names)


def _body_reads(node: onnx.NodeProto) -> set[str]:
    return {x for sub in _subgraphs(node) for g in _graphs(sub) for m in g.node for x in m.input}


def _toposort(graph: onnx.GraphProto) -> None:
    """Stable topological order, bodies included; a node also waits for what its bodies read
    from outside (the converter's own sort ignores those and put an If before its inputs)."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    users: dict[int, list[int]] = {}
    missing = []
    for i, n in enumerate(graph.node):
        deps = {producer[x] for x in {*n.input, *_body_reads(n)} if x in producer} - {i}
        missing.append(len(deps))
        for d in deps:
            users.setdefault(d, []).append(i)
    ready = [i for i, k in enumerate(missing) if k == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, []):
            missing[u] -= 1
            if missing[u] == 0:
                heapq.heappush(ready, u)
    placed = set(order)
    order += [i for i in range(len(graph.node)) if i not in placed]  # a cycle: the checker names it
    for n in graph.node:
        for body in _subgraphs(n):
            _toposort(body)
    nodes = [copy.deepcopy(graph.node[i]) for i in order]
    del graph.node[:]
    graph.node.extend(nodes)


def _fresh(base: str, names: set[str]) -> str:
    name, k = base, 0
    while name in names:
        k += 1
        name = f"{base}_{k}"
    names.add(name)
    return name


@functools.lru_cache(maxsize=1)
def _runtime_schemas() -> dict[tuple[str, str], list]:
    """onnxruntime's contrib-op schemas (com.microsoft, ...) by (domain, op), oldest first."""
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        return {}
    found: dict[tuple[str, str], list] = {}
    for s in sorted(get_all_operator_schema(), key=lambda s: s.since_version):
        found.setdefault((s.domain, s.name), []).append(s)
    return found


def _type_constraints(op: str, domain: str, version: int) -> list[set[str]] | None:
    """The op's type constraint sets at ``version`` (ONNX's schemas, then onnxruntime's contrib
    schemas, which the onnx checker does not know), or None when no schema is known."""
    try:
        schema = defs.get_schema(op, version, "" if domain == "ai.onnx" else domain)
    except Exception:  # noqa: BLE001 - not an ONNX op: try onnxruntime's
        known = _runtime_schemas().get((domain, op), [])
        schema = next((s for s in reversed(known) if s.since_version <= version), None)
    return None if schema is None else [set(c.allowed_type_strs) for c in schema.type_constraints]


def lowp_unsupported_ops(model: onnx.ModelProto, precision: str) -> list[str]:
    """Op types whose schema at the model's opset takes float but not fp16/bf16: they stay fp32.

    For bf16 below opset 22 that includes Conv, i.e. no sparse bf16 convolution; callers should
    report these (re-exporting at a newer opset lowers them too). Contrib ops (com.microsoft's
    DynamicQuantizeLSTM/MatMul take float only) are judged by onnxruntime's schemas.
    """
    want = f"tensor({'float16' if precision == 'fp16' else 'bfloat16'})"
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    found: set[str] = set()
    for node in (n for g in _graphs(model.graph) for n in g.node):
        domain = "" if node.domain == "ai.onnx" else node.domain
        version = opsets.get(domain, 1)
        types = None if node.op_type in found else _type_constraints(node.op_type, domain, version)
        if types is None:
            continue
        if any("tensor(float)" in t for t in types) and not any({"tensor(float)", want} <= t for t in types):
            found.add(node.op_type)
    return sorted(found)


def _type_blocked_outputs(model: onnx.ModelProto, blocked) -> None:
    """value_info FLOAT for the float outputs of blocked contrib ops, which onnx's inference cannot
    type: without it the converter adds no fp16 Cast after them and their readers get float32."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - then the converter's own inference fails the same way
        return
    elem = {t.name: t.data_type for g in _graphs(inferred.graph) for t in g.initializer}
    elem.update({v.name: v.type.tensor_type.elem_type for g in _graphs(inferred.graph)
                 for v in [*g.input, *g.output, *g.value_info]})
    opsets = {o.domain: o.version for o in model.opset_import}
    for g in _graphs(model.graph):
        for node in (n for n in g.node if n.domain not in ("", "ai.onnx") and blocked(n)):
            known = _runtime_schemas().get((node.domain, node.op_type), [])
            version = opsets.get(node.domain, 1)
            schema = next((s for s in reversed(known) if s.since_version <= version), None)
            if schema is None:
                continue
            allowed = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
            bound = {p.typeStr: elem[x] for p, x in zip(schema.inputs, node.input, strict=False) if x in elem}
            for p, out in zip(schema.outputs, node.output, strict=False):
                fixed = allowed.get(p.typeStr, [p.typeStr])
                if out and out not in elem and (fixed == ["tensor(float)"] or bound.get(p.typeStr) == F32):
                    g.value_info.append(helper.make_tensor_value_info(out, F32, None))


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


def _prepare(model: onnx.ModelProto, block_ops: set[str]) -> tuple[set[str], set[str]]:
    """Make the model safe for the converter; return the nodes blocked by name (norm variance) and
    the model's own unblocked Cast(to=FLOAT) nodes, which must produce fp16 after conversion."""
    g = model.graph
    if any(t.data_location == TensorProto.EXTERNAL for t in g.initializer):
        raise SparsecError(
            "precision conversion needs the weights in memory",
            hint="load the model with onnx.load(path, load_external_data=True)",
        )
    nodes = [n for sub in _graphs(g) for n in sub.node]
    names, seen = {n.name for n in nodes}, set()
    for i, node in enumerate(nodes):  # unique names in every body: the converter's Cast names
        if not node.name or node.name in seen:  # derive from them and tensor names are global
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
    names |= {x for sub in _graphs(g) for n in sub.node for x in [*n.input, *n.output]}
    names |= {v.name for sub in _graphs(g) for v in [*sub.input, *sub.output, *sub.initializer]}
    _route_outer_reads(g, g, names)
    block_nodes = {name for sub in _graphs(g) for name in _norm_variance_nodes(sub)}
    blocked = lambda n: n.op_type in block_ops or n.name in block_nodes  # noqa: E731
    _type_blocked_outputs(model, blocked)
    for sub in _graphs(g):
        nested = _nested_reads(sub)
        for name in [t.name for t in sub.initializer if t.data_type == F32]:  # read by both kinds
            kinds = {blocked(n) for n in sub.node if name in n.input} | ({False} if name in nested else set())
            if kinds == {True, False}:
                via = f"{name}__fp32"
                _rename_inputs(sub, name, via, skip=lambda n: not blocked(n))
                sub.node.insert(0, helper.make_node("Identity", [name], [via], name=via))
    own_casts = {  # retyped after conversion: before it, shape inference would carry fp16 into
        n.name  # the blocked ops downstream (Resize) and the converter then skips their casts
        for sub in _graphs(g)
        for n in sub.node
        if n.op_type == "Cast" and helper.get_node_attr_value(n, "to") == F32 and not blocked(n)
    }
    return block_nodes, own_casts


def _retype_casts(graph: onnx.GraphProto, names: set[str]) -> None:
    """The model's own Cast(to=FLOAT) nodes produce fp16 like their (converted) neighbours."""
    for sub in _graphs(graph):
        for n in (n for n in sub.node if n.name in names):
            for a in (a for a in n.attribute if a.name == "to"):
                a.i = F16


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
    for old, new in rename.items():
        if old != new:
            _rename_inputs(graph, old, new)
    while True:  # drop Casts nobody reads (repeat: a chain of them dies back to front)
        read = {x for n in graph.node for x in n.input} | outputs | _nested_reads(graph)
        dead = [n for n in graph.node if n.op_type == "Cast" and not {*n.output} & read]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {x for n in graph.node for x in n.input} | outputs | _nested_reads(graph)
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
    block_nodes, own_casts = _prepare(src, block_ops)
    keep = float16.remove_unnecessary_cast_node, float16.sort_topology
    float16.remove_unnecessary_cast_node = lambda graph: None  # breaks on the model's own Casts
    float16.sort_topology = _toposort  # its own ignores what If/Loop bodies read
    try:
        out = float16.convert_float_to_float16(
            copy.deepcopy(src),
            keep_io_types=True,
            op_block_list=sorted(block_ops),
            node_block_list=sorted(block_nodes),
            check_fp16_ready=False,
        )
    finally:
        float16.remove_unnecessary_cast_node, float16.sort_topology = keep
    _retype_casts(out.graph, own_casts)
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
