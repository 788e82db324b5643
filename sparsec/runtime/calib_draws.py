"""Calibration without files: a reader object (onnxruntime's CalibrationDataReader) or random draws
(floats N(0,1) or uniform in a --calib-range, ints uniform in [lo, hi), default [0, 2))."""

from __future__ import annotations

import numpy as np

from sparsec.errors import SparsecError
from sparsec.runtime.calib_checks import (
    Chunk,
    Chunks,
    InputSpec,
    Source,
    check_array,
    check_finite,
    check_names,
    same_count,
)


def _reader_feeds(specs: list[InputSpec], reader: object, batchable: bool) -> Chunks:
    """Validated feeds as chunks: each row of the batch dim is a sample (the whole feed if not batchable)."""
    index = 0
    while (feed := reader.get_next()) is not None:
        where = f"reader feed {index}"
        if not isinstance(feed, dict):
            raise SparsecError(f"{where} is a {type(feed).__name__}, not a dict of input name -> array")
        check_names(specs, feed, where)
        chunk = {s.name: np.asarray(feed[s.name]) for s in specs}
        for s in specs:  # rank r+1: samples on a leading axis; rank r: one feed of the model
            lead = len(chunk[s.name].shape) == len(s.shape) + 1
            check_array(s, chunk[s.name].shape, chunk[s.name].dtype, where, lead=int(lead),
                         note="" if lead else f" (or {len(s.shape) + 1} with samples on a leading axis)")
            if not lead:
                chunk[s.name] = chunk[s.name][:, None] if batchable else chunk[s.name][None]
        same_count({k: len(a) for k, a in chunk.items()}, where)
        yield chunk, where
        index += 1


def open_reader(specs: list[InputSpec], reader: object, limit: int | None, batchable: bool) -> Source:
    """Readers cannot rewind, so without rewind() every feed is kept in memory for the later passes."""
    if not callable(getattr(reader, "get_next", None)):
        raise SparsecError("the calibration reader has no get_next() method",
                           "pass an onnxruntime CalibrationDataReader or a similar object")
    rewind = getattr(reader, "rewind", None)
    stored: list[tuple[Chunk, str | dict[str, str]]] = []
    count = 0
    for chunk, where in _reader_feeds(specs, reader, batchable):
        check_finite(chunk, where, count)
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
    return Source("reader", count, chunks, checked=True)


def open_random(specs: list[InputSpec], n: int, ranges: dict, shapes: dict, seed: int) -> Source:
    """Sample i always comes from the seed [seed, i], whatever the batch size or --calib-samples
    (``n`` and the names in ``ranges`` are checked by the caller: calib_data.open_calibration)."""
    plan = [(s, _random_shape(s, shapes.get(s.name)), random_range(s, ranges.get(s.name))) for s in specs]

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
    return Source(f"random({n})", n, chunks, checked=True)


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


def random_range(spec: InputSpec, given: tuple[float, float] | None) -> tuple:
    """The [lo, hi) an input is drawn from ((None, None): standard normal), checked against its dtype."""
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
