"""Golden models for structured (channel) pruning, exported from PyTorch with BatchNorm kept unfused.

Every builder returns an opset-17 ``onnx.ModelProto`` with input ``x[batch, 3, H, W]`` (symbolic
batch) and output ``y[batch, ...]``, exported with the TorchScript exporter from the module that
:func:`torch_reference` returns (so tests can compare against ``module(x)`` in eval mode):

* ``resnet`` — strided basic block with a 1×1 strided Conv+BN shortcut, residual Add, GAP → Gemm,
* ``resnet_224`` — the same family at 224×224 (7×7/2 stem, MaxPool, 3 stages × 2 blocks),
* ``mobilenetv3`` — depthwise Conv, squeeze-excite, HardSwish/HardSigmoid, PRelu, Clip, LeakyRelu,
* ``c2f`` — YOLOv8 C2f (Split, bottleneck Adds, Concat), SiLU as Sigmoid·Mul, SPPF MaxPools,
  channel Slice, nearest Resize,
* ``unet`` — ConvTranspose upsampling, Concat skips, explicit Pad, 2-channel output,
* ``structured_mlp`` / ``reshape_gemm`` — Flatten / Reshape → Gemm (each channel owns H·W
  consecutive features), MatMul + Add hidden layer, per-feature Mul,
* ``grouped`` — grouped Conv, Sub/Div/Add/Mul by per-channel constants, Sigmoid gate, AveragePool.

BatchNorm stays a ``BatchNormalization`` node: the module is put in eval mode and exported with
``training=TrainingMode.PRESERVE`` (``EVAL`` makes the exporter fuse BN into the Conv). BN state
(gamma, beta, running mean/var) is randomised from the seed so folding is really tested.
Constant sub-graphs the exporter leaves behind (Pad's pads, Clip bounds, Resize scales, Constant
nodes) are folded into initializers. torch is imported lazily.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import numpy_helper

from models._common import name_nodes

from ._common import IR_VERSION

if TYPE_CHECKING:
    from torch import nn

INPUT_HW = {"resnet_224": 224, "mobilenetv3": 64, "structured_mlp": 8, "reshape_gemm": 8}


def _factories() -> dict[str, Callable[..., nn.Module]]:
    from . import structured_cnn as sc
    from . import structured_misc as sm

    def resnet(width: int = 16, input_hw: int = 32) -> nn.Module:
        return sc.ResNet([(width, 1, 1), (2 * width, 1, 2)], stem_width=width)

    def resnet_224(width: int = 64) -> nn.Module:
        stages = [(width, 2, 1), (2 * width, 2, 2), (4 * width, 2, 2)]
        return sc.ResNet(stages, stem_width=width, imagenet_stem=True)

    return {
        "resnet": resnet,
        "resnet_224": resnet_224,
        "mobilenetv3": sc.MobileNetV3,
        "c2f": sc.C2fNet,
        "unet": sm.UNet,
        "structured_mlp": sm.StructuredMLP,
        "reshape_gemm": lambda: sm.StructuredMLP(reshape=True),
        "grouped": sm.Grouped,
    }


def _randomize(module: nn.Module) -> None:
    """He-normal weights, small biases, trained-looking BN state and PRelu slopes (global torch RNG)."""
    import torch
    from torch import nn

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
            elif isinstance(m, nn.PReLU):
                m.weight.uniform_(0.05, 0.5)


def torch_reference(name: str, seed: int = 0, **kwargs: Any) -> nn.Module:
    """The seeded eval-mode PyTorch module that ``GOLDEN[name](seed, **kwargs)`` exports.

    The caller's global torch RNG state is left untouched.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = _factories()[name](**kwargs)
        _randomize(module)
    return module.eval()


def _fold_constants(model: onnx.ModelProto) -> None:
    """Replace every node whose inputs are all constant (and Constant nodes) by initializers."""
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        foldable = node.op_type == "Constant" or (
            len(node.input) > 0 and all(i in consts or i == "" for i in node.input)
        )
        if not foldable:
            kept.append(node)
            continue
        feeds = {i: consts[i] for i in node.input if i}
        outs = ReferenceEvaluator(node).run(None, feeds)
        for out_name, value in zip(node.output, outs, strict=True):
            consts[out_name] = np.asarray(value)
    used = {i for n in kept for i in n.input} | {o.name for o in graph.output}
    inits = [numpy_helper.from_array(consts[name], name) for name in consts if name in used]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    keep_vi = [v for v in graph.value_info if v.name not in consts]
    del graph.value_info[:]
    graph.value_info.extend(keep_vi)



def export_structured(name: str, seed: int = 0, **kwargs: Any) -> onnx.ModelProto:
    """Export ``torch_reference(name, seed, **kwargs)`` with BN unfused; see the module docstring."""
    import torch

    module = torch_reference(name, seed, **kwargs)
    hw = kwargs.get("input_hw", INPUT_HW.get(name, 32))
    example = torch.zeros(2, 3, hw, hw)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            buf,
            dynamo=False,
            opset_version=17,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=True,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )
    model = onnx.load_from_string(buf.getvalue())
    _fold_constants(model)
    name_nodes(model)
    model.ir_version = IR_VERSION
    model.producer_name = "sparsec-golden"
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def build_resnet(seed: int = 0, width: int = 16, input_hw: int = 32) -> onnx.ModelProto:
    """Stem Conv+BN+ReLU, basic block, strided basic block with 1×1/2 Conv+BN shortcut, GAP → Gemm."""
    return export_structured("resnet", seed, width=width, input_hw=input_hw)


def build_resnet_224(seed: int = 0, width: int = 64) -> onnx.ModelProto:
    """Benchmark ResNet at 224×224: 7×7/2 stem + MaxPool, 3 stages × 2 basic blocks, GAP → Gemm."""
    return export_structured("resnet_224", seed, width=width)


def build_mobilenetv3(seed: int = 0) -> onnx.ModelProto:
    """MobileNetV3-style: depthwise Conv, squeeze-excite, HardSwish, HardSigmoid, PRelu, Clip, LeakyRelu."""
    return export_structured("mobilenetv3", seed)


def build_c2f(seed: int = 0) -> onnx.ModelProto:
    """YOLOv8 C2f + SPPF: Split, bottleneck Adds, Concat, Sigmoid·Mul, MaxPool, channel Slice, Resize."""
    return export_structured("c2f", seed)


def build_unet(seed: int = 0) -> onnx.ModelProto:
    """Two-level U-Net: MaxPool, ConvTranspose (bias), Concat skips, Pad, fixed 2-channel output."""
    return export_structured("unet", seed)


def build_structured_mlp(seed: int = 0) -> onnx.ModelProto:
    """Conv+BN+ReLU → Flatten → Gemm → Relu → MatMul + Add → per-feature Mul → Relu → Gemm."""
    return export_structured("structured_mlp", seed)


def build_reshape_gemm(seed: int = 0) -> onnx.ModelProto:
    """As :func:`build_structured_mlp` with a constant-shape ``Reshape`` instead of ``Flatten``."""
    return export_structured("reshape_gemm", seed)


def build_grouped(seed: int = 0) -> onnx.ModelProto:
    """Conv+BN+ReLU, Sub/Div/Add/Mul per-channel constants, grouped Conv (groups=4), Sigmoid gate."""
    return export_structured("grouped", seed)
