"""Calibration samples for `sparsec compile --calib`: loaded, validated and batched as a stream.

A *sample* is one array per graph input with the input's full rank (its batch dim is normally 1). Sources
(read in calib_files.py and calib_draws.py, validated by calib_checks.py): a `.npz` file or a directory of
`<input>.npy` files (samples along the model's dynamic batch axis: rank r, as exporters and datasets write
them; or on an extra leading sample axis: rank r+1, needed when the batch dim is fixed), a directory of
per-sample `.npz` files in sorted filename order (rank r, or r+1 with a leading axis of 1; zero-pad
numbers), a reader with `get_next()` (onnxruntime's CalibrationDataReader: each row of a feed's batch dim
is a sample; a feed of rank r+1 has its samples on the leading axis), or random draws (floats N(0,1) or
uniform in a --calib-range, ints uniform in [lo, hi), default [0, 2)).
Batches stack samples along dim 0 when every input's dim 0 is symbolic (otherwise one sample per batch);
consecutive samples of different shapes go into separate, smaller batches instead of failing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx

from sparsec.core.shapes import static_dim
from sparsec.errors import SparsecError
from sparsec.runtime.calib_checks import Chunk, InputSpec, Source, check_finite
from sparsec.runtime.calib_draws import open_random, open_reader, random_range
from sparsec.runtime.calib_files import open_path, path_names
from sparsec.runtime.kv_cache import plan_cache_fill


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


def check_ranges(specs: list[InputSpec], ranges: dict[str, tuple[float, float]]) -> None:
    """--calib-range names graph inputs and fits their dtypes (random calibration and random verification)."""
    if unknown := sorted(set(ranges) - {s.name for s in specs}):
        raise SparsecError(f"--calib-range names {', '.join(unknown)}, not a graph input",
                           f"inputs: {', '.join(s.name for s in specs)}")
    for spec in specs:
        if spec.name in ranges:
            random_range(spec, ranges[spec.name])


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

    def __init__(self, source: Source, num_samples: int, batchable: bool) -> None:
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
                check_finite(chunk, files, done)
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
    fill = plan_cache_fill(specs)  # a decoder: the data may leave out its cache, mask and positions
    given = {s.name for s in specs}
    if fill is not None and reader is None:  # a reader's feeds are filled one by one instead
        given -= fill.names - (path_names(Path(path)) if path is not None else set())
    wanted = [s for s in specs if s.name in given]
    if path is not None:
        source = open_path(wanted, Path(path))
    elif reader is not None:
        source = open_reader(specs, fill.reader(reader) if fill else reader, samples, batchable)
    else:
        if random_samples < 1:
            raise SparsecError(f"--calib-random {random_samples} must be at least 1")
        check_ranges(specs, ranges or {})
        source = open_random(wanted, random_samples, ranges or {}, shapes or {}, seed)
    if fill is not None:
        source = fill.source(source, given)
    if source.count == 0:
        raise SparsecError(f"calibration data in {source.label} is empty (0 samples)")
    if samples is not None and samples > source.count:
        raise SparsecError(f"calibration data has {source.count} samples, --calib-samples asks for {samples}")
    return CalibrationData(source, samples or source.count, batchable)
