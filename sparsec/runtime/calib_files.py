"""Calibration files: a .npz of all samples, a directory of one .npy per input (memory-mapped) or of
one .npz per sample; headers are checked before any data is read, and rows stream in order."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sparsec.errors import SparsecError
from sparsec.runtime.calib_checks import (
    READ_ERRORS,
    Chunks,
    InputSpec,
    Source,
    check_array,
    check_names,
    check_samples,
    same_count,
)


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
    except READ_ERRORS as exc:
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


def _open_npz(specs: list[InputSpec], path: Path) -> Source:
    heads = _npz_headers(path)
    check_names(specs, heads, str(path))
    lead = {s.name: check_samples(s, heads[s.name][0], heads[s.name][2], str(path)) for s in specs}
    count = same_count({s.name: heads[s.name][0][0] for s in specs}, str(path))

    def chunks(hint: int) -> Chunks:
        try:
            with zipfile.ZipFile(path) as zf:
                for arrays in zip(*[_member_rows(zf, s, count, hint) for s in specs], strict=True):
                    pairs = zip(specs, arrays, strict=True)
                    yield {s.name: _on_sample_axis(a, lead[s.name]) for s, a in pairs}, str(path)
        except READ_ERRORS as exc:
            raise SparsecError(f"cannot read {path}: {exc}", "is the file complete?") from None
    return Source(str(path), count, chunks)


def _open_npy_dir(specs: list[InputSpec], path: Path, found: list[Path]) -> Source:
    by_name = {f.stem: f for f in found}
    check_names(specs, by_name, str(path))
    files = {s.name: str(by_name[s.name]) for s in specs}
    arrays, lead = {}, {}
    for s in specs:
        try:
            arrays[s.name] = np.load(by_name[s.name], mmap_mode="r")  # memory-mapped: streamed, not loaded
        except READ_ERRORS as exc:
            raise SparsecError(f"cannot read {files[s.name]}: {exc}") from None
        lead[s.name] = check_samples(s, arrays[s.name].shape, arrays[s.name].dtype, files[s.name])
    count = same_count({k: a.shape[0] for k, a in arrays.items()}, str(path))

    def chunks(hint: int) -> Chunks:
        for start in range(0, count, hint):
            rows = {s.name: np.array(arrays[s.name][start:start + hint], s.dtype) for s in specs}
            yield {k: _on_sample_axis(a, lead[k]) for k, a in rows.items()}, files
    return Source(f"{path} (one .npy per input)", count, chunks)


def _on_sample_axis(rows: np.ndarray, lead: int) -> np.ndarray:
    """Samples taken along the batch axis (lead 0) become samples of batch 1 on a leading axis."""
    return rows if lead else rows[:, None]


def _open_sample_dir(specs: list[InputSpec], path: Path, found: list[Path]) -> Source:
    for f in found:
        heads = _npz_headers(f)
        check_names(specs, heads, str(f))
        for s in specs:
            shape, _, dtype = heads[s.name]
            lead = 1 if len(shape) == len(s.shape) + 1 and shape[0] == 1 else 0
            check_array(s, shape, dtype, str(f), lead, f" (or {len(s.shape) + 1} with a leading 1)")

    def chunks(hint: int) -> Chunks:
        for f in found:
            try:
                with np.load(f) as z:
                    arrays = {s.name: np.asarray(z[s.name], s.dtype) for s in specs}
            except READ_ERRORS as exc:
                raise SparsecError(f"cannot read {f}: {exc}") from None
            yield {s.name: arrays[s.name][None] if arrays[s.name].ndim == len(s.shape) else arrays[s.name]
                   for s in specs}, str(f)
    return Source(f"{path} ({len(found)} .npz samples)", len(found), chunks)


def path_names(path: Path) -> set[str]:
    """The input names a calibration path holds (headers only; empty when it cannot be read: open_path
    then says why)."""
    try:
        if path.is_file():
            return set(_npz_headers(path))
        if path.is_dir():
            npz = sorted(path.glob("*.npz"))
            return set(_npz_headers(npz[0])) if npz else {f.stem for f in path.glob("*.npy")}
    except SparsecError:
        pass
    return set()


def open_path(specs: list[InputSpec], path: Path) -> Source:
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
