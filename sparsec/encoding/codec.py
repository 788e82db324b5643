"""Weight encodings: store each pruned tensor in its smallest exact encoding, read it back bit for bit.

The codecs work on raw bit patterns (any dtype viewed as unsigned ints of its itemsize), so "zero"
means the all-zero bit pattern (+0.0) only; -0.0 and NaN are ordinary values. Payload layouts, the
size formulas and the container are specified in docs/FORMAT.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from math import comb, log2, prod
from typing import Any

import numpy as np

from sparsec.core.options import FORMATS
from sparsec.encoding.codec_bits import DTYPES, UINT, dtype_of, index_bytes, raw_bits
from sparsec.encoding.codec_nm import (
    check_nm,
    group_ranks,
    hw_bits,
    nm_decode,
    nm_encode,
    nm_size,
    rank_layout,
)
from sparsec.encoding.codec_sparse import (
    Analysis,
    check_rle_bits,
    matrix_dims,
    sparse_decode,
    sparse_encode,
    sparse_size,
)

SPARSE_FORMATS = ("bitmap", "rle", "coo", "csr", "csc")
NM_FORMATS = ("nm_hw", "nm_rank")
DEFAULT_RLE_BITS = 4


@dataclass(frozen=True)
class Encoded:
    """One encoded tensor: everything ``decode`` needs, as stored in the container manifest."""

    format: str
    shape: tuple[int, ...]
    dtype: str
    params: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""

    @property
    def nbytes(self) -> int:
        return len(self.payload)


def _check_format(fmt: object) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown encoding {fmt!r} (choose from {', '.join(FORMATS)})")
    return fmt  # type: ignore[return-value]


def _nm(a: Analysis, n: int, m: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Group ranks for (n, m, axis), cached on the analysis so sizing and encoding share them."""
    key = ("nm", n, m, axis)
    if key not in a.__dict__:
        a.__dict__[key] = group_ranks(a.bits, n, m, axis)
    return a.__dict__[key]


def _encode(a: Analysis, dtype: str, fmt: str, params: dict[str, Any]) -> Encoded:
    shape = tuple(int(d) for d in a.bits.shape)
    params = dict(params)
    if fmt == "rle":
        rle_bits = check_rle_bits(params.pop("rle_bits", DEFAULT_RLE_BITS))
    if fmt in NM_FORMATS:
        if "n" not in params or "m" not in params:
            raise ValueError(f"encoding {fmt} needs the N:M pattern (n and m)")
        n, m, axis = check_nm(params.pop("n"), params.pop("m"), params.pop("axis", -1), len(shape))
    if params:
        raise ValueError(f"unexpected parameters for encoding {fmt}: {', '.join(sorted(params))}")
    if fmt == "dense":
        sections, out = [a.flat], {}
    elif fmt in SPARSE_FORMATS:
        sections, out = sparse_encode(fmt, a, shape, rle_bits if fmt == "rle" else DEFAULT_RLE_BITS)
    else:
        moved, ranks = _nm(a, n, m, axis)
        sections = nm_encode(fmt, moved, ranks, n, m)
        out = {"n": n, "m": m, "axis": axis}
        if fmt == "nm_hw":
            out["index_bits"] = hw_bits(m)
        else:
            out["group_words"], out["word_bits"] = rank_layout(n, m)
    payload = b"".join(np.ascontiguousarray(s).reshape(-1).view(np.uint8).data for s in sections)
    return Encoded(fmt, shape, dtype, out, payload)


def encode(array: np.ndarray, format: str, **params: Any) -> Encoded:
    """Encode ``array`` in ``format``; ValueError if the format does not apply (e.g. a broken N:M)."""
    array = np.asarray(array)
    return _encode(Analysis(raw_bits(array)), array.dtype.name, _check_format(format), params)


def _check_derived(enc: Encoded) -> None:
    """Layout constants in the manifest must match the ones this code derives (version skew)."""
    p = enc.params
    derived: dict[str, int] = {}
    if enc.format == "nm_hw" and isinstance(p.get("m"), int):
        derived["index_bits"] = hw_bits(p["m"])
    if enc.format == "nm_rank" and isinstance(p.get("m"), int) and isinstance(p.get("n"), int):
        if 2 <= p["m"] <= 16 and 1 <= p["n"] <= p["m"]:
            derived["group_words"], derived["word_bits"] = rank_layout(p["n"], p["m"])
    for key, value in derived.items():
        if key in p and p[key] != value:
            raise ValueError(f"parameter {key!r} is {p[key]!r}, this reader's layout uses {value}")


def decode_buffer(enc: Encoded, buf: np.ndarray) -> np.ndarray:
    """Decode from a uint8 buffer (e.g. a memory-mapped slice) instead of ``enc.payload``."""
    fmt = _check_format(enc.format)
    dt = dtype_of(enc.dtype)
    shape = tuple(enc.shape)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"bad shape {list(shape)}")
    udt = UINT[dt.itemsize]
    try:
        _check_derived(enc)
        if fmt == "dense":
            if buf.size != prod(shape) * dt.itemsize:
                raise ValueError(f"payload is {buf.size} bytes, the shape implies "
                                 f"{prod(shape) * dt.itemsize}")
            flat = buf.view(udt).copy()
        elif fmt in SPARSE_FORMATS:
            flat = sparse_decode(fmt, buf, shape, udt, enc.params)
        else:
            flat = nm_decode(fmt, buf, shape, udt, enc.params)
    except (ValueError, IndexError, TypeError) as e:
        raise ValueError(f"corrupt {fmt} payload: {e}") from e
    return flat.astype(f"={udt.char}", copy=False).view(dt).reshape(shape)


def decode(enc: Encoded) -> np.ndarray:
    """The exact array (bit for bit, as a fresh writable array) an ``Encoded`` was made from."""
    return decode_buffer(enc, np.frombuffer(enc.payload, np.uint8))


def _sizes(a: Analysis, nm: tuple[int, int, int] | None, rle_bits: int) -> dict[str, int]:
    shape = a.bits.shape
    sizes = {"dense": a.size * a.itemsize}
    for fmt in SPARSE_FORMATS:
        sizes[fmt] = sparse_size(fmt, a, shape, rle_bits)
    if nm is not None and shape:
        n, m, axis = check_nm(*nm, len(shape))
        try:
            _nm(a, n, m, axis)
        except ValueError:
            return sizes  # the pattern does not hold: N:M formats are not candidates
        for fmt in NM_FORMATS:
            sizes[fmt] = nm_size(fmt, shape, a.itemsize, n, m, axis)
    return sizes


def candidate_sizes(array: np.ndarray, *, nm: tuple[int, int, int] | None = None,
                    rle_bits: int = DEFAULT_RLE_BITS) -> dict[str, int]:
    """Exact payload bytes of every applicable format, from counts (no full encode).

    ``nm`` is (n, m, axis); without it, or when the tensor breaks the pattern, the N:M formats
    are absent.
    """
    return _sizes(Analysis(raw_bits(np.asarray(array))), nm, check_rle_bits(rle_bits))


def _params_for(fmt: str, nm: tuple[int, int, int] | None, rle_bits: int) -> dict[str, Any]:
    if fmt == "rle":
        return {"rle_bits": rle_bits}
    if fmt in NM_FORMATS:
        if nm is None:
            raise ValueError(f"encoding {fmt} needs an N:M pattern")
        n, m, axis = nm
        return {"n": n, "m": m, "axis": axis}
    return {}


def choose(array: np.ndarray, *, nm: tuple[int, int, int] | None = None, rle_bits: int = DEFAULT_RLE_BITS,
           force: str | None = None) -> Encoded:
    """``force`` (a format) or, for None/"auto", the smallest exact candidate; ties go to the
    simplest format (FORMATS order, dense first)."""
    array = np.asarray(array)
    a = Analysis(raw_bits(array))
    rle_bits = check_rle_bits(rle_bits)
    if force not in (None, "auto"):
        fmt = _check_format(force)
        return _encode(a, array.dtype.name, fmt, _params_for(fmt, nm, rle_bits))
    sizes = _sizes(a, nm, rle_bits)
    best = min(sizes, key=lambda f: (sizes[f], FORMATS.index(f)))
    enc = _encode(a, array.dtype.name, best, _params_for(best, nm, rle_bits))
    if enc.nbytes != sizes[best]:  # the size formulas are part of the format: never let them drift
        raise AssertionError(f"{best}: computed size {sizes[best]} but encoded {enc.nbytes} bytes")
    return enc


def formula_estimate(format: str, shape: tuple[int, ...], nonzeros: int, value_bits: int,
                     **params: Any) -> int:
    """The lecture's size estimate in bytes (rounded up), to print next to the exact size.

    dense L*n; bitmap nnz*n + L; COO nnz*(n + i); CSR nnz*(n + i) + (rows+1)*ptr; RLE
    nnz*(n + r) + r per expected escape (i.i.d. zeros); N:M L*(N/M)*n + metadata, where the
    metadata is L*(N/M)*ceil(log2 M) bits (hw) or (L/M)*log2 C(M,N) bits (rank, the ideal).
    """
    fmt = _check_format(format)
    total = prod(shape)
    nnz, n = nonzeros, value_bits
    p = 1 - nnz / total if total else 0.0
    if fmt == "dense":
        bits = total * n
    elif fmt == "bitmap":
        bits = nnz * n + total
    elif fmt == "coo":
        bits = nnz * (n + 8 * index_bytes(max(total - 1, 0)))
    elif fmt in ("csr", "csc"):
        rows, cols = matrix_dims(tuple(shape))
        if fmt == "csc":
            rows, cols = cols, rows
        bits = nnz * (n + 8 * index_bytes(max(cols - 1, 0))) + (rows + 1) * 8 * index_bytes(nnz)
    elif fmt == "rle":
        r = params.get("rle_bits", DEFAULT_RLE_BITS)
        q = p ** ((1 << r) - 1)
        escapes = nnz * q / (1 - q) if q < 1 else 0.0
        bits = nnz * (n + r) + escapes * r
    else:
        nn, m = params["n"], params["m"]
        meta = total * nn / m * hw_bits(m) if fmt == "nm_hw" else total / m * log2(comb(m, nn))
        bits = total * nn / m * n + meta
    return math.ceil(round(bits, 6) / 8)  # round first: a 1e-12 bit of expected escape is no byte


def formula_estimates(array: np.ndarray, formats: list[str] | tuple[str, ...] = FORMATS, *,
                      nm: tuple[int, int, int] | None = None,
                      rle_bits: int = DEFAULT_RLE_BITS) -> dict[str, int]:
    """``formula_estimate`` for each applicable format of ``array`` (for the report's columns)."""
    array = np.asarray(array)
    bits = raw_bits(array)
    nnz = int(np.count_nonzero(bits))
    value_bits = 8 * array.dtype.itemsize
    out = {}
    for fmt in formats:
        if fmt in NM_FORMATS:
            if nm is None:
                continue
            out[fmt] = formula_estimate(fmt, array.shape, nnz, value_bits, n=nm[0], m=nm[1])
        else:
            out[fmt] = formula_estimate(fmt, array.shape, nnz, value_bits, rle_bits=rle_bits)
    return out


__all__ = ["DTYPES", "FORMATS", "Encoded", "candidate_sizes", "choose", "decode", "decode_buffer", "encode",
           "formula_estimate", "formula_estimates"]
