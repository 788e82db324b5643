"""Does onnxruntime's CPU provider run a converted model, and how far do its outputs drift from fp32."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from sparsec.runtime.session import log_severity


def _session(model: onnx.ModelProto):
    opts = ort.SessionOptions()
    opts.log_severity_level = log_severity()
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _reason(exc: Exception) -> str:
    return (
        (str(exc).strip() or type(exc).__name__)
        .splitlines()[0]
        .split("NOT_IMPLEMENTED : ")[-1][:200]
    )


def can_run_on_cpu(model: onnx.ModelProto) -> tuple[bool, str]:
    """(True, "") if onnxruntime's CPU provider loads ``model``, else (False, one-line reason).

    ORT 1.32 CPU has no bfloat16 MatMul/Gemm/Relu/Add/BatchNormalization kernels, so bf16 models
    are usually not runnable there: report "not runnable on onnxruntime CPU: <reason>".
    """
    try:
        _session(model)
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated exception types
        return False, _reason(exc)
    return True, ""


def precision_drift(
    dense: onnx.ModelProto, converted: onnx.ModelProto, feeds: dict[str, np.ndarray]
) -> dict:
    """Run both models on ORT CPU with the same float32 ``feeds`` and compare each output.

    Returns {"runnable", "reason", "max_abs", "rel", "outputs": {name: {"max_abs", "ref_max_abs",
    "rel"}}}, rel = max |converted - dense| / max |dense| (relative to the output's range; an
    element-wise ratio explodes near zero). Not runnable: runnable False, the reason, no numbers.
    """
    try:
        sess = _session(converted)
    except Exception as exc:  # noqa: BLE001 - as in can_run_on_cpu
        return {
            "runnable": False,
            "reason": _reason(exc),
            "max_abs": None,
            "rel": None,
            "outputs": {},
        }
    names, ref = [o.name for o in dense.graph.output], _session(dense).run(None, feeds)
    outputs = {}
    for name, a, b in zip(names, ref, sess.run(None, feeds), strict=True):
        err = float(np.max(np.abs(np.float64(a) - np.float64(b)), initial=0.0))
        scale = float(np.max(np.abs(np.float64(a)), initial=0.0))
        outputs[name] = {"max_abs": err, "ref_max_abs": scale, "rel": err / (scale or 1.0)}
    worst = {k: max((o[k] for o in outputs.values()), default=0.0) for k in ("max_abs", "rel")}
    return {"runnable": True, "reason": None, **worst, "outputs": outputs}
