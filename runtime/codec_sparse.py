"""Unstructured sparse encodings: bitmap, run-length, COO, CSR and CSC (layouts in docs/FORMAT.md).

Each format has a closed-form ``*_size`` (so ``auto`` can compare candidates without encoding),
an encoder returning the payload sections and the manifest parameters, and a decoder that checks
the payload against those parameters before trusting any index in it. Every payload starts with
its value section so values are 64-byte aligned in the container; index sections follow.
"""

from __future__ import annotations

from functools import cached_property
from math import prod

import numpy as np
from sparsec.runtime.codec_bits import UINT, expand, index_bytes, nonzero_flat, pack_bits, unpack_bits

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

    @property
    def nnz(self) -> int:
        return int(self.idx.size)

    @cached_property
    def runs(self) -> np.ndarray:
        """Length of the zero run before each non-zero."""
        return np.diff(self.idx, prepend=-1) - 1

    def rle_entries(self, bits: int) -> int:
        escape = (1 << bits) - 1
        return self.nnz + int((self.runs // escape).sum())


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
    values = a.flat[a.idx]
    nnz = a.nnz
    if fmt == "bitmap":
        return [values, np.packbits(a.flat != 0, bitorder="little")], {"nnz": nnz}
    if fmt == "rle":
        escape = (1 << rle_bits) - 1
        runs = a.runs
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
        t = Analysis(np.ascontiguousarray(a.bits.reshape(rows, cols).T))
        return _csr_encode(t, cols, rows)
    return _csr_encode(a, rows, cols)


def _csr_encode(a: Analysis, rows: int, cols: int) -> tuple[Sections, dict]:
    idx, nnz = a.idx, a.nnz
    row = idx // cols if nnz else idx
    ptr = np.zeros(rows + 1, np.int64)
    np.cumsum(np.bincount(row, minlength=rows), out=ptr[1:])
    width, pwidth = index_bytes(max(cols - 1, 0)), index_bytes(nnz)
    col = (idx - row * cols).astype(UINT[width])
    params = {"nnz": nnz, "index_bytes": width, "pointer_bytes": pwidth}
    return [a.flat[idx], col, ptr.astype(UINT[pwidth])], params


def param_int(params: dict, key: str, lo: int = 0, hi: int | None = None) -> int:
    """A manifest parameter as a checked int, so a corrupt manifest cannot index out of range."""
    v = params.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        raise ValueError(f"parameter {key!r} is {v!r}, expected an integer in {lo}..{hi if hi else 'inf'}")
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
        expand(np.unpackbits(rest, bitorder="little", count=n).view(bool), values, out)
        return out
    if fmt == "rle":
        bits = check_rle_bits(params.get("rle_bits"))
        entries = param_int(params, "entries", nnz, nnz + n)
        values, rest = _split(buf, dt, nnz, (entries * bits + 7) // 8 + nnz * s)
        codes = unpack_bits(rest, bits, entries)
        literal = codes != (1 << bits) - 1
        pos = np.cumsum(codes.astype(np.intp) + literal) - 1
        if entries != nnz:
            pos = pos[literal]
        if pos.size != nnz or (nnz and pos[-1] >= n):
            raise ValueError("run lengths do not fit the tensor")
        out[pos] = values
        return out
    width = param_int(params, "index_bytes", 1, 8)
    if width not in UINT:
        raise ValueError(f"index_bytes must be 1, 2, 4 or 8, got {width}")
    if fmt == "coo":
        values, rest = _split(buf, dt, nnz, nnz * (s + width))
        idx = rest.view(UINT[width])
        if nnz and int(idx.max()) >= n:
            raise ValueError("a flat index lies outside the tensor")
        out[idx.astype(np.intp) if width == 8 else idx] = values
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
    flat = np.repeat(np.arange(rows, dtype=np.intp) * cols, counts)
    flat += col
    if fmt == "csc":
        t = np.zeros(n, dt)
        t[flat] = values
        return np.ascontiguousarray(t.reshape(rows, cols).T).reshape(-1)
    out[flat] = values
    return out
