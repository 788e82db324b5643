"""Small helpers shared by the golden-model builders (opset 17, float32, deterministic)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

OPSET = 17
#: IR version 8 is the one onnx pairs with opset 17; onnxruntime 1.32 loads it.
IR_VERSION = 8


def weight(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    """He-style scaled normal float32 initializer (fan-in = product of all dims but the first)."""
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
    scale = np.sqrt(2.0 / max(fan_in, 1))
    arr = (rng.standard_normal(shape) * scale).astype(np.float32)
    return numpy_helper.from_array(arr, name)


def bias(rng: np.random.Generator, name: str, n: int) -> onnx.TensorProto:
    """Small random float32 bias vector."""
    return numpy_helper.from_array((rng.standard_normal(n) * 0.1).astype(np.float32), name)


def batchnorm_params(rng: np.random.Generator, prefix: str, c: int) -> list[onnx.TensorProto]:
    """Realistic BN state: gamma ~ 1, beta ~ 0, running mean ~ N(0, .1), running var > 0."""
    gamma = rng.uniform(0.5, 1.5, c).astype(np.float32)
    beta = (rng.standard_normal(c) * 0.1).astype(np.float32)
    mean = (rng.standard_normal(c) * 0.1).astype(np.float32)
    var = rng.uniform(0.5, 2.0, c).astype(np.float32)
    return [
        numpy_helper.from_array(a, f"{prefix}.{k}")
        for k, a in (("scale", gamma), ("bias", beta), ("mean", mean), ("var", var))
    ]


def finalize(graph: onnx.GraphProto, producer: str = "sparsec-golden") -> onnx.ModelProto:
    """Wrap a graph into an opset-17 model, infer shapes and run the full checker."""
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name=producer
    )
    model.ir_version = IR_VERSION
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique non-empty name, deterministically (keeps the exporter's names)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)
