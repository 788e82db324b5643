"""Tensor shapes without running the model: fixed input shapes from --shape, and ONNX shape inference
on a weight-free copy. `sparsec.runtime.observe` settles what inference leaves open with one run."""

from __future__ import annotations

import math

import onnx

from sparsec.errors import SparsecError

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
