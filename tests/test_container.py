"""weights.sparsec container: round trips, 64-byte alignment, atomic writes, every corruption named."""

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsec.encoding import codec, container
from sparsec.errors import SparsecError


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.itemsize}")


def sample_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    fc1 = rng.standard_normal((64, 48)).astype(np.float16)
    fc1[rng.random(fc1.shape) < 0.6] = 0
    fc1[0, 0] = -0.0
    fc2 = rng.standard_normal((32, 64)).astype(np.float32)
    fc2.reshape(-1, 4)[:, :2] = 0  # 2:4 along the last axis
    fc2[1, 3] = np.nan
    sparse = np.zeros((2, 70_000), np.int8)
    sparse[1, 69_999] = -3
    return {"fc1.weight": fc1, "fc2.weight": fc2, "embed.sparse": sparse,
            "empty": np.zeros((0, 5), np.float32), "scalar": np.array(1.5, np.float32)}


def write_sample(path: Path) -> dict[str, np.ndarray]:
    tensors = sample_tensors()
    encoded = {name: codec.choose(a, nm=(2, 4, 1) if name == "fc2.weight" else None)
               for name, a in tensors.items()}
    container.write_container(path, encoded)
    return tensors


def header(path: Path) -> tuple[int, int]:
    """(manifest length, absolute start of the data section)."""
    _, _, length, _ = container.HEADER.unpack(path.read_bytes()[:container.HEADER.size])
    return length, -(-(container.HEADER.size + length) // 64) * 64


def test_round_trip_alignment_and_manifest(tmp_path):
    path = tmp_path / "weights.sparsec"
    tensors = write_sample(path)
    manifest = container.read_manifest(path)
    assert [e["name"] for e in manifest] == list(tensors)
    assert {e["name"]: e["format"] for e in manifest}["fc2.weight"] == "nm_rank"
    _, start = header(path)
    raw = path.read_bytes()
    assert raw[:8] == b"SPARSEC\0" and struct.unpack("<I", raw[8:12])[0] == 1
    for e in manifest:
        assert (start + e["offset"]) % 64 == 0
        assert set(e) == {"name", "shape", "dtype", "format", "params", "offset", "length", "checksum"}
        payload = raw[start + e["offset"]:start + e["offset"] + e["length"]]
        assert e["checksum"] == f"crc32:{zlib.crc32(payload):08x}"
    out = container.read_container(path)
    assert list(out) == list(tensors)
    for name, a in tensors.items():
        assert out[name].dtype == a.dtype and out[name].shape == a.shape
        np.testing.assert_array_equal(bits(out[name]), bits(a))
        assert type(out[name]) is np.ndarray and out[name].flags.writeable
    part = container.read_container(path, names=["scalar", "fc2.weight"])
    assert list(part) == ["scalar", "fc2.weight"]
    enc = container.read_encoded(path, "fc2.weight")
    assert enc == codec.choose(tensors["fc2.weight"], nm=(2, 4, 1))
    with pytest.raises(SparsecError, match="no tensor named 'nope'"):
        container.read_container(path, names=["nope"])


def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    path = tmp_path / "weights.sparsec"
    write_sample(path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        container.write_container(path, {"x": codec.encode(np.ones(3, np.float32), "dense")})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["weights.sparsec"]
    monkeypatch.undo()
    container.write_container(path, {"x": codec.encode(np.ones(3, np.float32), "dense")})
    assert list(container.read_container(path)) == ["x"]
    assert os.listdir(tmp_path) == ["weights.sparsec"]


def corrupt(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_bad_magic_and_unknown_version(tmp_path):
    path = tmp_path / "weights.sparsec"
    write_sample(path)
    corrupt(path, 0, b"PK")
    with pytest.raises(SparsecError, match=r"^not a sparsec container: .*weights\.sparsec"):
        container.read_container(path)
    write_sample(path)
    corrupt(path, 8, struct.pack("<I", 7))
    with pytest.raises(SparsecError, match="unsupported sparsec container version 7 .*reads version 1"):
        container.read_manifest(path)
    empty = tmp_path / "empty.sparsec"
    empty.write_bytes(b"")
    with pytest.raises(SparsecError, match="not a sparsec container"):
        container.read_container(empty)


def test_truncation_names_the_tensor(tmp_path):
    path = tmp_path / "weights.sparsec"
    write_sample(path)
    raw = path.read_bytes()
    _, start = header(path)
    entry = max(container.read_manifest(path), key=lambda e: e["offset"] + e["length"])
    path.write_bytes(raw[:start + entry["offset"] + entry["length"] - 1])
    lo, hi = start + entry["offset"], start + entry["offset"] + entry["length"]
    with pytest.raises(SparsecError, match=rf"container truncated: tensor '{entry['name']}' needs bytes "
                                           rf"{lo}\.\.{hi}, file has {hi - 1}"):
        container.read_container(path)
    assert container.read_container(path, names=["fc1.weight"])  # earlier tensors still read
    path.write_bytes(raw[:40])
    with pytest.raises(SparsecError, match="container truncated: the manifest needs bytes"):
        container.read_manifest(path)
    path.write_bytes(raw[:15])
    with pytest.raises(SparsecError, match="container truncated: the header needs 24 bytes, file has 15"):
        container.read_manifest(path)


def test_flipped_payload_byte_is_a_checksum_error_naming_the_tensor(tmp_path):
    path = tmp_path / "weights.sparsec"
    tensors = write_sample(path)
    _, start = header(path)
    entry = {e["name"]: e for e in container.read_manifest(path)}["fc1.weight"]
    raw = path.read_bytes()
    corrupt(path, start + entry["offset"] + 5, bytes([raw[start + entry["offset"] + 5] ^ 0x10]))
    with pytest.raises(SparsecError, match="checksum mismatch for tensor 'fc1.weight'"):
        container.read_container(path)
    with pytest.raises(SparsecError, match="checksum mismatch for tensor 'fc1.weight'"):
        container.read_encoded(path, "fc1.weight")
    out = container.read_container(path, names=["fc2.weight"])  # the others are intact
    np.testing.assert_array_equal(bits(out["fc2.weight"]), bits(tensors["fc2.weight"]))
    got = container.read_container(path, names=["fc1.weight"], verify=False)["fc1.weight"]
    assert (bits(got) != bits(tensors["fc1.weight"])).sum() == 1


def test_manifest_corruption_is_reported(tmp_path):
    path = tmp_path / "weights.sparsec"
    write_sample(path)
    length, _ = header(path)
    corrupt(path, container.HEADER.size + 3, b"#")
    with pytest.raises(SparsecError, match="corrupt manifest .*checksum mismatch"):
        container.read_manifest(path)
    # a manifest that is checksummed but not JSON, or JSON of the wrong shape
    for text in (b"{not json", json.dumps({"tensors": [{"name": "x"}]}).encode(), b"[1, 2]"):
        write_manifest(path, text)
        with pytest.raises(SparsecError, match="corrupt manifest"):
            container.read_manifest(path)


def write_manifest(path: Path, text: bytes) -> None:
    head = container.HEADER.pack(container.MAGIC, container.VERSION, len(text), zlib.crc32(text))
    path.write_bytes(head + text + bytes(64))


def test_payload_that_does_not_fit_its_parameters_is_reported(tmp_path):
    path = tmp_path / "weights.sparsec"
    enc = codec.encode(np.arange(8, dtype=np.float32), "dense")
    bad = codec.Encoded("dense", (9,), "float32", {}, enc.payload)
    container.write_container(path, {"w": bad})
    with pytest.raises(SparsecError, match="cannot decode tensor 'w' .*payload is 32 bytes"):
        container.read_container(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_single_byte_flip_is_caught_or_harmless(tmp_path, data):
    path = tmp_path / "flip.sparsec"
    tensors = sample_tensors()
    del tensors["embed.sparse"]
    encoded = {n: codec.choose(a) for n, a in tensors.items()}
    container.write_container(path, encoded)
    raw = bytearray(path.read_bytes())
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    path.write_bytes(bytes(raw))
    try:
        out = container.read_container(path)
    except SparsecError as e:
        assert "\n" not in str(e)
        return
    assert list(out) == list(tensors)  # the flip hit padding
    for name, a in tensors.items():
        np.testing.assert_array_equal(bits(out[name]), bits(a))
