"""Golden ONNX models (opset 17, float32, deterministic from a seed) for tests and benchmarks.

Each builder returns an in-memory ``onnx.ModelProto`` that passes the full ONNX checker, runs
in onnxruntime, and has a unique non-empty name on every node:

* ``mlp`` — MatMul+Add+Relu layers and a final Gemm, symbolic batch,
* ``cnn`` — dense/depthwise/grouped convs, unfused BatchNorm, residual Add, branch Concat,
* ``gemm_transb`` — every Gemm operand layout (transA, transB, K % 8 != 0),
* ``weight_paths`` — weights reached via Identity/Constant/Transpose, shared, left-side, tied,
* ``transformer`` — BERT-like encoder exported from PyTorch (torch imported lazily),
* ``example`` — the small CNN shipped as ``example.onnx`` (see :func:`example_path`).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import onnx

from .cnn import build_cnn
from .example import build_example
from .gemm import build_gemm_transb
from .mlp import build_mlp
from .structured import (
    build_c2f,
    build_grouped,
    build_mobilenetv3,
    build_reshape_gemm,
    build_resnet,
    build_resnet_224,
    build_structured_mlp,
    build_unet,
)
from .transformer import build_transformer_encoder
from .weights import build_weight_paths

GOLDEN: dict[str, Callable[..., onnx.ModelProto]] = {
    "mlp": build_mlp,
    "cnn": build_cnn,
    "gemm_transb": build_gemm_transb,
    "weight_paths": build_weight_paths,
    "transformer": build_transformer_encoder,
    "example": build_example,
    "resnet": build_resnet,
    "resnet_224": build_resnet_224,
    "mobilenetv3": build_mobilenetv3,
    "c2f": build_c2f,
    "unet": build_unet,
    "structured_mlp": build_structured_mlp,
    "reshape_gemm": build_reshape_gemm,
    "grouped": build_grouped,
}


def example_path() -> pathlib.Path:
    """Path of the bundled ``example.onnx`` (next to this module)."""
    return pathlib.Path(__file__).with_name("example.onnx")


__all__ = [
    "GOLDEN",
    "build_cnn",
    "build_example",
    "build_gemm_transb",
    "build_mlp",
    "build_transformer_encoder",
    "build_weight_paths",
    "example_path",
]
