"""fp16 / bf16 copies of an fp32 ONNX model. TensorRT 10 strongly typed and TensorRT 11 networks
take every precision from the ONNX types, so sparse fp16/bf16 kernels need fp16/bf16 weights.

fp16 is onnxconverter-common's ``convert_float_to_float16`` (keep_io_types=True: callers feed the
same float32 data) plus passes for what it gets wrong with onnx 1.23 (converter_fixes.py): Cast names
clash for unnamed nodes, the model's own ``Cast(to=FLOAT)`` stays fp32 and confuses its Cast-pair
removal (crash, or a lost graph output), graph outputs of blocked ops or also used inside the graph
get the wrong type, initializers shared by blocked and unblocked nodes, stale value_info, one input
Cast per consumer; If/Loop/Scan bodies that read outer-scope tensors (its sort, cleanup and casts
only see each graph's own names: nested_graphs.py), and shape inference carrying the model's retyped
Casts into blocked ops (Resize).
bf16 is the same conversion retyped FLOAT16 -> BFLOAT16, weights re-rounded by ml_dtypes from the
ORIGINAL fp32 values. Exact zeros stay zero in both, so N:M patterns survive.

Kept fp32: onnxconverter-common's DEFAULT_OP_BLOCK_LIST (Resize, Range, TopK, Min/Max, ML ops); the
variance branch of a decomposed LayerNorm/RMSNorm (Pow|x*x -> ReduceMean -> [Add eps] -> Sqrt),
whose squares overflow fp16 once |x| > 256; ops whose schema at the model's opset lacks the type
(``lowp_unsupported_ops`` in lowp_support.py: bf16 Conv/pooling need opset 22; contrib ops by
onnxruntime's schemas).
LayerNormalization and Softmax stay low precision: onnxruntime and TensorRT accumulate them in fp32
internally.
"""

from __future__ import annotations

import copy

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnxconverter_common import float16

from sparsec.errors import SparsecError
from sparsec.runtime.converter_fixes import cleanup, fix_outputs, prepare, retype_casts
from sparsec.runtime.lowp_support import lowp_unsupported_ops
from sparsec.runtime.nested_graphs import graphs, toposort

PRECISIONS = ("fp32", "fp16", "bf16")
F32, F16, BF16 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16


def _to_bf16(model: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """FLOAT16 -> BFLOAT16 everywhere; weights re-rounded from the fp32 originals."""
    src = {t.name: t for g in graphs(original.graph) for t in g.initializer}
    src.update(
        {
            f"{n.name}/{a.name}": a.t
            for g in graphs(original.graph)
            for n in g.node
            for a in n.attribute
        }
    )

    def redo(t: TensorProto, key: str) -> None:
        if t.data_type == F16 and t.data_location == TensorProto.EXTERNAL:  # precision_external fills it
            t.data_type = BF16
        elif t.data_type == F16:
            arr = numpy_helper.to_array(src[key] if key in src else t).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(arr.astype(ml_dtypes.bfloat16), t.name))

    for g in graphs(model.graph):
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


def convert_precision(model: onnx.ModelProto, precision: str, check: bool = True) -> onnx.ModelProto:
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
    _check_fp32(src)
    block_ops = set(float16.DEFAULT_OP_BLOCK_LIST) | set(lowp_unsupported_ops(src, precision))
    block_nodes, own_casts = prepare(src, block_ops)
    out = _convert_fp16(src, block_ops, block_nodes)
    retype_casts(out.graph, own_casts)
    fix_outputs(
        out.graph, block_nodes | {n.name for n in out.graph.node if n.op_type in block_ops}
    )
    cleanup(out.graph)
    if precision == "bf16":
        _to_bf16(out, src)
    if check:
        check_converted(out, precision)
    return out


def check_converted(out: onnx.ModelProto | str, precision: str) -> None:
    """``onnx.checker`` with full_check on the converted model (or its path, whose folder holds its
    external data); a failure is a conversion bug."""
    try:
        onnx.checker.check_model(out, full_check=True)
    except Exception as exc:  # noqa: BLE001 - any checker failure here is a conversion bug
        raise SparsecError(
            f"{precision} conversion produced an invalid model: {str(exc).strip()[:300]}",
            hint="build with --precision fp32 and report this model",
        ) from exc


def _check_fp32(model: onnx.ModelProto) -> None:
    tensors = [t.data_type for g in graphs(model.graph) for t in g.initializer]
    tensors += [
        v.type.tensor_type.elem_type
        for g in graphs(model.graph)
        for v in [*g.input, *g.output, *g.value_info]
    ]
    if F16 in tensors or BF16 in tensors:
        raise SparsecError("model already has fp16/bf16 tensors", hint="pass the fp32 model")


def _convert_fp16(src: onnx.ModelProto, block_ops: set[str], block_nodes: set[str]) -> onnx.ModelProto:
    """onnxconverter-common's conversion with its Cast-pair removal off and our topological sort."""
    keep = float16.remove_unnecessary_cast_node, float16.sort_topology
    float16.remove_unnecessary_cast_node = lambda graph: None  # breaks on the model's own Casts
    float16.sort_topology = toposort  # its own ignores what If/Loop bodies read
    try:
        return float16.convert_float_to_float16(
            copy.deepcopy(src),
            keep_io_types=True,
            op_block_list=sorted(block_ops),
            node_block_list=sorted(block_nodes),
            check_fp16_ready=False,
        )
    finally:
        float16.remove_unnecessary_cast_node, float16.sort_topology = keep
