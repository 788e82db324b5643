"""What token pruning must know about a real export beyond the attention blocks.

Exporters bake the token count into the graph: dynamo writes Reshape targets as constants
([-1, 17, 3, 64]) and builds an all-pass attention bias [B, 1, 17, 17] from constants; pre-norm
blocks (ViT, SVTR) read the residual stream next to the normalised q input. One onnxruntime run of
the dense model on distinct batch and length shows which values are the token count; the kept
tokens then flow through them (Reshape copies the dim, biases are gathered along token axes), and
one run of the rewritten graph proves it runs with the dense output shapes before anything is kept.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sparsec.errors import SparsecError
from sparsec.runtime.session import random_feeds, session_on_store

# ops that act on each token alone: the cut may move up through them to the residual stream
PER_TOKEN = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "Add", "Sub", "Mul",
             "Div", "Pow", "Sqrt", "Reciprocal", "Cast", "Identity")
# ops whose inputs broadcast elementwise: an early operand sized by the token count is gathered
ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Where", "Max", "Min", "And", "Or", "Equal", "Less", "Greater")
PROBE_BATCH, PROBE_LEN = 3, 7


def residual_cut(nodes, cut: str, descendants) -> str:
    """Pre-norm blocks: the later layers also read the residual stream that the q input is normalised
    from (`x + attn(ln(x))`); the cut moves up to it through per-token ops, else the residual Add would
    mix L early tokens with k kept ones."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    for _ in range(len(nodes)):
        late = descendants(nodes, cut)
        reads = {x for i in late for x in nodes[i].input if x and x != cut and x in producer
                 and producer[x] not in late}
        up, stack, seen = [], [cut], set()
        while stack and len(seen) < 16:  # a LayerNorm, or a decomposed one
            t = stack.pop()
            i = producer.get(t)
            if i is None or i in seen or nodes[i].op_type not in PER_TOKEN:
                continue
            seen.add(i)
            for x in nodes[i].input:
                if x in producer:
                    up.append(x)
                    stack.append(x)
        found = [x for x in up if x in reads]
        if not found:
            return cut
        cut = max(found, key=lambda x: len(descendants(nodes, x)))  # the most upstream one
    return cut


def probe_shapes(model: onnx.ModelProto, shapes: dict | None, seq_inputs: list[str]) -> dict:
    """Input shapes for the probe runs: sequence inputs [3, 7], a symbolic batch set to 3 (distinct from
    1-sized dims), the rest as --shape gave them."""
    out = {}
    for x in model.graph.input:
        dims = x.type.tensor_type.shape.dim
        given = list((shapes or {}).get(x.name, [d.dim_value if d.dim_value > 0 else 1 for d in dims]))
        if x.name in seq_inputs:
            given = [PROBE_BATCH, PROBE_LEN]
        elif dims and given and not dims[0].dim_value > 0:
            given[0] = PROBE_BATCH
        out[x.name] = tuple(given)
    return out


def observe(model: onnx.ModelProto, store, fixed: dict, names: list[str]) -> dict[str, np.ndarray]:
    """Values of `names` in one onnxruntime run on random inputs of shapes `fixed` ({} when it cannot run)."""
    names = sorted(set(names))
    try:  # the values stay in the data file and the store: one inference's memory at any size
        session = session_on_store(model, store, names)
        values = session.run(names, random_feeds(session, fixed))
    except Exception:  # a model onnxruntime cannot run here: nothing is followed
        return {}
    return {n: v for n, v in zip(names, values, strict=True) if isinstance(v, np.ndarray)}


def wanted(nodes, late: set[int], core: set[int], cut: str) -> list[str]:
    """Tensors the probe must show: the cut, core Reshapes (data, target, result) and early tensors
    the core nodes read."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    names = [cut]
    for i in core:
        n = nodes[i]
        if n.op_type == "Reshape":
            names += [*n.input[:2], n.output[0]]
        names += [x for x in n.input if x in producer and producer[x] not in late]
    return names


def follow_token_count(nodes, late: set[int], core: set[int], cut: str, renamed: dict[str, str],
                       seen: dict[str, np.ndarray], idx: str, new: list) -> None:
    """Make the core nodes follow the kept count: a constant token count in a Reshape target becomes the
    input's dim where the Reshape carries the token axis through; an early tensor with
    token-sized axes that an elementwise op reads (an attention bias built from constants) is gathered
    along them. `renamed` gains the gathered tensors; core nodes are rewired by the caller."""
    if cut not in seen or seen[cut].ndim < 2:
        return
    batch, length = seen[cut].shape[:2]
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    for i in sorted(core):
        n = nodes[i]
        if n.op_type == "Reshape" and len(n.input) > 1 and n.input[1] not in renamed:
            _reshape_target(n, i, producer, late, seen, length, new, renamed)
        if n.op_type not in ELEMENTWISE:
            continue
        for x in n.input:
            if x in renamed or x == cut or x not in producer or producer[x] in late or x not in seen:
                continue
            value = seen[x]
            axes = [a for a in range(1, value.ndim) if value.shape[a] == length]
            if not axes or value.dtype.kind not in "fb":
                continue
            if value.shape[0] == length and length != batch:
                raise SparsecError(f"token pruning: {n.name} ({n.op_type}) reads {x} of shape "
                                   f"{list(value.shape)}, sized by the token count without a batch axis, "
                                   "which sparsec cannot gather", "prune tokens from a later layer")
            renamed[x] = _gather_axes(x, value.ndim, axes, idx, new)


def _reshape_target(n, i: int, producer, late: set[int], seen, length: int, new: list,
                    renamed: dict[str, str]) -> None:
    data, target, out = n.input[0], n.input[1], n.output[0]
    if producer.get(target) in late or not all(t in seen for t in (data, target, out)):
        return  # a target computed from the kept tokens follows them already
    shape, xin, xout = seen[target].ravel(), seen[data].shape, seen[out].shape
    carried = [p for p, v in enumerate(shape) if v == length and p < len(xin) and xin[p] == length
               and int(np.prod(xin[:p])) == int(np.prod(xout[:p]))]
    if not carried:
        return
    mask = np.ones(len(shape), np.int64)
    mask[carried] = 0
    pick = np.zeros(len(shape), np.int64)
    pick[carried] = carried
    t = f"{target}__tokens_{i}"  # target·mask + Shape(data)[pick]·(1 - mask): allowzero=1 forbids a 0
    new += [_const(f"{t}/mask", mask), _const(f"{t}/flip", 1 - mask), _const(f"{t}/pick", pick),
            _n("Mul", [target, f"{t}/mask"], f"{t}/kept"),
            _n("Shape", [renamed.get(data, data)], f"{t}/shape"),
            _n("Gather", [f"{t}/shape", f"{t}/pick"], f"{t}/dims", axis=0),
            _n("Mul", [f"{t}/dims", f"{t}/flip"], f"{t}/tok"),
            _n("Add", [f"{t}/kept", f"{t}/tok"], t)]
    n.input[1] = t


def _gather_axes(x: str, rank: int, axes: list[int], idx: str, new: list) -> str:
    """x [B or 1, ...] gathered along each token axis with the kept indices idx [B, k]."""
    t = f"{x}__tokens"
    new += [_const(f"{t}/ones", np.ones(rank - 1, np.int64)), _const(f"{t}/zero", np.array(0, np.int64)),
            _n("Shape", ["tokens/hidden"], f"{t}/hshape"),
            _n("Gather", [f"{t}/hshape", f"{t}/zero"], f"{t}/b", axis=0),
            _n("Unsqueeze", [f"{t}/b", "tokens/axis0"], f"{t}/b1"),
            _n("Concat", [f"{t}/b1", f"{t}/ones"], f"{t}/bshape", axis=0),
            _n("Expand", [x, f"{t}/bshape"], f"{t}/0")]
    cur = f"{t}/0"
    for a in axes:
        s = f"{t}/axis{a}"
        keep = np.ones(rank, np.int64)
        keep[a] = 0
        new += [_const(f"{s}/unsq", np.array([d for d in range(1, rank) if d != a], np.int64)),
                _const(f"{s}/keep", keep), _const(f"{s}/one", 1 - keep),
                _n("Unsqueeze", [idx, f"{s}/unsq"], f"{s}/ix"),
                _n("Shape", [cur], f"{s}/shape"),
                _n("Mul", [f"{s}/shape", f"{s}/keep"], f"{s}/shape0"),
                _n("Add", [f"{s}/shape0", f"{s}/one"], f"{s}/shape1"),
                _n("Expand", [f"{s}/ix", f"{s}/shape1"], f"{s}/index"),
                _n("GatherElements", [cur, f"{s}/index"], f"{s}/out", axis=a)]
        cur = f"{s}/out"
    return cur


def check_runs(model: onnx.ModelProto, store, fixed: dict, dense: dict[str, np.ndarray]) -> None:
    """One run of the rewritten graph: it must run and give the dense output shapes, or nothing is
    written (a token count the graph computes in a way sparsec does not follow)."""
    try:
        session = session_on_store(model, store)
        outputs = session.run(None, random_feeds(session, fixed))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SparsecError(f"token pruning: the rewritten graph does not run ({first[:300]}); the model "
                           "computes something from the token count that sparsec does not follow",
                           "prune tokens from another layer, or leave --tokens out") from None
    for out, value in zip(model.graph.output, outputs, strict=True):
        if out.name in dense and np.shape(value) != dense[out.name].shape:
            raise SparsecError(f"token pruning: output {out.name} would change shape from "
                               f"{list(dense[out.name].shape)} to {list(np.shape(value))}",
                               "leave --tokens out for this model")


def _n(op: str, inputs: list[str], output: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], name=f"{output}_node", **attrs)


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_node",
                            value=numpy_helper.from_array(np.asarray(value), name))
