"""Calibration samples for `sparsec compile --calib`: loaded, validated and batched as a stream.

A *sample* is one array per graph input with the input's full rank (its batch dim is normally 1). Sources:
a `.npz` file or a directory of `<input>.npy` files (samples along the model's dynamic batch axis: rank r, as
exporters and datasets write them; or on an extra leading sample axis: rank r+1, needed when the batch dim is
fixed), a directory of per-sample `.npz` files in sorted filename order (rank r, or r+1 with a leading axis of
1; zero-pad numbers), a reader with `get_next()` (onnxruntime's CalibrationDataReader: each row of a feed's
batch dim is a sample; a feed of rank r+1 has its samples on the leading axis), or random draws (floats
N(0,1) or uniform in a --calib-range, ints uniform in [lo, hi), default [0, 2)).
Batches stack samples along dim 0 when every input's dim 0 is symbolic (otherwise one sample per batch);
consecutive samples of different shapes go into separate, smaller batches instead of failing.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from sparsec.core.shapes import static_dim
from sparsec.errors import SparsecError

Chunk = dict[str, np.ndarray]  # input name -> samples stacked on a new leading axis
Chunks = Iterator[tuple[Chunk, str | dict[str, str]]]  # with the file (per input) for error messages
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError)


@dataclass(frozen=True)
class InputSpec:
    """One graph input: what every calibration array for it must look like."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """Graph inputs that need data (initializers excluded), with numpy dtypes; symbolic dims as str/None."""
    inits, specs = {t.name for t in model.graph.initializer}, []
    for vi in (v for v in model.graph.input if v.name not in inits):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
            raise SparsecError(f"input {vi.name} has no tensor shape in the model; calibration needs it")
        dims = tuple(d.dim_param or None if static_dim(d) is None else d.dim_value for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)), dims))
    return specs


def parse_ranges(items: Iterable[str]) -> dict[str, tuple[float, float]]:
    """`NAME=lo,hi` items (--calib-range) into a dict, with an error naming the bad item."""
    ranges: dict[str, tuple[float, float]] = {}
    for item in items:
        name, sep, rest = item.partition("=")
        try:
            lo, hi = (float(v) for v in rest.split(","))
        except ValueError:
            lo = hi = math.nan
        if not (name and sep and math.isfinite(lo) and math.isfinite(hi)):
            raise SparsecError(f"--calib-range {item!r} is not NAME=lo,hi", "e.g. --calib-range ids=0,30522")
        if lo >= hi:
            raise SparsecError(f"--calib-range {item!r}: lo must be below hi", "hi is exclusive")
        ranges[name] = (lo, hi)
    return ranges


def _check_names(specs: list[InputSpec], names: Iterable[str], where: str) -> None:
    want, have = [s.name for s in specs], set(names)
    hint = f"inputs: {', '.join(want)}"
    if missing := [n for n in want if n not in have]:
        raise SparsecError(f"{where} has no data for input {', '.join(missing)}", hint)
    if extra := sorted(have - set(want)):
        raise SparsecError(f"{where} has {', '.join(extra)}, not a graph input", hint)


def _check_array(spec: InputSpec, shape: tuple, dtype: object, where: str, lead: int, note: str = "") -> None:
    """Rank, dtype and fixed dims of one array that has `lead` extra leading (sample) axes."""
    if len(shape) != len(spec.shape) + lead:
        model = "[" + ", ".join(str(d) for d in spec.shape) + "]" + (" plus a sample axis" if lead else "")
        raise SparsecError(f"{spec.name} in {where} has rank {len(shape)}, expected "
                           f"{len(spec.shape) + lead}{note} for model shape {model}")
    if np.dtype(dtype).newbyteorder("=") != spec.dtype:
        want = spec.dtype.name
        raise SparsecError(f"{spec.name} in {where} is {np.dtype(dtype).name}, the model wants {want}",
                           f"convert with .astype(np.{want})")
    for i, want in enumerate(spec.shape):
        if isinstance(want, int) and shape[i + lead] != want:
            raise SparsecError(f"dim {i} of {spec.name} in {where} is {shape[i + lead]}, "
                               f"the model fixes it at {want}")


def _check_samples(spec: InputSpec, shape: tuple, dtype: object, where: str) -> int:
    """Validate an array of several samples; returns its lead: 0 when the samples run along the model's
    dynamic batch axis (rank r), 1 when they sit on their own leading axis (rank r+1)."""
    dynamic = bool(spec.shape) and not isinstance(spec.shape[0], int)
    if dynamic and len(shape) == len(spec.shape):
        _check_array(spec, shape, dtype, where, lead=0)
        return 0
    note = f" (samples on a leading axis) or {len(spec.shape)} (samples along the batch axis)" if dynamic \
        else ""
    _check_array(spec, shape, dtype, where, lead=1, note=note)
    return 1


def _same_count(counts: dict[str, int], where: str) -> int:
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k} has {v}" for k, v in counts.items())
        raise SparsecError(f"inputs in {where} have different sample counts: {listed}")
    return next(iter(counts.values()))


def _check_finite(chunk: Chunk, files: str | dict[str, str], start: int) -> None:
    """NaN/Inf in float data, naming the input, the file and the first bad sample index."""
    for name, arr in chunk.items():
        if len(arr) and (arr.dtype.kind == "f" or "float" in arr.dtype.name):
            ok = np.isfinite(arr.astype(np.float32, copy=False)).reshape(len(arr), -1).all(axis=1)
            if not ok.all():
                where = files if isinstance(files, str) else files[name]
                raise SparsecError(f"{name} in {where} has NaN or Inf at sample {start + int(np.argmin(ok))}")


@dataclass
class _Source:
    label: str
    count: int
    chunks: Callable[[int], Chunks]  # hint: samples per chunk (a suggestion)
    checked: bool = False  # already scanned for NaN/Inf


def _header(fh) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fh)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f".npy format {version} is not supported")
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(fh)


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], bool, np.dtype]]:
    """Shape, Fortran order and dtype of every array in a .npz, reading headers only."""
    try:
        with zipfile.ZipFile(path) as zf:
            heads = {}
            for member in zf.namelist():
                with zf.open(member) as fh:
                    heads[member.removesuffix(".npy")] = _header(fh)
            return heads
    except _READ_ERRORS as exc:
        raise SparsecError(f"cannot read {path}: {exc}", "expected a .npz written by numpy.savez") from None


def _member_rows(zf: zipfile.ZipFile, spec: InputSpec, total: int, hint: int) -> Iterator[np.ndarray]:
    """Consecutive row blocks of one .npz member, read in order: the whole array only if Fortran-order."""
    with zf.open(spec.name + ".npy") as fh:
        shape, fortran, dtype = _header(fh)
        if fortran:  # rows are not contiguous: the only case read whole
            with zf.open(spec.name + ".npy") as again:
                whole = np.lib.format.read_array(again)
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, total, hint):
            n = min(hint, total - start)
            if fortran:
                yield whole[start:start + n].astype(spec.dtype)
                continue
            if len(data := fh.read(n * row)) != n * row:
                raise EOFError(f"{spec.name} is truncated")
            yield np.frombuffer(data, dtype).reshape(n, *shape[1:]).astype(spec.dtype, copy=False)


def _open_npz(specs: list[InputSpec], path: Path) -> _Source:
    heads = _npz_headers(path)
    _check_names(specs, heads, str(path))
    lead = {s.name: _check_samples(s, heads[s.name][0], heads[s.name][2], str(path)) for s in specs}
    count = _same_count({s.name: heads[s.name][0][0] for s in specs}, str(path))

    def chunks(hint: int) -> Chunks:
        try:
            with zipfile.ZipFile(path) as zf:
                for arrays in zip(*[_member_rows(zf, s, count, hint) for s in specs], strict=True):
                    pairs = zip(specs, arrays, strict=True)
                    yield {s.name: _on_sample_axis(a, lead[s.name]) for s, a in pairs}, str(path)
        except _READ_ERRORS as exc:
            raise SparsecError(f"cannot read {path}: {exc}", "is the file complete?") from None
    return _Source(str(path), count, chunks)


def _open_npy_dir(specs: list[InputSpec], path: Path, found: list[Path]) -> _Source:
    by_name = {f.stem: f for f in found}
    _check_names(specs, by_name, str(path))
    files = {s.name: str(by_name[s.name]) for s in specs}
    arrays, lead = {}, {}
    for s in specs:
        try:
            arrays[s.name] = np.load(by_name[s.name], mmap_mode="r")  # memory-mapped: streamed, not loaded
        except _READ_ERRORS as exc:
            raise SparsecError(f"cannot read {files[s.name]}: {exc}") from None
        lead[s.name] = _check_samples(s, arrays[s.name].shape, arrays[s.name].dtype, files[s.name])
    count = _same_count({k: a.shape[0] for k, a in arrays.items()}, str(path))

    def chunks(hint: int) -> Chunks:
        for start in range(0, count, hint):
            rows = {s.name: np.array(arrays[s.name][start:start + hint], s.dtype) for s in specs}
            yield {k: _on_sample_axis(a, lead[k]) for k, a in rows.items()}, files
    return _Source(f"{path} (one .npy per input)", count, chunks)


def _on_sample_axis(rows: np.ndarray, lead: int) -> np.ndarray:
    """Samples taken along the batch axis (lead 0) become samples of batch 1 on a leading axis."""
    return rows if lead else rows[:, None]


def _open_sample_dir(specs: list[InputSpec], path: Path, found: list[Path]) -> _Source:
    for f in found:
        heads = _npz_headers(f)
        _check_names(specs, heads, str(f))
        for s in specs:
            shape, _, dtype = heads[s.name]
            lead = 1 if len(shape) == len(s.shape) + 1 and shape[0] == 1 else 0
            _check_array(s, shape, dtype, str(f), lead, f" (or {len(s.shape) + 1} with a leading 1)")

    def chunks(hint: int) -> Chunks:
        for f in found:
            try:
                with np.load(f) as z:
                    arrays = {s.name: np.asarray(z[s.name], s.dtype) for s in specs}
            except _READ_ERRORS as exc:
                raise SparsecError(f"cannot read {f}: {exc}") from None
            yield {s.name: arrays[s.name][None] if arrays[s.name].ndim == len(s.shape) else arrays[s.name]
                   for s in specs}, str(f)
    return _Source(f"{path} ({len(found)} .npz samples)", len(found), chunks)


def _reader_feeds(specs: list[InputSpec], reader: object, batchable: bool) -> Chunks:
    """Validated feeds as chunks: each row of the batch dim is a sample (the whole feed if not batchable)."""
    index = 0
    while (feed := reader.get_next()) is not None:
        where = f"reader feed {index}"
        if not isinstance(feed, dict):
            raise SparsecError(f"{where} is a {type(feed).__name__}, not a dict of input name -> array")
        _check_names(specs, feed, where)
        chunk = {s.name: np.asarray(feed[s.name]) for s in specs}
        for s in specs:  # rank r+1: samples on a leading axis; rank r: one feed of the model
            lead = len(chunk[s.name].shape) == len(s.shape) + 1
            _check_array(s, chunk[s.name].shape, chunk[s.name].dtype, where, lead=int(lead),
                         note="" if lead else f" (or {len(s.shape) + 1} with samples on a leading axis)")
            if not lead:
                chunk[s.name] = chunk[s.name][:, None] if batchable else chunk[s.name][None]
        _same_count({k: len(a) for k, a in chunk.items()}, where)
        yield chunk, where
        index += 1


def _open_reader(specs: list[InputSpec], reader: object, limit: int | None, batchable: bool) -> _Source:
    """Readers cannot rewind, so without rewind() every feed is kept in memory for the later passes."""
    if not callable(getattr(reader, "get_next", None)):
        raise SparsecError("the calibration reader has no get_next() method",
                           "pass an onnxruntime CalibrationDataReader or a similar object")
    rewind = getattr(reader, "rewind", None)
    stored: list[tuple[Chunk, str | dict[str, str]]] = []
    count = 0
    for chunk, where in _reader_feeds(specs, reader, batchable):
        _check_finite(chunk, where, count)
        count += len(next(iter(chunk.values())))
        if not callable(rewind):
            stored.append((chunk, where))
        if limit is not None and count >= limit:
            break

    def chunks(hint: int) -> Chunks:
        if not callable(rewind):
            yield from stored
        else:
            rewind()
            yield from _reader_feeds(specs, reader, batchable)
    return _Source("reader", count, chunks, checked=True)


def _open_random(specs: list[InputSpec], n: int, ranges: dict, shapes: dict, seed: int) -> _Source:
    """Sample i always comes from the seed [seed, i], whatever the batch size or --calib-samples."""
    if n < 1:
        raise SparsecError(f"--calib-random {n} must be at least 1")
    check_ranges(specs, ranges)
    plan = [(s, _random_shape(s, shapes.get(s.name)), _random_range(s, ranges.get(s.name))) for s in specs]

    def sample(i: int) -> Chunk:
        rng, out = np.random.default_rng([seed, i]), {}
        for s, shape, (lo, hi) in plan:
            if s.dtype.kind in "biu":
                out[s.name] = rng.integers(int(lo), int(hi), shape).astype(s.dtype)
            else:
                out[s.name] = (rng.standard_normal(shape) if lo is None else rng.uniform(lo, hi, shape))
                out[s.name] = out[s.name].astype(s.dtype)
        return out

    def chunks(hint: int) -> Chunks:
        for start in range(0, n, hint):
            drawn = [sample(i) for i in range(start, min(start + hint, n))]
            yield {s.name: np.stack([d[s.name] for d in drawn]) for s in specs}, "random"
    return _Source(f"random({n})", n, chunks, checked=True)


def _random_shape(spec: InputSpec, given: tuple[int, ...] | None) -> tuple[int, ...]:
    """One sample's shape: fixed dims, 1 for a leading symbolic (batch) dim, the rest from --shape."""
    if given is not None and len(given) != len(spec.shape):
        raise SparsecError(f"--shape {spec.name} has {len(given)} dims, the input has {len(spec.shape)}")
    out = []
    for i, d in enumerate(spec.shape):
        if given is None and i > 0 and not isinstance(d, int):
            raise SparsecError(f"--calib-random needs --shape for input {spec.name} "
                               f"(dim {repr(d) if d else i} is symbolic)", f"e.g. --shape {spec.name}=1,...")
        out.append(d if isinstance(d, int) else 1 if i == 0 else given[i])
    return tuple(out)


def check_ranges(specs: list[InputSpec], ranges: dict[str, tuple[float, float]]) -> None:
    """--calib-range names graph inputs and fits their dtypes (random calibration and random verification)."""
    if unknown := sorted(set(ranges) - {s.name for s in specs}):
        raise SparsecError(f"--calib-range names {', '.join(unknown)}, not a graph input",
                           f"inputs: {', '.join(s.name for s in specs)}")
    for spec in specs:
        if spec.name in ranges:
            _random_range(spec, ranges[spec.name])


def _random_range(spec: InputSpec, given: tuple[float, float] | None) -> tuple:
    if spec.dtype.kind in "biu":
        lo, hi = given or (0, 2)
        info = (0, 1) if spec.dtype.kind == "b" else (np.iinfo(spec.dtype).min, np.iinfo(spec.dtype).max)
        if lo != int(lo) or hi != int(hi) or lo < info[0] or hi - 1 > info[1]:
            raise SparsecError(f"--calib-range {spec.name}={lo:g},{hi:g} needs whole numbers that fit "
                               f"{spec.dtype.name}")
        return lo, hi
    if spec.dtype.kind != "f" and "float" not in spec.dtype.name:
        raise SparsecError(f"input {spec.name} is {spec.dtype.name}, which --calib-random cannot draw")
    return given or (None, None)


def _regroup(chunks: Iterator[Chunk], size: int, batchable: bool) -> Iterator[tuple[int, Chunk]]:
    """Up to `size` samples per batch; a change of sample shape closes the batch early."""
    pending: list[Chunk] = []
    count, key = 0, None
    for chunk in chunks:
        shape_key = tuple(a.shape[2:] if batchable else a.shape[1:] for a in chunk.values())
        if pending and shape_key != key:
            yield count, _merge(pending, batchable)
            pending, count = [], 0
        key, start, n = shape_key, 0, len(next(iter(chunk.values())))
        while start < n:
            take = min(size - count, n - start)
            pending.append({k: a[start:start + take] for k, a in chunk.items()})
            count, start = count + take, start + take
            if count == size:
                yield count, _merge(pending, batchable)
                pending, count = [], 0
    if pending:
        yield count, _merge(pending, batchable)


def _merge(pieces: list[Chunk], batchable: bool) -> Chunk:
    """Fold the sample axis into the model's batch axis (dim 0), or drop it for a single sample."""
    if not batchable:
        return {k: np.asarray(a[0]) for k, a in pieces[0].items()}  # a rank-0 input stays an array
    folded = [{k: a.reshape(a.shape[0] * a.shape[1], *a.shape[2:]) for k, a in p.items()} for p in pieces]
    return folded[0] if len(folded) == 1 else {k: np.concatenate([p[k] for p in folded]) for k in folded[0]}


class CalibrationData:
    """Validated calibration samples, served in batches (streamed: never all in memory when avoidable)."""

    def __init__(self, source: _Source, num_samples: int, batchable: bool) -> None:
        self._source, self._batchable = source, batchable
        self._checked = source.checked  # NaN/Inf: scanned as batches stream, until one full clean pass
        self.num_samples: int = num_samples
        self.source: str = source.label

    def head(self, n: int) -> CalibrationData:
        """The first n samples (all when there are fewer): verification runs on these."""
        return CalibrationData(self._source, min(n, self.num_samples), self._batchable)

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of up to batch_size samples (axis 0); every pass yields identical data."""
        for _, batch in self.sized_batches(batch_size):
            yield batch

    def sized_batches(self, batch_size: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(samples in the batch, feed) pairs: for progress bars and sample-weighted statistics."""
        if batch_size < 1:
            raise SparsecError(f"--batch {batch_size} must be at least 1")
        size = batch_size if self._batchable else 1
        yield from _regroup(self._samples(size), size, self._batchable)
        self._checked = True

    def _samples(self, hint: int) -> Iterator[Chunk]:
        done = 0
        for chunk, files in self._source.chunks(hint):
            take = min(len(next(iter(chunk.values()))), self.num_samples - done)
            chunk = {k: a[:take] for k, a in chunk.items()}
            if not self._checked:
                _check_finite(chunk, files, done)
            yield chunk
            if (done := done + take) >= self.num_samples:
                return


def open_calibration(
    specs: list[InputSpec], *, path: str | Path | None = None, reader: object | None = None,
    random_samples: int | None = None, ranges: dict[str, tuple[float, float]] | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None, samples: int | None = None, seed: int = 0,
) -> CalibrationData:
    """Open and validate one calibration source (--calib PATH, --calib-random N, or a reader object)."""
    if sum(x is not None for x in (path, reader, random_samples)) != 1:
        raise SparsecError("give exactly one calibration source",
                           "--calib FILE.npz|DIR or --calib-random N (or a reader in the Python API)")
    if not specs:
        raise SparsecError("the model has no graph inputs to calibrate")
    if samples is not None and samples < 1:
        raise SparsecError(f"--calib-samples {samples} must be at least 1")
    batchable = all(s.shape and not isinstance(s.shape[0], int) for s in specs)
    if path is not None:
        source = _open_path(specs, Path(path))
    elif reader is not None:
        source = _open_reader(specs, reader, samples, batchable)
    else:
        source = _open_random(specs, random_samples, ranges or {}, shapes or {}, seed)
    if source.count == 0:
        raise SparsecError(f"calibration data in {source.label} is empty (0 samples)")
    if samples is not None and samples > source.count:
        raise SparsecError(f"calibration data has {source.count} samples, --calib-samples asks for {samples}")
    return CalibrationData(source, samples or source.count, batchable)


def _open_path(specs: list[InputSpec], path: Path) -> _Source:
    if path.is_file():
        return _open_npz(specs, path)
    if not path.is_dir():
        raise SparsecError(f"--calib {path} is not a file or directory")
    npy, npz = sorted(path.glob("*.npy")), sorted(path.glob("*.npz"))
    if npy and npz:
        raise SparsecError(f"--calib {path} mixes .npy and .npz", "one .npy per input or one .npz per sample")
    if not npy and not npz:
        raise SparsecError(f"--calib {path} has no .npy or .npz files")
    return _open_npy_dir(specs, path, npy) if npy else _open_sample_dir(specs, path, npz)
