"""N:M compressed encodings: ``nm_hw`` (position bits per kept value) and ``nm_rank`` (mixed radix).

A tensor is N:M along ``axis`` when every run of M consecutive elements along that axis holds at
most N non-zeros. The axis is moved last, the tensor is read as [R, K] (R = product of the other
dimensions, K = shape[axis]) and split into G = R*K/M groups. Each group keeps exactly N slots: its
non-zeros plus, where it has fewer, its lowest-index zeros (whose bits are +0.0, so the round trip
stays exact). Kept positions are ascending within a group. Byte layouts: docs/FORMAT.md.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import combinations
from math import comb, log2, prod

import numpy as np

from sparsec.runtime.codec_bits import expand, nonzero_flat, pack_bits, pack_rows, unpack_bits, unpack_rows

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


@lru_cache(maxsize=None)
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


@lru_cache(maxsize=None)
def tables(n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """positions [C, n] (lexicographic), group bit mask -> rank [2**m] (-1: > n set), rank -> kept [C, m]."""
    positions = np.array(list(combinations(range(m), n)), np.uint8).reshape(-1, n)
    kept = np.zeros((len(positions), m), bool)
    kept[np.arange(len(positions))[:, None], positions] = True
    rank_of = np.full(1 << m, -1, np.int32)
    rank_of[(kept * (1 << np.arange(m))).sum(1)] = np.arange(len(positions))
    masks = np.arange(1 << m, dtype=np.int64)
    count = _popcount(masks)
    filled, have = masks.copy(), count.copy()
    for _ in range(n):  # pad groups with fewer than n non-zeros with their lowest zero positions
        need = have < n
        filled = np.where(need, filled | (~filled & (filled + 1)), filled)
        have = have + need
    return positions, np.where(count <= n, rank_of[filled], -1).astype(np.int32), kept


def _moved_shape(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    return shape[:axis] + shape[axis + 1:] + (shape[axis],)


def group_ranks(bits: np.ndarray, n: int, m: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(moved [R, K] bits, rank of each group's kept set); ValueError if the pattern is broken."""
    k = bits.shape[axis]
    if k % m:
        raise ValueError(f"N:M {n}:{m} needs dimension {axis} ({k}) to be a multiple of {m}")
    moved = np.ascontiguousarray(np.moveaxis(bits, axis, -1)).reshape(-1, k)
    nz = (moved != 0).reshape(-1, m)
    packed = np.packbits(nz, axis=1, bitorder="little")
    group_mask = packed[:, 0] if m <= 8 else packed.view("<u2")[:, 0]
    ranks = tables(n, m)[1][group_mask]
    if ranks.size and ranks.min() < 0:
        raise ValueError(f"tensor is not {n}:{m} along axis {axis}: a group of {m} holds more than {n} non-zeros")
    return moved, ranks


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
    positions, _, kept = tables(n, m)
    values = moved.reshape(-1)[nonzero_flat(kept[ranks].reshape(-1))]
    if fmt == "nm_hw":
        rows = moved.shape[0]
        return [values, pack_rows(positions[ranks].reshape(rows, -1), hw_bits(m))]
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


@lru_cache(maxsize=None)
def _hw_byte_table(n: int, m: int) -> np.ndarray:
    """For layouts with whole groups per byte: byte -> kept mask of its groups, [256, per*m].

    A group whose codes are out of range or not ascending gets no kept position at all, so the
    count check in ``expand`` rejects it (every real group must contribute exactly n).
    """
    b = hw_bits(m)
    per = 8 // (n * b)
    byte = np.arange(256)[:, None, None]
    shift = (np.arange(per)[:, None] * n + np.arange(n)) * b
    pos = (byte >> shift) & ((1 << b) - 1)  # [256, per, n]
    valid = (pos < m).all(-1) & (np.diff(pos, axis=-1) > 0).all(-1)
    kept = np.zeros((256, per, m), bool)
    np.put_along_axis(kept, np.minimum(pos, m - 1), True, axis=-1)
    kept &= valid[:, :, None]
    return kept.reshape(256, per * m)


@lru_cache(maxsize=None)
def _rank_word_table(n: int, m: int) -> np.ndarray:
    """Whole mixed-radix word -> kept mask of its g groups, [C**g, g*m] (only for small C**g)."""
    g, _ = rank_layout(n, m)
    c = comb(m, n)
    digits = (np.arange(c**g)[:, None] // c ** np.arange(g)) % c
    return tables(n, m)[2][digits].reshape(c**g, g * m)


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
    values, meta = buf[:groups * n * dt.itemsize].view(dt), buf[groups * n * dt.itemsize:]
    if fmt == "nm_hw":
        mask = _hw_mask(meta, rows, k // m, n, m)
    else:
        mask = _rank_mask(meta, groups, n, m)
    out = np.zeros(rows * k, dt)
    expand(mask, values, out)
    if axis == len(shape) - 1:
        return out
    return np.ascontiguousarray(np.moveaxis(out.reshape(moved_shape), -1, axis)).reshape(-1)


def _hw_mask(meta: np.ndarray, rows: int, per_row: int, n: int, m: int) -> np.ndarray:
    b = hw_bits(m)
    meta = meta.reshape(rows, -1)
    if 8 % (n * b) == 0:
        mask = np.take(_hw_byte_table(n, m), meta, axis=0).reshape(rows, -1, m)[:, :per_row]
    else:
        pos = unpack_rows(meta, b, per_row * n).reshape(-1, n).astype(np.intp)
        if not ((pos < m).all() and (np.diff(pos, axis=1) > 0).all()):
            raise ValueError("position metadata holds positions that are out of range or not ascending")
        mask = np.zeros((pos.shape[0], m), bool)
        np.put_along_axis(mask, pos, True, axis=1)
    return mask.reshape(-1)


def _rank_mask(meta: np.ndarray, groups: int, n: int, m: int) -> np.ndarray:
    g, w = rank_layout(n, m)
    c = comb(m, n)
    kept = tables(n, m)[2]
    if w == 0:
        return np.ones(groups * m, bool)
    words = unpack_bits(meta, w, -(-groups // g))
    if c**g <= TABLE_LIMIT:
        if words.size and int(words.max()) >= c**g:
            raise ValueError("a rank word exceeds C(M,N)**g")
        return np.take(_rank_word_table(n, m), words, axis=0).reshape(-1)[:groups * m]
    words = words.astype(np.uint64)
    ranks = np.empty((words.size, g), np.intp)
    for j in range(g):
        ranks[:, j] = words % np.uint64(c)
        words //= np.uint64(c)
    if words.any():
        raise ValueError("a rank word exceeds C(M,N)**g")
    return kept[ranks.reshape(-1)[:groups]].reshape(-1)
