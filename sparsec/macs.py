"""Multiply-accumulate counts with the field's formulas, from inferred activation shapes.

Conv: M·(C/g)·R·S·E·F per sample (= batch·E·F·|W|); ConvTranspose: batch·H_in·W_in·|W|;
Gemm/MatMul: rows·K·N. Non-zero MACs scale with the kept fraction of the weight.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from sparsec.errors import SparsecError
from sparsec.layers import Layer
from sparsec.tensors import TensorStore, inline_copy

_LARGE = 64  # initializers above this many elements are never shape data


def static_dim(dim: onnx.TensorShapeProto.Dimension) -> int | None:
    """A dim's fixed size, or None when it is symbolic: older Paddle exports write dim_value -1 for a
    dynamic dim, and onnxruntime reads every negative dim_value as dynamic, so sparsec does too."""
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value >= 0 else None


def fixed_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> dict:
    """Every real graph input's concrete shape: --shape values, else symbolic dims as 1."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    names = [i.name for i in inputs]
    for name in shapes:
        if name not in names:
            raise SparsecError(f"--shape {name}: the model has no input named {name}",
                               f"inputs are: {', '.join(names)}")
    fixed: dict[str, tuple[int, ...]] = {}
    for inp in inputs:
        dims = inp.type.tensor_type.shape.dim
        given = shapes.get(inp.name)
        if given is not None and len(given) != len(dims):
            raise SparsecError(f"--shape {inp.name}: gave {len(given)} dims, the input has rank {len(dims)}")
        out = []
        for k, d in enumerate(dims):
            static = static_dim(d)
            if given is not None and static is not None and given[k] != static:
                raise SparsecError(f"--shape {inp.name}: dim {k} is fixed to {static} in the model, "
                                   f"not {given[k]}")
            out.append(given[k] if given is not None else (static or 1))
        fixed[inp.name] = tuple(out)
    return fixed


def assumed_dims(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> dict[str, list[int]]:
    """Input name -> symbolic dims after the first (batch) that no --shape fixes: fixed_input_shapes sets
    them to 1, which a spatial or sequence dim rarely is, so callers say so."""
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        if inp.name in inits or inp.name in shapes:
            continue
        dims = [k for k, d in enumerate(inp.type.tensor_type.shape.dim) if k > 0 and static_dim(d) is None]
        if dims:
            out[inp.name] = dims
    return out


def _inferred(model: onnx.ModelProto, fixed: dict[str, tuple[int, ...]]) -> onnx.ModelProto | None:
    """ONNX shape inference on a weight-free copy (large weights become typed inputs)."""
    g = model.graph
    small = [t for t in g.initializer if math.prod(t.dims) <= _LARGE]
    large_inputs = [
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in g.initializer if math.prod(t.dims) > _LARGE
    ]
    inputs = [
        onnx.helper.make_tensor_value_info(i.name, i.type.tensor_type.elem_type, list(fixed[i.name]))
        for i in g.input if i.name in fixed
    ]
    light_graph = onnx.helper.make_graph(list(g.node), g.name, inputs + large_inputs,
                                         list(g.output), initializer=small)
    light = onnx.helper.make_model(light_graph, opset_imports=list(model.opset_import),
                                   ir_version=model.ir_version)
    try:
        return onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception:  # inference is best effort: unknown shapes give unknown MACs
        return None


def infer_shapes(model: onnx.ModelProto, fixed: dict[str, tuple[int, ...]]) -> dict[str, tuple]:
    """Tensor name -> concrete shape, where inference settles every dim."""
    inferred = _inferred(model, fixed)
    found: dict[str, tuple] = {}
    if inferred is not None:
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
            dims = vi.type.tensor_type.shape.dim
            if dims and all(static_dim(d) is not None for d in dims):
                found[vi.name] = tuple(d.dim_value for d in dims)
    found.update(fixed)
    return found


def infer_types(model: onnx.ModelProto, fixed: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    """Tensor name -> (element type, rank) wherever inference knows the rank."""
    inferred = _inferred(model, fixed)
    found: dict[str, tuple[int, int]] = {}
    values = list(model.graph.input)
    if inferred is not None:
        values += list(inferred.graph.value_info) + list(inferred.graph.output)
    for vi in values:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            found[vi.name] = (t.elem_type, len(t.shape.dim))
    return found


def infer_dims(model: onnx.ModelProto, fixed: dict[str, tuple[int, ...]]
               ) -> dict[str, tuple[int | None, ...]]:
    """Tensor name -> dims wherever inference knows the rank, None for a dim it cannot settle.

    A channel rule often needs one dim only (an NHWC tensor's last axis, a constant's channel
    count) where the others stay symbolic."""
    inferred = _inferred(model, fixed)
    values = list(model.graph.input)
    if inferred is not None:
        values += list(inferred.graph.value_info) + list(inferred.graph.output)
    found: dict[str, tuple[int | None, ...]] = {}
    for vi in values:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            found[vi.name] = tuple(static_dim(d) for d in t.shape.dim)
    found.update({name: tuple(shape) for name, shape in fixed.items()})
    return found


def infer_ranks(model: onnx.ModelProto, fixed: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Tensor name -> rank wherever inference knows it (dims may stay symbolic)."""
    return {name: rank for name, (_, rank) in infer_types(model, fixed).items()}


def observe_shapes(model: onnx.ModelProto, store: TensorStore, fixed: dict[str, tuple[int, ...]],
                   names: list[str]) -> dict[str, tuple]:
    """Shapes that static inference could not give, read from one onnxruntime run.

    Exporters compute Reshape targets in the graph (Shape -> Gather -> Concat), which ONNX
    shape inference often cannot follow; running the model once settles them.
    """
    if not names:
        return {}
    probe = inline_copy(model, store)
    if probe.ByteSize() >= 2**31:
        return {}
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    try:
        from sparsec.runtime.session import make_session_from_proto, random_feeds

        session = make_session_from_proto(probe)
        values = session.run(names, random_feeds(session, fixed))
    except Exception:  # best effort: unknown shapes stay unknown MACs
        return {}
    return {name: tuple(v.shape) for name, v in zip(names, values, strict=True)
            if isinstance(v, np.ndarray)}  # a sequence or map output has no shape


def settled_dims(model: onnx.ModelProto, store: TensorStore, fixed: dict[str, tuple[int, ...]]
                 ) -> dict[str, tuple[int | None, ...]]:
    """`infer_dims`, completed by one onnxruntime run on the fixed inputs for the tensors whose rank
    inference leaves unknown: ONNX's data propagation stops at old opsets (a Paddle opset-7 export's
    Reshape reads its target through Identity), and without ranks no channel rule applies."""
    dims = infer_dims(model, fixed)
    missing = [o for n in model.graph.node for o in n.output if o and o not in dims]
    if missing:
        dims.update(observe_shapes(model, store, fixed, missing))
    return dims


def layer_tensors(layer: Layer, node: onnx.NodeProto) -> str:
    """The activation whose shape `layer_macs` needs."""
    return node.input[0] if layer.op == "ConvTranspose" else node.output[0]


def layer_macs(layer: Layer, node: onnx.NodeProto, shapes: dict[str, tuple]) -> int | None:
    """Dense MACs of one layer, or None when its activation shape is unknown."""
    weight = layer.params
    if layer.op == "Conv":  # batch·E·F·|W|, |W| = M·(C/g)·R·S
        out = shapes.get(node.output[0])
        return None if out is None else out[0] * math.prod(out[2:]) * weight
    if layer.op == "ConvTranspose":
        inp = shapes.get(node.input[0])
        return None if inp is None else inp[0] * math.prod(inp[2:]) * weight
    out = shapes.get(node.output[0])
    if out is None:
        return None
    if layer.op == "Gemm":
        return out[0] * weight
    if layer.input_index == 1:  # activation @ W[K, N]: every output row costs K·N
        return math.prod(out[:-1]) * weight
    return math.prod(out[:-2]) * out[-1] * weight  # W[M, K] @ activation[..., K, N]


def all_layer_macs(model: onnx.ModelProto, store: TensorStore, layers, fixed: dict) -> dict:
    """Layer name -> dense MACs (None where the shape stays unknown)."""
    shapes = infer_shapes(model, fixed)
    nodes = model.graph.node
    unknown = [layer_tensors(la, nodes[la.node_index]) for la in layers
               if layer_tensors(la, nodes[la.node_index]) not in shapes]
    shapes.update(observe_shapes(model, store, fixed, list(dict.fromkeys(unknown))))
    return {la.name: layer_macs(la, nodes[la.node_index], shapes) for la in layers}
