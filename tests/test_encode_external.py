"""--encode on a model with external data: the container is streamed, the skeleton ships with its own
.data file holding only the tensors the container does not, and decode rebuilds model.onnx value for
value (with external data, never one big protobuf)."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import run
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import sparsec
from sparsec.core.output import CONTAINER, SKELETON, SKELETON_DATA
from sparsec.encoding.blobs import restore
from sparsec.encoding.container import read_manifest


def embed_mlp(seed: int = 0) -> onnx.ModelProto:
    """ids -> Gather(embedding) -> MatMul -> Relu -> MatMul -> Add(bias): two prunable weights, an
    embedding that stays dense (Gather) and a small bias that stays inside the protobuf."""
    rng = np.random.default_rng(seed)
    inits = [nh.from_array(rng.standard_normal((50, 32)).astype(np.float32), "emb"),
             nh.from_array(rng.standard_normal((32, 64)).astype(np.float32), "w1"),
             nh.from_array(rng.standard_normal((64, 16)).astype(np.float32), "w2"),
             nh.from_array(rng.standard_normal(16).astype(np.float32), "b")]
    nodes = [h.make_node("Gather", ["emb", "ids"], ["e"], name="gather"),
             h.make_node("MatMul", ["e", "w1"], ["a"], name="mm1"),
             h.make_node("Relu", ["a"], ["r"], name="relu"),
             h.make_node("MatMul", ["r", "w2"], ["m"], name="mm2"),
             h.make_node("Add", ["m", "b"], ["y"], name="add")]
    graph = h.make_graph(nodes, "embed_mlp", [h.make_tensor_value_info("ids", T.INT64, [2, 4])],
                         [h.make_tensor_value_info("y", T.FLOAT, [2, 4, 16])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def save_external(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=1024)
    return path


def values(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path), load_external_data=True)
    return {t.name: nh.to_array(t) for t in model.graph.initializer}


def offsets(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    return {t.name: int({e.key: e.value for e in t.external_data}.get("offset", 0))
            for t in model.graph.initializer if t.data_location == T.EXTERNAL}


@pytest.fixture
def compiled(tmp_path):
    src = save_external(embed_mlp(), tmp_path / "in" / "m.onnx")
    report = sparsec.compile(src, output=tmp_path / "out", nm="2:4", min_params=0)
    return src, tmp_path / "out", report


def test_encode_writes_container_and_external_skeleton(compiled):
    _, out, report = compiled
    assert "skipped" not in report.encoding
    assert {r["tensor"] for r in report.encoding["tensors"]} == {"w1", "w2"}
    assert [e["name"] for e in read_manifest(out / CONTAINER)] == ["w1", "w2"]
    skeleton = onnx.load(str(out / SKELETON), load_external_data=False)
    by_name = {t.name: t for t in skeleton.graph.initializer}
    for name in ("w1", "w2"):  # shipped only in the container
        assert by_name[name].data_location == T.DEFAULT and not by_name[name].raw_data
    assert offsets(out / SKELETON) == {"emb": 0}  # the dense embedding lives in the skeleton's data
    assert (out / SKELETON_DATA).stat().st_size == 50 * 32 * 4
    assert len(by_name["b"].raw_data) == 16 * 4  # small tensors stay inside the protobuf


def test_decode_rebuilds_external_model_value_for_value(compiled, tmp_path):
    _, out, _ = compiled
    (tmp_path / "r").mkdir()
    restored = sparsec.api.decode(out, tmp_path / "r" / "restored.onnx")
    assert (tmp_path / "r" / "restored.onnx.data").is_file()
    assert offsets(restored) and all(o % 64 == 0 for o in offsets(restored).values())
    want, got = values(out / "model.onnx"), values(restored)
    assert want.keys() == got.keys()
    for name, array in want.items():
        assert got[name].dtype == array.dtype
        np.testing.assert_array_equal(got[name].view(np.uint8), array.view(np.uint8), err_msg=name)
    # the same placement as model.onnx: the data files agree byte for byte
    assert (tmp_path / "r" / "restored.onnx.data").read_bytes() == (out / "model.onnx.data").read_bytes()
    in_memory = {t.name: nh.to_array(t) for t in restore(out).graph.initializer}
    for name, array in want.items():
        np.testing.assert_array_equal(in_memory[name], array, err_msg=name)
    feeds = {"ids": np.array([[1, 2, 3, 4], [5, 6, 7, 49]], np.int64)}
    np.testing.assert_array_equal(run(str(restored), feeds)[0], run(str(out / "model.onnx"), feeds)[0])


def test_force_replaces_an_output_holding_skeleton_data(compiled):
    src, out, _ = compiled
    assert (out / SKELETON_DATA).is_file()
    report = sparsec.compile(src, output=out, nm="2:4", min_params=0, force=True, encode="bitmap")
    assert {r["format"] for r in report.encoding["tensors"]} == {"bitmap"}
    assert (out / SKELETON_DATA).is_file()


def test_sparse_initializers_still_skip_the_container(tmp_path):
    src = save_external(embed_mlp(), tmp_path / "in" / "m.onnx")
    report = sparsec.compile(src, output=tmp_path / "out", nm="2:4", min_params=0, sparse_initializers=True)
    assert "--sparse-initializers" in report.encoding["skipped"]
    assert not (tmp_path / "out" / CONTAINER).exists()
