"""Bit-level helpers shared by the weight codecs (see docs/FORMAT.md).

Everything here works on raw bit patterns viewed as little-endian unsigned integers, so the codecs
never interpret a value: +0.0 is the only "zero", and -0.0 or a NaN travels like any other value.
The large-array loops run in chunks of ``CHUNK`` elements because numpy's ``nonzero`` and
boolean-mask assignment are several times faster (and branch-free in the scatter) when each pass
stays in cache; the Python loop is over chunks, never over elements.
"""

from __future__ import annotations

from math import gcd, prod

import ml_dtypes
import numpy as np

CHUNK = 1 << 15
STRIP = 64
UINT = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(t)
    for name, t in (
        ("float32", np.float32), ("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16),
        ("int8", np.int8), ("uint8", np.uint8), ("int16", np.int16), ("uint16", np.uint16),
        ("int32", np.int32), ("int64", np.int64), ("float64", np.float64),
    )
}


def dtype_of(name: str) -> np.dtype:
    """The numpy dtype for a manifest dtype name (bfloat16 needs ml_dtypes, so no np.dtype(name))."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r} (supported: {', '.join(DTYPES)})") from None


def raw_bits(array: np.ndarray) -> np.ndarray:
    """The array's bit patterns as C-contiguous little-endian unsigned ints of the same itemsize."""
    name = np.dtype(array.dtype).name
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r} (supported: {', '.join(DTYPES)})")
    if not array.dtype.isnative:  # e.g. '>f4': the bits must be those of the value, not the bytes
        array = array.astype(array.dtype.newbyteorder("="))
    a = array if array.flags.c_contiguous else array.copy(order="C")  # keeps 0-d arrays 0-d
    return a.view(f"=u{a.itemsize}").astype(UINT[a.itemsize], copy=False)


def index_bytes(max_value: int) -> int:
    """Smallest of 1, 2, 4 (or 8) bytes that holds ``max_value`` as an unsigned integer."""
    for width in (1, 2, 4):
        if max_value < 1 << (8 * width):
            return width
    return 8


def nonzero_flat(flat: np.ndarray) -> np.ndarray:
    """Flat indices (intp) of the non-zero elements, chunked into a preallocated array: 3-5x
    faster than one flatnonzero over a large array."""
    out = np.empty(np.count_nonzero(flat), np.intp)
    pos = 0
    for start in range(0, flat.size, CHUNK):
        part = (flat[start:start + CHUNK] != 0).nonzero()[0]
        np.add(part, start, out=out[pos:pos + part.size])
        pos += part.size
    return out


def escapes(idx: np.ndarray, escape: int) -> int:
    """Sum over the zero runs before each non-zero of run // escape (RLE escape codes needed).

    Chunked, and the division only runs on chunks that hold a run of at least ``escape`` zeros.
    """
    total, prev = 0, -1
    for start in range(0, idx.size, CHUNK):
        part = idx[start:start + CHUNK]
        runs = np.diff(part, prepend=prev)
        prev = int(part[-1])
        if runs.max() > escape:  # runs here are run + 1
            total += int(((runs - 1) // escape).sum())
    return total


def gather(src: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``src[idx]`` in chunks (the index conversion stays in cache)."""
    out = np.empty(idx.size, src.dtype)
    for start in range(0, idx.size, CHUNK):
        np.take(src, idx[start:start + CHUNK], out=out[start:start + CHUNK])
    return out


def expand(mask: np.ndarray, values: np.ndarray, out: np.ndarray, *, packed: bool = False) -> None:
    """Scatter ``values`` in order into ``out`` (flat, zeroed) where the flat ``mask`` is set.

    Equivalent to ``out[mask] = values`` but per cache-sized chunk with nonzero + fancy scatter,
    which avoids the branch mispredictions of boolean assignment on random masks. With
    ``packed`` the mask is a little-endian bit stream (np.packbits order), unpacked per chunk.
    """
    pos = 0
    for start in range(0, out.size, CHUNK):
        if packed:
            part = np.unpackbits(mask[start // 8:(start + CHUNK) // 8], bitorder="little",
                                 count=min(CHUNK, out.size - start)).view(bool)
        else:
            part = mask[start:start + CHUNK]
        idx = np.flatnonzero(part)
        if idx.size:
            if pos + idx.size > values.size:
                raise ValueError("the position data marks more elements than there are values")
            out[start:start + CHUNK][idx] = values[pos:pos + idx.size]
            pos += idx.size
    if pos != values.size:
        raise ValueError(f"the position data marks {pos} elements but there are {values.size} values")


def scatter(out: np.ndarray, idx: np.ndarray, values: np.ndarray) -> None:
    """``out[idx] = values`` in chunks, so narrow index types widen to intp in cache."""
    for start in range(0, idx.size, CHUNK):
        out[idx[start:start + CHUNK]] = values[start:start + CHUNK]


def swap_last(a: np.ndarray) -> np.ndarray:
    """[A, K, B] -> C-contiguous [A, B, K]. Large planes are copied in strips of STRIP rows of K:
    each strip's reads are contiguous and its writes are STRIP-element runs, which is about 4x
    faster than numpy's strided copy of a large transpose."""
    rows, k, b = a.shape
    if k < STRIP or b < STRIP:
        return np.ascontiguousarray(a.transpose(0, 2, 1))
    out = np.empty((rows, b, k), a.dtype)
    for i in range(rows):
        for k0 in range(0, k, STRIP):
            out[i, :, k0:k0 + STRIP] = a[i, k0:k0 + STRIP].T
    return out


def move_axis_last(a: np.ndarray, axis: int) -> np.ndarray:
    """C-contiguous copy of ``a`` with ``axis`` moved last (a view-free, tiled np.moveaxis)."""
    shape = a.shape
    if axis == len(shape) - 1:
        return np.ascontiguousarray(a)
    moved = swap_last(a.reshape(prod(shape[:axis]), shape[axis], prod(shape[axis + 1:])))
    return moved.reshape(shape[:axis] + shape[axis + 1:] + (shape[axis],))


def move_last_axis(a: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of ``move_axis_last``: the last axis of ``a`` goes back to position ``axis``."""
    shape = a.shape
    if axis == len(shape) - 1:
        return np.ascontiguousarray(a)
    rest = shape[axis:-1]
    moved = swap_last(a.reshape(prod(shape[:axis]), prod(rest), shape[-1]))
    return moved.reshape(shape[:axis] + shape[-1:] + rest)


def _pack_small(codes: np.ndarray, width: int) -> np.ndarray:
    """Pack 1-, 2- or 4-bit codes, low bits first, with shifts (no per-bit expansion)."""
    per = 8 // width
    c = codes.astype(np.uint8)
    if c.size % per:
        c = np.concatenate([c, np.zeros(per - c.size % per, np.uint8)])
    c = c.reshape(-1, per)
    acc = c[:, 0].copy()
    for j in range(1, per):
        acc |= c[:, j] << np.uint8(j * width)
    return acc


def pack_bits(codes: np.ndarray, width: int) -> np.ndarray:
    """Codes (1-D, each < 2**width) as a bit stream of ``width`` bits each, LSB first, in uint8."""
    codes = np.asarray(codes).reshape(-1)
    if width in (8, 16, 32, 64):
        return codes.astype(UINT[width // 8]).view(np.uint8)
    if width in (1, 2, 4):
        return _pack_small(codes, width)
    if not 0 < width <= 64:
        raise ValueError(f"bit width {width} out of range 1..64")
    nbytes = (width + 7) // 8
    parts = []
    step = CHUNK // 8 * 8
    for start in range(0, codes.size, step):
        b = codes[start:start + step].astype(UINT[8]).view(np.uint8).reshape(-1, 8)[:, :nbytes]
        bits = np.unpackbits(b, axis=1, bitorder="little")[:, :width]
        parts.append(np.packbits(bits.reshape(-1), bitorder="little"))
    return np.concatenate(parts) if parts else np.empty(0, np.uint8)


def unpack_bits(buf: np.ndarray, width: int, count: int) -> np.ndarray:
    """Inverse of ``pack_bits``: ``count`` codes (uint8 for width <= 8, else uint16/32/64)."""
    need = (count * width + 7) // 8
    if buf.size < need:
        raise ValueError(f"bit stream holds {buf.size} bytes, {need} needed")
    buf = buf[:need]
    if width in (8, 16, 32, 64):
        return buf.view(UINT[width // 8])
    if width == 1:
        return np.unpackbits(buf, bitorder="little", count=count)
    if width in (2, 4):
        per = 8 // width
        out = np.empty((buf.size, per), np.uint8)
        for j in range(per):  # column by column: a broadcast over a short last axis is slow
            np.bitwise_and(buf >> np.uint8(j * width), np.uint8((1 << width) - 1), out=out[:, j])
        return out.reshape(-1)[:count]
    if width > 57:
        raise ValueError(f"bit width {width} out of range 1..57 for unaligned codes")
    # Eight codes fill exactly `width` bytes, so code j of every octet starts at the same byte and
    # bit offset: read it with one strided 8-byte copy per j instead of a per-code gather.
    octets = -(-count // 8)
    padded = np.zeros(octets * width + 8, np.uint8)
    padded[:need] = buf
    out = np.empty((octets, 8), UINT[8])
    mask = np.uint64((1 << width) - 1)
    for j in range(8):
        first, shift = divmod(j * width, 8)
        rows = np.lib.stride_tricks.as_strided(padded[first:], (octets, 8), (width, 1))
        out[:, j] = (np.ascontiguousarray(rows).view(UINT[8])[:, 0] >> np.uint64(shift)) & mask
    result = out.reshape(-1)[:count]
    return result.astype(np.uint8) if width <= 8 else result


def _row_pad(ncols: int, width: int) -> int:
    """Columns rounded up so a row of codes is a whole number of bytes."""
    per = 8 // gcd(width, 8)
    return -(-ncols // per) * per


def pack_rows(codes: np.ndarray, width: int) -> np.ndarray:
    """Pack each row of a 2-D code array on its own, padded to whole bytes: [rows, ceil(C*w/8)]."""
    rows, ncols = codes.shape
    row_bytes = (ncols * width + 7) // 8
    padded = _row_pad(ncols, width)
    if padded != ncols:
        codes = np.concatenate([codes, np.zeros((rows, padded - ncols), codes.dtype)], axis=1)
    packed = pack_bits(codes.reshape(-1), width).reshape(rows, padded * width // 8)
    return packed[:, :row_bytes]


def unpack_rows(buf: np.ndarray, width: int, ncols: int) -> np.ndarray:
    """Inverse of ``pack_rows`` for a [rows, ceil(C*w/8)] byte array."""
    rows, row_bytes = buf.shape
    padded = _row_pad(ncols, width)
    full = padded * width // 8
    if full != row_bytes:
        buf = np.concatenate([buf, np.zeros((rows, full - row_bytes), np.uint8)], axis=1)
    return unpack_bits(buf.reshape(-1), width, rows * padded).reshape(rows, padded)[:, :ncols]
