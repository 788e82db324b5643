"""Which ops and nodes must stay fp32 in an fp16/bf16 conversion, read from the op schemas.

An op whose schema at the model's opset takes float but not the low type (bf16 Conv/pooling below
opset 22; contrib ops by onnxruntime's schemas, which the onnx checker does not know) stays fp32, and
so does the variance branch of a decomposed LayerNorm/RMSNorm, whose squares overflow fp16.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import onnx
from onnx import TensorProto, defs, helper

from sparsec.runtime.nested_graphs import graphs

F32 = TensorProto.FLOAT
_VAR = ("Add", "Sqrt")


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
    for node in (n for g in graphs(model.graph) for n in g.node):
        domain = "" if node.domain == "ai.onnx" else node.domain
        version = opsets.get(domain, 1)
        types = None if node.op_type in found else _type_constraints(node.op_type, domain, version)
        if types is None:
            continue
        if any("tensor(float)" in t for t in types) and not any({"tensor(float)", want} <= t for t in types):
            found.add(node.op_type)
    return sorted(found)


def type_blocked_outputs(model: onnx.ModelProto, blocked: Callable[[onnx.NodeProto], bool]) -> None:
    """value_info FLOAT for the float outputs of blocked contrib ops, which onnx's inference cannot
    type: without it the converter adds no fp16 Cast after them and their readers get float32."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - then the converter's own inference fails the same way
        return
    elem = {t.name: t.data_type for g in graphs(inferred.graph) for t in g.initializer}
    elem.update({v.name: v.type.tensor_type.elem_type for g in graphs(inferred.graph)
                 for v in [*g.input, *g.output, *g.value_info]})
    opsets = {o.domain: o.version for o in model.opset_import}
    for g in graphs(model.graph):
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


def norm_variance_nodes(graph: onnx.GraphProto) -> set[str]:
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
