"""Per-op knowledge of weight-bearing ops, in one table keyed by op type.

Where a node keeps its weight, which weight axis it reduces over and which holds its output channels
(given transA/transB/group), where the output channels land in its output, which input is its bias,
and how Gemm's alpha/beta scale the two: layer analysis (`core.layers`), the channel rules, the
channel editor and its compensation, channel scoring and BatchNorm folding all read it here and
nowhere else. An op missing from the table is not a layer and, for the channel analysis, ends its
group (unknown means "do not prune", never "guess"). The pass-through and coupling rules of the
channel analysis are a sibling `Registry` in `sparsec.channels.channel_rules`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import onnx
from onnx import helper

T = TypeVar("T")


class Registry(Generic[T]):
    """A dict keyed by op type whose `register()` refuses a second entry for the same op."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, op_types: tuple[str, ...] | str, entry: T) -> None:
        """Add `entry` for each op; a second entry for the same op is a bug, not an override."""
        ops = (op_types,) if isinstance(op_types, str) else op_types
        for op in ops:
            if op in self._entries:
                raise ValueError(f"a {self.what} for {op} is already registered")
        for op in ops:
            self._entries[op] = entry

    def unregister(self, op_type: str) -> None:
        """Remove an entry (tests that register a temporary op clean up with this)."""
        del self._entries[op_type]

    def get(self, op_type: str, default: T | None = None) -> T | None:
        return self._entries.get(op_type, default)

    def __getitem__(self, op_type: str) -> T:
        return self._entries[op_type]

    def __contains__(self, op_type: object) -> bool:
        return op_type in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class WeightAxes:
    """How one node uses the weight on `input`, in the weight's layout as the node sees it."""

    input: int  # node input holding the weight
    reduction: int  # weight axis summed over: the input channels (TensorRT's sparsity axis)
    output: int  # weight axis of the output channels (within a block when out_groups > 1)
    data_axis: int  # axis of the activation input whose channels `reduction` meets (negative: from the end)
    out_axis: int  # axis of the node's output holding the output channels (negative: from the end)
    groups: int = 1  # the node's `group` attribute
    out_groups: int = 1  # ConvTranspose W[C, M/g, k...]: output channel g·(M/g)+j is column j of row block g
    bias: int | None = None  # input holding the per-output-channel bias, added after the product
    alpha: float = 1.0  # output = alpha · product + beta · bias (Gemm)
    beta: float = 1.0


@dataclass(frozen=True)
class WeightOp:
    """One weight-bearing op type."""

    op: str
    inputs: tuple[int, ...] = ()  # inputs that may hold the constant weight, the preferred one first
    input_names: tuple[str, ...] = ()  # the ONNX spec's names of the inputs, for messages
    axes: Callable[[onnx.NodeProto, int], WeightAxes] | None = None
    kernel: bool = False  # the weight is a convolution kernel (rank ≥ 3), not a 2-D matrix
    both_constant: str | None = None  # reason to skip when every weight input is constant
    integer: bool = False  # multiplies integer weights directly: listed as left dense, never pruned

    @property
    def weight_input(self) -> int:
        return self.inputs[0]

    def input_name(self, k: int) -> str:
        return self.input_names[k] if k < len(self.input_names) else f"input {k}"


WEIGHT_OPS: Registry[WeightOp] = Registry("weight op")


def attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def weight_op(op_type: str) -> WeightOp | None:
    """The table entry of a float weight-bearing op, or None (integer ops included)."""
    spec = WEIGHT_OPS.get(op_type)
    return None if spec is None or spec.integer else spec


def weight_axes(node: onnx.NodeProto, k: int | None = None) -> WeightAxes | None:
    """The axes of `node`'s weight on input `k` (default: its preferred weight input)."""
    spec = weight_op(node.op_type)
    if spec is None or spec.axes is None:
        return None
    return spec.axes(node, spec.weight_input if k is None else k)


def _conv(node: onnx.NodeProto, k: int) -> WeightAxes:  # W[M, C/g, k...]: groups keep axis 0 whole
    return WeightAxes(k, 1, 0, 1, 1, groups=int(attr(node, "group", 1)), bias=2)


def _conv_transpose(node: onnx.NodeProto, k: int) -> WeightAxes:  # W[C, M/g, k...]
    g = int(attr(node, "group", 1))
    return WeightAxes(k, 0, 1, 1, 1, groups=g, out_groups=g, bias=2)


def _gemm(node: onnx.NodeProto, k: int) -> WeightAxes:
    """Y = alpha·A'·B' + beta·C with A' = Aᵀ if transA, B' = Bᵀ if transB; Y is [M, N]."""
    scale = {"alpha": float(attr(node, "alpha", 1.0)), "beta": float(attr(node, "beta", 1.0))}
    trans_a = int(attr(node, "transA", 0))
    if k == 1:  # B: [K, N], or [N, K] with transB
        red, out = (1, 0) if int(attr(node, "transB", 0)) else (0, 1)
        return WeightAxes(1, red, out, 0 if trans_a else 1, 1, bias=2, **scale)
    red, out = (0, 1) if trans_a else (1, 0)  # a constant A: [M, K], or [K, M] with transA
    return WeightAxes(0, red, out, 1 if int(attr(node, "transB", 0)) else 0, 0, bias=2, **scale)


def _matmul(node: onnx.NodeProto, k: int) -> WeightAxes:
    """X @ W reduces W's axis 0 against X's last; W @ X reduces W's axis 1 against X's second last."""
    return WeightAxes(1, 0, 1, -1, -1) if k == 1 else WeightAxes(0, 1, 0, -2, -2)


WEIGHT_OPS.register("Conv", WeightOp("Conv", (1,), ("X", "W", "B"), _conv, kernel=True))
WEIGHT_OPS.register("ConvTranspose", WeightOp("ConvTranspose", (1,), ("X", "W", "B"), _conv_transpose,
                                              kernel=True))
WEIGHT_OPS.register("Gemm", WeightOp("Gemm", (1, 0), ("A", "B", "C"), _gemm))
WEIGHT_OPS.register("MatMul", WeightOp("MatMul", (1, 0), ("A", "B"), _matmul,
                                       both_constant="both MatMul operands are constant (fold it first)"))
# Ops that multiply integer weights directly: no DequantizeLinear says what "zero" is to them in a
# form sparsec rewrites, so they are listed as skipped.
for _op in ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLSTM",
            "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"):
    WEIGHT_OPS.register(_op, WeightOp(_op, integer=True))
