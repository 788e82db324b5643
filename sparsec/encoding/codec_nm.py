"""N:M compressed encodings: ``nm_hw`` (position bits per kept value) and ``nm_rank`` (mixed radix).

A tensor is N:M along ``axis`` when every run of M consecutive elements along that axis holds at
most N non-zeros. The axis is moved last, the tensor is read as [R, K] (R = product of the other
dimensions, K = shape[axis]) and split into G = R*K/M groups. Each group keeps exactly N slots: its
non-zeros plus, where it has fewer, its lowest-index zeros (whose bits are +0.0, so the round trip
stays exact). Kept positions are ascending within a group. Byte layouts: docs/FORMAT.md.
"""

from __future__ import annotations

from functools import cache
from itertools import combinations
from math import comb, log2, prod

import numpy as np

from sparsec.encoding.codec_bits import (
    CHUNK,
    move_axis_last,
    move_last_axis,
    pack_bits,
    pack_rows,
    unpack_bits,
    unpack_rows,
)

MAX_M = 16
RANK_TOLERANCE = 1.0075  # smallest g whose word costs at most 0.75 % over log2 C(M,N) per group
MAX_WORD_BITS = 57
TABLE_LIMIT = 1 << 16  # rank words with at most this many values decode through one lookup table


def check_nm(n: object, m: object, axis: object, ndim: int) -> tuple[int, int, int]:
    """Validated (n, m, axis), axis made non-negative."""
    for key, v in (("n", n), ("m", m), ("axis", axis)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"N:M parameter {key!r} must be an integer, got {v!r}")
    if not 2 <= m <= MAX_M or not 1 <= n <= m:
        raise ValueError(f"N:M needs 1 <= N <= M and 2 <= M <= {MAX_M}, got {n}:{m}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"N:M axis {axis} is out of range for a {ndim}-D tensor")
    return n, m, axis % ndim


def hw_bits(m: int) -> int:
    """Bits per kept position in the hardware layout (2 for M = 4, as CUTLASS/cuSPARSELt)."""
    return max(1, (m - 1).bit_length())


@cache
def rank_layout(n: int, m: int) -> tuple[int, int]:
    """(g, w): g group ranks per mixed-radix word of w = ceil(log2 C**g) bits."""
    c = comb(m, n)
    if c == 1:
        return 1, 0
    best = (1, (c - 1).bit_length())
    for g in range(1, MAX_WORD_BITS + 1):
        w = (c**g - 1).bit_length()
        if w > MAX_WORD_BITS:
            break
        if w <= RANK_TOLERANCE * g * log2(c):
            return g, w
        if w * best[0] < best[1] * g:
            best = (g, w)
    return best


def _popcount(v: np.ndarray) -> np.ndarray:
    return np.unpackbits(v.astype("<u2").view(np.uint8)).reshape(-1, 16).sum(1)


@cache
def tables(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions [C, n] of each rank, lexicographic; group bit mask -> rank [2**m], -1 when more
    than n bits are set, groups with fewer padded with their lowest zero positions)."""
    positions = np.array(list(combinations(range(m), n)), np.uint8).reshape(-1, n)
    rank_of = np.full(1 << m, -1, np.int32)
    rank_of[(1 << positions.astype(np.int64)).sum(1)] = np.arange(len(positions))
    masks = np.arange(1 << m, dtype=np.int64)
    count = _popcount(masks)
    filled, have = masks.copy(), count.copy()
    for _ in range(n):  # add the lowest unset bit until n are set
        need = have < n
        filled = np.where(need, filled | (~filled & (filled + 1)), filled)
        have = have + need
    return positions, np.where(count <= n, rank_of[filled], -1).astype(np.int32)


def _moved_shape(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    return shape[:axis] + shape[axis + 1:] + (shape[axis],)


def group_ranks(bits: np.ndarray, n: int, m: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(moved [R, K] bits, rank of each group's kept set); ValueError if the pattern is broken."""
    k = bits.shape[axis]
    if k % m:
        raise ValueError(f"N:M {n}:{m} needs dimension {axis} ({k}) to be a multiple of {m}")
    moved = move_axis_last(bits, axis).reshape(prod(_moved_shape(bits.shape, axis)[:-1]), k)
    group_mask = _group_masks((moved != 0).reshape(-1, m))
    ranks = np.take(tables(n, m)[1], group_mask)
    if ranks.size and ranks.min() < 0:
        raise ValueError(f"tensor is not {n}:{m} along axis {axis}: "
                         f"a group of {m} holds more than {n} non-zeros")
    return moved, ranks


def _group_masks(nz: np.ndarray) -> np.ndarray:
    """Bit mask (bit j = element j non-zero) of each group of a [G, m] bool array.

    For m = 2, 4, 8 a group's bools are one little-endian integer of 0/1 bytes; multiplying by
    sum(2**(P - 7*j)) moves byte j's bit to bit P + j with no carries (all partial products land
    on distinct bits), so one multiply and shift replace a slow packbits along a short axis.
    """
    m = nz.shape[1]
    if m in (2, 4, 8) and nz.flags.c_contiguous:
        word = np.dtype(f"<u{m}")
        top = 8 * m - 8
        factor = word.type(sum(1 << (top - 7 * j) for j in range(m)))
        return (nz.view(np.uint8).view(word)[:, 0] * factor) >> word.type(top)
    packed = np.packbits(nz, axis=1, bitorder="little")
    return packed[:, 0] if m <= 8 else packed.view("<u2")[:, 0]


def nm_size(fmt: str, shape: tuple[int, ...], itemsize: int, n: int, m: int, axis: int) -> int:
    """Exact payload bytes (the caller has checked the pattern)."""
    k = shape[axis]
    rows = prod(_moved_shape(shape, axis)[:-1])
    groups = rows * k // m
    if fmt == "nm_hw":
        meta = rows * ((k // m * n * hw_bits(m) + 7) // 8)
    else:
        g, w = rank_layout(n, m)
        meta = (-(-groups // g) * w + 7) // 8
    return groups * n * itemsize + meta


def nm_encode(fmt: str, moved: np.ndarray, ranks: np.ndarray, n: int, m: int) -> list[np.ndarray]:
    """Payload sections (values, metadata) from ``group_ranks`` output."""
    positions = tables(n, m)[0]
    values = _gather_units(ranks, positions, m, moved.reshape(-1))
    if fmt == "nm_hw":
        rows = moved.shape[0]
        return [values, pack_rows(positions[ranks].reshape(rows, moved.shape[1] // m * n), hw_bits(m))]
    g, w = rank_layout(n, m)
    if w == 0:
        return [values]
    r = np.zeros(-(-ranks.size // g) * g, np.uint64)
    r[:ranks.size] = ranks
    r = r.reshape(-1, g)
    word = r[:, g - 1].copy()
    for j in range(g - 2, -1, -1):  # the word's first group is its least significant digit
        word = word * np.uint64(comb(m, n)) + r[:, j]
    return [values, pack_bits(word, w)]


@cache
def _hw_byte_table(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Where whole groups fill a byte: byte -> element offsets of its kept values [256, per*n], and
    whether every group in the byte is valid (positions in range and ascending) [256]."""
    b = hw_bits(m)
    per = 8 // (n * b)
    shift = (np.arange(per)[:, None] * n + np.arange(n)) * b
    pos = (np.arange(256)[:, None, None] >> shift) & ((1 << b) - 1)  # [256, per, n]
    valid = ((pos < m).all(-1) & (np.diff(pos, axis=-1) > 0).all(-1)).all(-1)
    offsets = pos + (np.arange(per) * m)[:, None]
    return offsets.reshape(256, per * n).astype(np.uint8), valid


@cache
def _rank_word_table(n: int, m: int) -> np.ndarray:
    """Whole mixed-radix word -> element offsets of its g groups' kept values, [C**g, g*n]."""
    g, _ = rank_layout(n, m)
    c = comb(m, n)
    digits = (np.arange(c**g)[:, None] // c ** np.arange(g)) % c
    offsets = tables(n, m)[0][digits].astype(np.int64) + (np.arange(g) * m)[:, None]
    return offsets.reshape(c**g, g * n).astype(np.uint16 if g * m > 255 else np.uint8)


def _scatter_units(codes: np.ndarray, table: np.ndarray, unit: int, values: np.ndarray,
                   out: np.ndarray) -> None:
    """out[u*unit + table[codes[u]]] = the u-th run of values, for every unit u (a byte, word or group
    holding a fixed number of kept values). Chunked so the index arithmetic stays in cache, and
    branch-free, unlike a scan of a kept mask."""
    per = table.shape[1]
    step = max(1, CHUNK // unit)
    base = (np.arange(step, dtype=np.intp) * unit)[:, None]
    for start in range(0, codes.size, step):
        end = min(start + step, codes.size)
        idx = np.take(table, codes[start:end], axis=0) + base[:end - start]
        out[start * unit:end * unit][idx.reshape(-1)] = values[start * per:end * per]


def _gather_units(codes: np.ndarray, table: np.ndarray, unit: int, src: np.ndarray) -> np.ndarray:
    """Inverse of ``_scatter_units``: the kept values of every unit, in order."""
    per = table.shape[1]
    out = np.empty(codes.size * per, src.dtype)
    step = max(1, CHUNK // unit)
    base = (np.arange(step, dtype=np.intp) * unit)[:, None]
    for start in range(0, codes.size, step):
        end = min(start + step, codes.size)
        idx = np.take(table, codes[start:end], axis=0) + base[:end - start]
        np.take(src[start * unit:end * unit], idx.reshape(-1), out=out[start * per:end * per])
    return out


def nm_decode(fmt: str, buf: np.ndarray, shape: tuple[int, ...], dt: np.dtype, params: dict) -> np.ndarray:
    """Flat raw-bit array from an nm_hw / nm_rank payload (``dt`` is the uint dtype)."""
    n, m, axis = check_nm(params.get("n"), params.get("m"), params.get("axis"), len(shape))
    k = shape[axis]
    if k % m:
        raise ValueError(f"dimension {axis} ({k}) is not a multiple of M = {m}")
    moved_shape = _moved_shape(shape, axis)
    rows = prod(moved_shape[:-1])
    groups = rows * k // m
    expected = nm_size(fmt, shape, dt.itemsize, n, m, axis)
    if buf.size != expected:
        raise ValueError(f"payload is {buf.size} bytes, the parameters imply {expected}")
    nvals = groups * n * dt.itemsize
    values, meta = buf[:nvals].view(dt), buf[nvals:]
    out = np.zeros(rows * k, dt)
    if fmt == "nm_hw":
        _hw_scatter(meta, rows, k // m, n, m, values, out)
    else:
        _rank_scatter(meta, groups, n, m, values, out)
    return move_last_axis(out.reshape(moved_shape), axis).reshape(-1)


def _hw_scatter(meta: np.ndarray, rows: int, per_row: int, n: int, m: int, values: np.ndarray,
                out: np.ndarray) -> None:
    b = hw_bits(m)
    if 8 % (n * b) == 0 and per_row % (8 // (n * b)) == 0:  # whole groups in whole bytes: one table
        offsets, valid = _hw_byte_table(n, m)
        if not np.take(valid, meta).all():
            raise ValueError("position metadata holds positions that are out of range or not ascending")
        _scatter_units(meta, offsets, 8 // (n * b) * m, values, out)
        return
    pos = unpack_rows(meta.reshape(rows, (per_row * n * b + 7) // 8), b, per_row * n)
    pos = pos.reshape(-1, n).astype(np.intp)
    if not ((pos < m).all() and (np.diff(pos, axis=1) > 0).all()):
        raise ValueError("position metadata holds positions that are out of range or not ascending")
    ranks = tables(n, m)[1][(1 << pos).sum(1)]
    _scatter_units(ranks, tables(n, m)[0], m, values, out)


def _rank_scatter(meta: np.ndarray, groups: int, n: int, m: int, values: np.ndarray,
                  out: np.ndarray) -> None:
    g, w = rank_layout(n, m)
    c = comb(m, n)
    positions = tables(n, m)[0]
    if w == 0:
        _scatter_units(np.zeros(groups, np.intp), positions, m, values, out)
        return
    words = unpack_bits(meta, w, -(-groups // g))
    if words.size and int(words.max()) >= c**g:
        raise ValueError("a rank word exceeds C(M,N)**g")
    full = groups // g
    if c**g <= TABLE_LIMIT:  # whole words through one table, the partial last word group by group
        _scatter_units(words[:full], _rank_word_table(n, m), g * m, values, out)
        words = words[full:]
        first = full * g
    else:
        first = 0
    rest = words.astype(np.uint64)
    ranks = np.empty((rest.size, g), np.intp)
    for j in range(g):  # mixed-radix digits, the word's first group least significant
        ranks[:, j] = rest % np.uint64(c)
        rest //= np.uint64(c)
    _scatter_units(ranks.reshape(-1)[:groups - first], positions, m, values[first * n:], out[first * m:])
