"""Compile writes weights.sparsec + skeleton.onnx; decode rebuilds model.onnx bit for bit."""

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import initializers, random_feeds, run

import sparsec
from models import GOLDEN, example_path
from sparsec.cli import cli
from sparsec.encoding.container import read_manifest


@pytest.mark.parametrize(("name", "kwargs"), [
    ("example", {"nm": "2:4"}),
    ("cnn", {"sparsity": 0.9}),
    ("weight_paths", {"nm": "2:4", "min_params": 0}),
    ("mlp", {"sparsity": 0.5, "encode": "csr", "min_params": 0}),
    ("gemm_transb", {"nm": "2:4", "encode": "nm_hw", "min_params": 0}),
])
def test_decode_rebuilds_model_bit_for_bit(tmp_path, name, kwargs):
    src = tmp_path / "m.onnx"
    onnx.save(GOLDEN[name](), src)
    report = sparsec.compile(src, output=tmp_path / "o", **kwargs)
    rows = report.encoding["tensors"]
    pruned = {e.weight for e in report.layers if e.skipped_reason is None}
    assert {r["tensor"].removeprefix("constant:") for r in rows} == pruned
    for r in rows:
        assert r["bytes"] == r["candidates"][r["format"]]
        if kwargs.get("encode") is None:
            assert r["bytes"] == min(r["candidates"].values())  # auto picks the smallest
        else:
            assert r["format"] == kwargs["encode"]
        assert "dense" in r["formula"]
    manifest = {e["name"]: e for e in read_manifest(tmp_path / "o" / "weights.sparsec")}
    assert set(manifest) == {r["tensor"] for r in rows}
    assert all(e["offset"] % 64 == 0 for e in manifest.values())
    restored = sparsec.api.decode(tmp_path / "o", tmp_path / "restored.onnx")
    assert restored.read_bytes() == (tmp_path / "o" / "model.onnx").read_bytes()
    skeleton = (tmp_path / "o" / "skeleton.onnx").stat().st_size
    assert skeleton < (tmp_path / "o" / "model.onnx").stat().st_size


def test_nm_encoding_uses_the_stored_axis_through_transpose(tmp_path):
    src = tmp_path / "w.onnx"
    onnx.save(GOLDEN["weight_paths"](), src)
    report = sparsec.compile(src, output=tmp_path / "o", nm="2:4", min_params=0, encode="nm_rank")
    manifest = {e["name"]: e for e in read_manifest(tmp_path / "o" / "weights.sparsec")}
    assert manifest["w_stored"]["params"]["axis"] == 1  # stored [24, 40] read as its transpose
    assert manifest["w_identity"]["params"]["axis"] == 0
    assert report.encoding["totals"]["encoded_bytes"] < report.encoding["totals"]["dense_bytes"]


def test_decode_cli_and_errors(tmp_path):
    runner = CliRunner()
    out = tmp_path / "o"
    assert runner.invoke(cli, ["compile", str(example_path()), "--nm", "2:4", "-o", str(out)]).exit_code == 0
    result = runner.invoke(cli, ["decode", str(out), "-o", str(tmp_path / "r.onnx")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    data = bytearray((out / "weights.sparsec").read_bytes())
    data[-1] ^= 0xFF
    (out / "weights.sparsec").write_bytes(bytes(data))
    bad = runner.invoke(cli, ["decode", str(out), "-o", str(tmp_path / "x.onnx")])
    assert bad.exit_code != 0 and "checksum" in bad.stderr and not (tmp_path / "x.onnx").exists()
    missing = runner.invoke(cli, ["decode", str(tmp_path), "-o", str(tmp_path / "y.onnx")])
    assert missing.exit_code == 2 and "skeleton.onnx" in missing.stderr
    wrong = runner.invoke(cli, ["compile", str(example_path()), "--nm", "2:4", "--encode", "zip",
                                "-o", str(tmp_path / "z")])
    assert wrong.exit_code == 2 and "--encode 'zip'" in wrong.stderr


def test_encode_none_and_forced_format_that_does_not_apply(tmp_path):
    report = sparsec.compile(example_path(), nm="2:4", output=tmp_path / "n", encode="none")
    assert report.encoding == {"skipped": "--encode none"}
    assert not (tmp_path / "n" / "weights.sparsec").exists()
    with pytest.raises(sparsec.SparsecError, match="nm_rank"):
        sparsec.compile(example_path(), sparsity=0.5, output=tmp_path / "u", encode="nm_rank")
    assert not (tmp_path / "u").exists()


def test_sparse_initializers_run_in_onnxruntime(tmp_path):
    dense = GOLDEN["mlp"]()
    src = tmp_path / "m.onnx"
    onnx.save(dense, src)
    sparsec.compile(src, output=tmp_path / "d", sparsity=0.7, min_params=0, encode="none")
    report = sparsec.compile(src, output=tmp_path / "s", sparsity=0.7, min_params=0, sparse_initializers=True)
    model = onnx.load(tmp_path / "s" / "model.onnx")
    onnx.checker.check_model(model)  # full_check's shape inference types them sparse_tensor and stops
    assert len(model.graph.sparse_initializer) == 3
    assert sorted(report.tensorrt["sparse_initializers"]) == ["fc0.weight", "fc1.weight", "head.weight"]
    first = model.graph.sparse_initializer[0]
    assert onnx.numpy_helper.to_array(first.values).size < 0.5 * np.prod(first.dims)
    feeds = random_feeds(dense, {"x": (4, 32)})
    np.testing.assert_array_equal(run(str(tmp_path / "s" / "model.onnx"), feeds)[0],
                                  run(str(tmp_path / "d" / "model.onnx"), feeds)[0])
    assert (tmp_path / "s" / "model.onnx").stat().st_size < (tmp_path / "d" / "model.onnx").stat().st_size
    assert "fc0.weight" not in initializers(model)
