"""Calibration data: every source batches back exactly what was given, and every bad input is one line."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from sparsec.errors import SparsecError
from sparsec.runtime.calib_data import input_specs, open_calibration, parse_ranges
from sparsec.runtime.progress import Progress


def _model(inputs: list[tuple[str, int, list]]) -> onnx.ModelProto:
    """Identity per input, plus an unused initializer that must not count as an input."""
    vis = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    outs = [helper.make_tensor_value_info(n + "_out", t, s) for n, t, s in inputs]
    nodes = [helper.make_node("Identity", [n], [n + "_out"]) for n, _, _ in inputs]
    w = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph(nodes, "g", vis + [helper.make_tensor_value_info("w", TensorProto.FLOAT, [1])],
                              outs, [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


FLOAT = input_specs(_model([("x", TensorProto.FLOAT, ["N", 4])]))
TOKENS = input_specs(_model([("x", TensorProto.FLOAT, ["N", 4]), ("ids", TensorProto.INT64, ["N", "seq"])]))
FIXED = input_specs(_model([("pixel_values", TensorProto.FLOAT, [1, 28])]))


def _x(n: int) -> np.ndarray:
    return np.arange(n * 4, dtype=np.float32).reshape(n, 1, 4)


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(SparsecError) as info:
        data = fn(*args, **kwargs)
        for _ in data.batches(4):
            pass
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def _collect(data, size: int) -> list[dict[str, np.ndarray]]:
    return list(data.batches(size))


def test_input_specs_skip_initializers_and_keep_symbolic_dims():
    assert [(s.name, s.dtype, s.shape) for s in TOKENS] == [
        ("x", np.dtype(np.float32), ("N", 4)), ("ids", np.dtype(np.int64), ("N", "seq"))]


def test_parse_ranges():
    assert parse_ranges(["ids=0,100", "x=-1.5,2"]) == {"ids": (0.0, 100.0), "x": (-1.5, 2.0)}
    for bad in ("ids", "ids=1", "=0,1", "ids=a,b", "ids=0,1,2", "ids=0,inf"):
        assert repr(bad) in _error(parse_ranges, [bad])
    assert "lo must be below hi" in _error(parse_ranges, ["ids=5,5"])


def test_npz_file_batches_equal_source_over_several_passes(tmp_path):
    x = _x(7)
    np.savez_compressed(tmp_path / "calib.npz", x=x)
    data = open_calibration(FLOAT, path=tmp_path / "calib.npz")
    assert (data.num_samples, data.source) == (7, str(tmp_path / "calib.npz"))
    first = _collect(data, 3)
    assert [b["x"].shape for b in first] == [(3, 4), (3, 4), (1, 4)]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in first]), x[:, 0])
    second = _collect(data, 3)
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(first, second, strict=True))
    assert [n for n, _ in data.sized_batches(5)] == [5, 2]


def test_npy_dir_two_inputs_memory_mapped(tmp_path):
    x, ids = _x(5), np.arange(5 * 6).reshape(5, 1, 6).astype(np.int64)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "ids.npy", ids)
    data = open_calibration(TOKENS, path=tmp_path, samples=4)
    batches = _collect(data, 2)
    assert data.num_samples == 4 and "one .npy per input" in data.source
    np.testing.assert_array_equal(np.concatenate([b["ids"] for b in batches]), ids[:4, 0])
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x[:4, 0])


def test_per_sample_npz_dir_sorted_both_ranks_grouped_by_shape(tmp_path):
    lengths = [3, 3, 3, 5, 5, 3]
    for i, seq in enumerate(lengths):
        ids = np.full((1, seq), i, np.int64)
        x = np.full((1, 4), i, np.float32)
        # odd samples carry the optional leading axis of 1
        np.savez(tmp_path / f"s{i:02d}.npz", x=x[None] if i % 2 else x, ids=ids[None] if i % 2 else ids)
    data = open_calibration(TOKENS, path=tmp_path)
    assert data.num_samples == 6
    batches = list(data.sized_batches(2))
    assert [(n, b["ids"].shape) for n, b in batches] == [(2, (2, 3)), (1, (1, 3)), (2, (2, 5)), (1, (1, 3))]
    assert np.concatenate([b["x"][:, 0] for _, b in batches]).tolist() == list(range(6))


class _Reader:
    """Shaped like onnxruntime's CalibrationDataReader: feeds with a batch dim, then None."""

    def __init__(self, feeds):
        self.feeds, self.pos, self.calls = feeds, 0, 0

    def get_next(self):
        self.calls += 1
        self.pos += 1
        return self.feeds[self.pos - 1] if self.pos <= len(self.feeds) else None


class _RewindReader(_Reader):
    def rewind(self):
        self.pos = 0


@pytest.mark.parametrize("cls", [_Reader, _RewindReader])
def test_reader_samples_are_rows_and_passes_repeat(cls):
    feeds = [{"x": np.full((n, 4), i, np.float32)} for i, n in enumerate([2, 3, 1])]
    reader = cls(feeds)
    data = open_calibration(FLOAT, reader=reader)
    assert data.num_samples == 6 and data.source == "reader"
    calls = reader.calls
    one, two = _collect(data, 4), _collect(data, 4)
    assert [b["x"].shape[0] for b in one] == [4, 2]
    assert np.concatenate([b["x"][:, 0] for b in two]).tolist() == [0, 0, 1, 1, 1, 2]
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(one, two, strict=True))
    # without rewind() the reader is read once and kept; with it, each pass reads again
    assert (reader.calls == calls) == (cls is _Reader)


def test_random_is_deterministic_in_range_and_independent_of_batch_size():
    kwargs = dict(random_samples=10, ranges={"ids": (5, 9)}, shapes={"ids": (8, 7)})
    data = open_calibration(TOKENS, **kwargs)
    a = _collect(data, 4)
    assert data.source == "random(10)" and [b["ids"].shape for b in a] == [(4, 7), (4, 7), (2, 7)]
    ids = np.concatenate([b["ids"] for b in a])
    assert ids.dtype == np.int64 and ids.min() >= 5 and ids.max() <= 8 and len(np.unique(ids)) == 4
    b = np.concatenate([b["x"] for b in _collect(open_calibration(TOKENS, **kwargs), 3)])
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in a]), b)
    other = open_calibration(TOKENS, seed=1, **kwargs)
    assert not np.array_equal(np.concatenate([b["x"] for b in _collect(other, 10)]), b)
    flags = open_calibration(input_specs(_model([("m", TensorProto.BOOL, ["N", 3])])), random_samples=50)
    assert set(np.concatenate(_collect(flags, 50)[0]["m"]).tolist()) == {False, True}


def test_random_needs_shape_for_symbolic_dims():
    msg = _error(open_calibration, TOKENS, random_samples=4)
    assert "--calib-random needs --shape for input ids (dim 'seq' is symbolic)" in msg
    assert "not a graph input" in _error(open_calibration, TOKENS, random_samples=2, ranges={"nope": (0, 1)},
                                         shapes={"ids": (1, 2)})
    assert "whole numbers" in _error(open_calibration, TOKENS, random_samples=2, ranges={"ids": (0, 1.5)},
                                     shapes={"ids": (1, 2)})


def test_fixed_batch_dim_serves_one_sample_per_batch(tmp_path):
    np.savez(tmp_path / "c.npz", pixel_values=np.ones((3, 1, 28), np.float32))
    batches = _collect(open_calibration(FIXED, path=tmp_path / "c.npz"), 8)
    assert [b["pixel_values"].shape for b in batches] == [(1, 28)] * 3


def test_samples_truncation_and_too_few(tmp_path):
    np.savez(tmp_path / "c.npz", x=_x(10))
    data = open_calibration(FLOAT, path=tmp_path / "c.npz", samples=3)
    assert np.concatenate([b["x"] for b in _collect(data, 2)]).tolist() == _x(3)[:, 0].tolist()
    msg = _error(open_calibration, FLOAT, path=tmp_path / "c.npz", samples=64)
    assert msg == "calibration data has 10 samples, --calib-samples asks for 64"


def _npz(tmp_path, **arrays) -> str:
    np.savez(tmp_path / "bad.npz", **arrays)
    return str(tmp_path / "bad.npz")


def test_validation_errors_name_the_input_and_file(tmp_path):
    x = _x(4)
    cases = [
        (dict(ids=np.zeros((4, 1, 3), np.int64)), ["no data for input x", "bad.npz"], TOKENS),
        (dict(x=x, y=x), ["y, not a graph input", "bad.npz"], FLOAT),
        (dict(x=x[:, 0, 0]), ["x in", "rank 1, expected 3 (samples on a leading axis) or 2"], FLOAT),
        (dict(pixel_values=np.zeros((2, 28), np.float32)), ["pixel_values in", "rank 2, expected 3"], FIXED),
        (dict(x=x, ids=np.zeros((4, 1, 3), np.int32)),
         ["ids in", "is int32, the model wants int64", ".astype(np.int64)"], TOKENS),
        (dict(pixel_values=np.zeros((2, 1, 32), np.float32)),
         ["dim 1 of pixel_values in", "is 32, the model fixes it at 28"], FIXED),
        (dict(x=x, ids=np.zeros((3, 1, 3), np.int64)),
         ["different sample counts", "x has 4", "ids has 3"], TOKENS),
        (dict(x=x[:0]), ["empty (0 samples)"], FLOAT),
    ]
    for arrays, parts, specs in cases:
        msg = _error(open_calibration, specs, path=_npz(tmp_path, **arrays))
        assert all(p in msg for p in parts), (parts, msg)


def test_validation_errors_in_dirs_and_reader(tmp_path):
    np.savez(tmp_path / "s0.npz", x=np.zeros((2, 1, 4), np.float32))
    msg = _error(open_calibration, FLOAT, path=tmp_path)
    assert "x in" in msg and "s0.npz has rank 3, expected 2 (or 3 with a leading 1)" in msg
    (tmp_path / "s0.npz").unlink()
    np.save(tmp_path / "x.npy", np.zeros((3, 1, 4), np.float64))
    assert "x.npy is float64, the model wants float32" in _error(open_calibration, FLOAT, path=tmp_path)
    msg = _error(open_calibration, FIXED, reader=_Reader([{"pixel_values": np.zeros((1, 27), np.float32)}]))
    assert msg == "dim 1 of pixel_values in reader feed 0 is 27, the model fixes it at 28"


def test_batches_feed_onnxruntime(tmp_path):
    import onnxruntime as ort

    model = _model([("x", TensorProto.FLOAT, ["N", 4]), ("ids", TensorProto.INT64, ["N", "seq"])])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    data = open_calibration(TOKENS, random_samples=5, shapes={"ids": (1, 6)})
    for batch in data.batches(2):
        x_out, ids_out = session.run(None, batch)
        np.testing.assert_array_equal(x_out, batch["x"])
        assert ids_out.shape == (len(batch["x"]), 6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_found_while_streaming_with_sample_index(tmp_path, bad):
    x = _x(9)
    x[6, 0, 2] = bad
    data = open_calibration(FLOAT, path=_npz(tmp_path, x=x))  # opening reads headers only
    with pytest.raises(SparsecError, match=r"x in .*bad\.npz has NaN or Inf at sample 6$"):
        _collect(data, 4)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "bad.npz").unlink()
    assert "x.npy has NaN or Inf at sample 6" in _error(open_calibration, FLOAT, path=tmp_path)
    reader = _Reader([{"x": x[:5, 0]}, {"x": x[5:, 0]}])
    assert "x in reader feed 1 has NaN or Inf at sample 6" in _error(open_calibration, FLOAT, reader=reader)


def test_source_errors(tmp_path):
    assert "exactly one calibration source" in _error(open_calibration, FLOAT)
    assert "--calib-random" in _error(open_calibration, FLOAT, path=tmp_path, random_samples=3)
    assert "is not a file or directory" in _error(open_calibration, FLOAT, path=tmp_path / "nope")
    assert "has no .npy or .npz files" in _error(open_calibration, FLOAT, path=tmp_path)
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    assert "cannot read" in _error(open_calibration, FLOAT, path=tmp_path / "corrupt.npz")
    np.save(tmp_path / "x.npy", _x(2))
    assert "mixes .npy and .npz" in _error(open_calibration, FLOAT, path=tmp_path)
    assert "empty (0 samples)" in _error(open_calibration, FLOAT, reader=_Reader([]))
    assert "not a dict" in _error(open_calibration, FLOAT, reader=_Reader([[1, 2]]))
    assert "no get_next()" in _error(open_calibration, FLOAT, reader=object())
    msg = _error(open_calibration, TOKENS, reader=_Reader([{"x": 1}]))
    assert "reader feed 0 has no data for input ids" in msg


def test_truncated_npz_member_is_one_line(tmp_path):
    path = tmp_path / "t.npz"
    np.savez(path, x=_x(50))
    with zipfile.ZipFile(path) as zf:
        raw = zf.read("x.npy")
    with zipfile.ZipFile(path, "w") as zf:  # a valid zip whose array is shorter than its header says
        zf.writestr("x.npy", raw[: len(raw) // 2])
    assert "cannot read" in _error(open_calibration, FLOAT, path=path)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_rate_and_eta_only_when_enabled():
    out = io.StringIO()
    with Progress(10, "calibrating", enabled=True, stream=out) as bar:
        for _ in range(10):
            bar.update(1)
    text = out.getvalue()
    assert text.startswith("\rcalibrating [") and text.endswith("\n")
    assert "10/10 samples" in text and "samples/s" in text and "ETA" in text
    assert text.count("\r") <= 4  # throttled: start, final update, exit (and maybe one more)
    for bar_stream, enabled in ((io.StringIO(), False), (io.StringIO(), None)):
        with Progress(10, "calibrating", enabled=enabled, stream=bar_stream) as bar:
            bar.update(10)
        assert bar_stream.getvalue() == ""
    tty = _Tty()
    with Progress(4, "calibrating", stream=tty) as bar:
        bar.update(2)
    assert "\r" in tty.getvalue() and "2/4" in tty.getvalue()
