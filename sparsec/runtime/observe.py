"""Shapes that static inference could not give, read from one onnxruntime run on the fixed inputs."""

from __future__ import annotations

import numpy as np
import onnx

from sparsec.core.macs import layer_tensors
from sparsec.core.shapes import infer_dims, infer_shapes
from sparsec.core.tensors import TensorStore
from sparsec.runtime.session import random_feeds, session_on_store


def observe_shapes(model: onnx.ModelProto, store: TensorStore, fixed: dict[str, tuple[int, ...]],
                   names: list[str]) -> dict[str, tuple]:
    """Shapes that static inference could not give, read from one onnxruntime run.

    Exporters compute Reshape targets in the graph (Shape -> Gather -> Concat), which ONNX
    shape inference often cannot follow; running the model once settles them.
    """
    if not names:
        return {}
    try:  # the values stay in the data file and the store: one inference's memory at any size
        session = session_on_store(model, store, names)
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


def layer_shapes(model: onnx.ModelProto, store: TensorStore, layers, fixed: dict[str, tuple[int, ...]]
                 ) -> dict[str, tuple]:
    """Inferred shapes, completed by one run for the activations `all_layer_macs` needs that inference
    left open."""
    shapes = infer_shapes(model, fixed)
    nodes = model.graph.node
    unknown = [layer_tensors(la, nodes[la.node_index]) for la in layers]
    shapes.update(observe_shapes(model, store, fixed, [n for n in dict.fromkeys(unknown) if n not in shapes]))
    return shapes
