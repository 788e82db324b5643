"""Unstructured sparse encodings: bitmap, run-length, COO, CSR and CSC (layouts in docs/FORMAT.md).

Each format's exact size has a closed form (``sparse_size``, so ``auto`` compares candidates
without encoding); the encoder returns the payload sections and the manifest parameters, and the
decoder checks the payload against those parameters before trusting any index in it. Every payload starts with
its value section so values are 64-byte aligned in the container; index sections follow.
"""

from __future__ import annotations

from functools import cached_property
from math import prod

import numpy as np

from sparsec.encoding.codec_bits import (
    CHUNK,
    UINT,
    escapes,
    expand,
    gather,
    index_bytes,
    nonzero_flat,
    pack_bits,
    scatter,
    swap_last,
    unpack_bits,
)

Sections = list[np.ndarray]


class Analysis:
    """Facts about one tensor's bits, computed once and shared by size calculators and encoders."""

    def __init__(self, bits: np.ndarray) -> None:
        self.bits = bits
        self.flat = bits.reshape(-1)
        self.size = self.flat.size
        self.itemsize = bits.itemsize

    @cached_property
    def idx(self) -> np.ndarray:
        return nonzero_flat(self.flat)

    @cached_property
    def nnz(self) -> int:
        return int(self.idx.size) if "idx" in self.__dict__ else int(np.count_nonzero(self.flat))

    def runs(self) -> np.ndarray:
        """Length of the zero run before each non-zero."""
        return np.diff(self.idx, prepend=-1) - 1

    def rle_entries(self, bits: int) -> int:
        key = ("rle_entries", bits)
        if key not in self.__dict__:
            self.__dict__[key] = self.nnz + escapes(self.idx, (1 << bits) - 1)
        return self.__dict__[key]


def matrix_dims(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view CSR/CSC use: [shape[0], prod(rest)]; a 1-D tensor is [1, n], a scalar [1, 1]."""
    if len(shape) < 2:
        return 1, (shape[0] if shape else 1)
    return shape[0], prod(shape[1:])


def check_rle_bits(bits: object) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 16:
        raise ValueError(f"rle_bits must be an integer from 1 to 16, got {bits!r}")
    return bits


def sparse_size(fmt: str, a: Analysis, shape: tuple[int, ...], rle_bits: int = 4) -> int:
    """Exact payload bytes of ``fmt`` for this tensor, from counts alone."""
    s, nnz, n = a.itemsize, a.nnz, a.size
    if fmt == "bitmap":
        return (n + 7) // 8 + nnz * s
    if fmt == "rle":
        return (a.rle_entries(rle_bits) * rle_bits + 7) // 8 + nnz * s
    if fmt == "coo":
        return nnz * (s + index_bytes(max(n - 1, 0)))
    rows, cols = matrix_dims(shape)
    if fmt == "csc":
        rows, cols = cols, rows
    return nnz * (s + index_bytes(max(cols - 1, 0))) + (rows + 1) * index_bytes(nnz)


def sparse_encode(fmt: str, a: Analysis, shape: tuple[int, ...], rle_bits: int = 4) -> tuple[Sections, dict]:
    """Payload sections and manifest parameters for one of the unstructured formats."""
    values = gather(a.flat, a.idx)
    nnz = a.nnz
    if fmt == "bitmap":
        return [values, np.packbits(a.flat != 0, bitorder="little")], {"nnz": nnz}
    if fmt == "rle":
        escape = (1 << rle_bits) - 1
        runs = a.runs()
        extra = runs // escape
        codes = np.full(nnz + int(extra.sum()), escape, np.uint16)
        codes[np.cumsum(extra + 1) - 1] = runs - extra * escape
        params = {"rle_bits": rle_bits, "nnz": nnz, "entries": int(codes.size)}
        return [values, pack_bits(codes, rle_bits)], params
    if fmt == "coo":
        width = index_bytes(max(a.size - 1, 0))
        return [values, a.idx.astype(UINT[width])], {"nnz": nnz, "index_bytes": width}
    rows, cols = matrix_dims(shape)
    if fmt == "csc":
        return _csr_encode(Analysis(swap_last(a.bits.reshape(1, rows, cols))), cols, rows)
    return _csr_encode(a, rows, cols)


def _csr_encode(a: Analysis, rows: int, cols: int) -> tuple[Sections, dict]:
    idx, nnz = a.idx, a.nnz
    row = idx // cols if nnz else idx
    ptr = np.zeros(rows + 1, np.int64)
    np.cumsum(np.bincount(row, minlength=rows), out=ptr[1:])
    width, pwidth = index_bytes(max(cols - 1, 0)), index_bytes(nnz)
    col = (idx - row * cols).astype(UINT[width])
    params = {"nnz": nnz, "index_bytes": width, "pointer_bytes": pwidth}
    return [gather(a.flat, idx), col, ptr.astype(UINT[pwidth])], params


def param_int(params: dict, key: str, lo: int = 0, hi: int | None = None) -> int:
    """A manifest parameter as a checked int, so a corrupt manifest cannot index out of range."""
    v = params.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        upper = "" if hi is None else hi
        raise ValueError(f"parameter {key!r} is {v!r}, expected an integer in {lo}..{upper}")
    return v


def _split(buf: np.ndarray, dt: np.dtype, nnz: int, expected: int) -> tuple[np.ndarray, np.ndarray]:
    """Check the payload length, then split it into (values, the index sections that follow)."""
    if buf.size != expected:
        raise ValueError(f"payload is {buf.size} bytes, the parameters imply {expected}")
    vbytes = nnz * dt.itemsize
    return buf[:vbytes].view(dt), buf[vbytes:]


def sparse_decode(fmt: str, buf: np.ndarray, shape: tuple[int, ...], dt: np.dtype,
                  params: dict) -> np.ndarray:
    """Flat raw-bit array of ``shape`` from an unstructured payload (``dt`` is the uint dtype)."""
    n = prod(shape)
    nnz = param_int(params, "nnz", 0, n)
    s = dt.itemsize
    out = np.zeros(n, dt)
    if fmt == "bitmap":
        values, rest = _split(buf, dt, nnz, (n + 7) // 8 + nnz * s)
        expand(rest, values, out, packed=True)
        return out
    if fmt == "rle":
        bits = check_rle_bits(params.get("rle_bits"))
        entries = param_int(params, "entries", nnz, nnz + n)
        values, rest = _split(buf, dt, nnz, (entries * bits + 7) // 8 + nnz * s)
        _rle_scatter(unpack_bits(rest, bits, entries), (1 << bits) - 1, values, out)
        return out
    width = param_int(params, "index_bytes", 1, 8)
    if width not in UINT:
        raise ValueError(f"index_bytes must be 1, 2, 4 or 8, got {width}")
    if fmt == "coo":
        values, rest = _split(buf, dt, nnz, nnz * (s + width))
        idx = rest.view(UINT[width])
        if nnz and int(idx.max()) >= n:
            raise ValueError("a flat index lies outside the tensor")
        scatter(out, idx.astype(np.intp) if width == 8 else idx, values)
        return out
    rows, cols = matrix_dims(shape)
    if fmt == "csc":
        rows, cols = cols, rows
    pwidth = param_int(params, "pointer_bytes", 1, 8)
    if pwidth not in UINT:
        raise ValueError(f"pointer_bytes must be 1, 2, 4 or 8, got {pwidth}")
    values, rest = _split(buf, dt, nnz, nnz * (s + width) + (rows + 1) * pwidth)
    col = rest[:nnz * width].view(UINT[width])
    ptr = rest[nnz * width:].view(UINT[pwidth]).astype(np.int64)
    counts = np.diff(ptr)
    if ptr[0] != 0 or ptr[-1] != nnz or (counts < 0).any() or (nnz and int(col.max()) >= cols):
        raise ValueError("row pointers or column indices do not fit the tensor")
    step = max(1, CHUNK // max(cols, 1))
    for r0 in range(0, rows, step):  # blocks of rows, so the index arithmetic stays in cache
        r1 = min(rows, r0 + step)
        lo, hi = ptr[r0], ptr[r1]
        if lo != hi:
            flat = np.repeat(np.arange(r0, r1, dtype=np.intp) * cols, counts[r0:r1])
            flat += col[lo:hi]
            out[flat] = values[lo:hi]
    if fmt == "csc":
        return swap_last(out.reshape(1, rows, cols)).reshape(-1)
    return out


def _rle_scatter(codes: np.ndarray, escape: int, values: np.ndarray, out: np.ndarray) -> None:
    """Place values after their zero runs: position = running sum of (run + 1), minus escapes' 1."""
    last, used = -1, 0
    for start in range(0, codes.size, CHUNK):
        part = codes[start:start + CHUNK]
        literal = part != escape
        pos = part.astype(np.intp)
        pos += literal
        np.cumsum(pos, out=pos)
        pos += last
        last = int(pos[-1])
        if not literal.all():
            pos = pos[literal]
        if used + pos.size > values.size:
            raise ValueError("run lengths mark more values than there are")
        out[pos] = values[used:used + pos.size]
        used += pos.size
    if used != values.size:
        raise ValueError(f"run lengths mark {used} values but there are {values.size}")
