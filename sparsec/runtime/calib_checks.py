"""What calibration arrays must look like (one InputSpec per graph input) and the checks that say so.

Every calibration source (files, a reader, random draws) validates names, ranks, dtypes, fixed dims,
sample counts and NaN/Inf here, so each error names the input, the file and how to fix it.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from sparsec.errors import SparsecError

Chunk = dict[str, np.ndarray]  # input name -> samples stacked on a new leading axis
Chunks = Iterator[tuple[Chunk, str | dict[str, str]]]  # with the file (per input) for error messages
READ_ERRORS = (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError)


@dataclass(frozen=True)
class InputSpec:
    """One graph input: what every calibration array for it must look like."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


@dataclass
class Source:
    """One opened calibration source: its label, sample count and a chunk stream."""

    label: str
    count: int
    chunks: Callable[[int], Chunks]  # hint: samples per chunk (a suggestion)
    checked: bool = False  # already scanned for NaN/Inf


def check_names(specs: list[InputSpec], names: Iterable[str], where: str) -> None:
    """Every graph input has data and nothing else does."""
    want, have = [s.name for s in specs], set(names)
    hint = f"inputs: {', '.join(want)}"
    if missing := [n for n in want if n not in have]:
        raise SparsecError(f"{where} has no data for input {', '.join(missing)}", hint)
    if extra := sorted(have - set(want)):
        raise SparsecError(f"{where} has {', '.join(extra)}, not a graph input", hint)


def check_array(spec: InputSpec, shape: tuple, dtype: object, where: str, lead: int, note: str = "") -> None:
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


def check_samples(spec: InputSpec, shape: tuple, dtype: object, where: str) -> int:
    """Validate an array of several samples; returns its lead: 0 when the samples run along the model's
    dynamic batch axis (rank r), 1 when they sit on their own leading axis (rank r+1)."""
    dynamic = bool(spec.shape) and not isinstance(spec.shape[0], int)
    if dynamic and len(shape) == len(spec.shape):
        check_array(spec, shape, dtype, where, lead=0)
        return 0
    note = f" (samples on a leading axis) or {len(spec.shape)} (samples along the batch axis)" if dynamic \
        else ""
    check_array(spec, shape, dtype, where, lead=1, note=note)
    return 1


def same_count(counts: dict[str, int], where: str) -> int:
    """The one sample count every input has (an error listing them when they differ)."""
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k} has {v}" for k, v in counts.items())
        raise SparsecError(f"inputs in {where} have different sample counts: {listed}")
    return next(iter(counts.values()))


def check_finite(chunk: Chunk, files: str | dict[str, str], start: int) -> None:
    """NaN/Inf in float data, naming the input, the file and the first bad sample index."""
    for name, arr in chunk.items():
        if len(arr) and (arr.dtype.kind == "f" or "float" in arr.dtype.name):
            ok = np.isfinite(arr.astype(np.float32, copy=False)).reshape(len(arr), -1).all(axis=1)
            if not ok.all():
                where = files if isinstance(files, str) else files[name]
                raise SparsecError(f"{name} in {where} has NaN or Inf at sample {start + int(np.argmin(ok))}")
