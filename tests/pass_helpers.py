"""Small golden graphs and a context for running one pass through the Pipeline directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sparsec.core.layers import find_layers
from sparsec.core.options import CompileOptions
from sparsec.core.pipeline import Pass, PassContext, PassResult, Pipeline
from sparsec.core.tensors import TensorStore
from sparsec.runtime.calib_data import input_specs, open_calibration
from sparsec.runtime.calibrate import CalibrationSettings
from sparsec.weights.selection import PruneTarget, select_targets


def make_model(nodes: list, inputs: dict[str, tuple], outputs: list[str], inits: dict[str, np.ndarray],
               opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "golden", [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp(seed: int = 0, k: int = 16, hidden: int = 32, out: int = 8) -> onnx.ModelProto:
    """x [N, k] → MatMul → Add → Relu → MatMul → y: two prunable weights, reduction dims 16 and 32."""
    rng = np.random.default_rng(seed)
    inits = {"w1": rng.standard_normal((k, hidden)), "b1": rng.standard_normal(hidden) * 0.1,
             "w2": rng.standard_normal((hidden, out))}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], "fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], "fc1_bias"),
             helper.make_node("Relu", ["hb"], ["r"], "relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], "fc2")]
    return make_model(nodes, {"x": ("N", k)}, ["y"], inits)


def mlp_numpy(inits: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The same MLP in float64 numpy: the reference the onnxruntime outputs are held to."""
    h = np.maximum(x.astype(np.float64) @ inits["w1"] + inits["b1"], 0.0)
    return h @ inits["w2"]


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def context(model: onnx.ModelProto, **facts) -> PassContext:
    """A context over a copy of `model` (the golden model itself is never edited)."""
    return PassContext(copy(model), TensorStore(Path(".")), dict(facts))


def run_pass(p: Pass, ctx: PassContext) -> PassResult:
    """Run one pass through the Pipeline, as the compiler does (requires checked, errors named)."""
    (result,) = Pipeline([p]).run(ctx)
    return result


def targets(model: onnx.ModelProto, **options) -> list[PruneTarget]:
    found, _ = select_targets(find_layers(model), CompileOptions(min_params=0, **options))
    return found


def calibration(model: onnx.ModelProto, samples: int = 64, batch: int = 16,
                shapes: dict | None = None) -> CalibrationSettings:
    specs = input_specs(model)
    data = open_calibration(specs, random_samples=samples, shapes=shapes or {"x": (1, 16)}, seed=3)
    return CalibrationSettings(data, batch=batch, progress=False)


def samples(settings: CalibrationSettings, name: str = "x") -> np.ndarray:
    """Every calibration sample of one input, stacked along axis 0 (for numpy references)."""
    return np.concatenate([b[name] for b in settings.data.batches(settings.batch)])


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
