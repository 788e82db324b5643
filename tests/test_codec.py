"""Weight codecs: bit-exact round trips, exact candidate sizes, auto choice, index widths, N:M layouts."""

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsec.encoding import codec
from sparsec.encoding.codec_bits import pack_bits, pack_rows, unpack_bits, unpack_rows
from sparsec.encoding.codec_nm import rank_layout

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "int8": np.int8}
UNSTRUCTURED = ("dense", "bitmap", "rle", "coo", "csr", "csc")
NM_PATTERNS = [(2, 4), (1, 4), (4, 8), (2, 8), (1, 2), (3, 8), (2, 3), (2, 16)]


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.itemsize}")


def assert_bit_exact(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(bits(got), bits(want))


def random_tensor(rng: np.random.Generator, shape, dtype: str, p: float) -> np.ndarray:
    """Random bit patterns (NaNs, -0.0, infinities included); a fraction p set to +0 exactly."""
    dt = np.dtype(DTYPES[dtype])
    raw = rng.integers(1, 2 ** (8 * dt.itemsize), size=shape, dtype=np.uint64).astype(f"u{dt.itemsize}")
    raw[raw == 0] = 1
    raw[rng.random(shape) < p] = 0
    if raw.size and p < 1:  # a negative zero (sign bit only) and, for floats, a NaN
        raw.reshape(-1)[0] = 1 << (8 * dt.itemsize - 1)
        if dtype != "int8":
            raw.reshape(-1)[-1] = {"float16": 0x7E01, "bfloat16": 0x7FC1, "float32": 0x7FC00001}[dtype]
    return raw.view(dt)


def check_round_trip(a: np.ndarray, fmt: str, sizes: dict[str, int], **params) -> codec.Encoded:
    enc = codec.encode(a, fmt, **params)
    assert enc.format == fmt and enc.shape == a.shape and enc.dtype == a.dtype.name
    assert len(enc.payload) == sizes[fmt], (fmt, len(enc.payload), sizes[fmt])
    out = codec.decode(enc)
    assert_bit_exact(out, a)
    assert out.flags.writeable and out.flags.c_contiguous
    return enc


@st.composite
def unstructured_case(draw):
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.integers(0, 7)) for _ in range(ndim))
    p = draw(st.sampled_from([0.0, 1.0, 0.5, 0.9]) | st.floats(0, 1))
    rle_bits = draw(st.integers(1, 16))
    return random_tensor(np.random.default_rng(draw(st.integers(0, 2**32))), shape, dtype, p), rle_bits


@settings(max_examples=300, deadline=None)
@given(unstructured_case())
def test_unstructured_formats_round_trip_bit_for_bit_at_their_exact_size(case):
    a, rle_bits = case
    sizes = codec.candidate_sizes(a, rle_bits=rle_bits)
    assert set(sizes) == set(UNSTRUCTURED)
    for fmt in UNSTRUCTURED:
        check_round_trip(a, fmt, sizes, **({"rle_bits": rle_bits} if fmt == "rle" else {}))
    enc = codec.choose(a, rle_bits=rle_bits)
    assert enc.format == min(sizes, key=lambda f: (sizes[f], codec.FORMATS.index(f)))
    assert enc.nbytes == min(sizes.values())


def nm_tensor(rng, shape, dtype, n, m, axis, full: bool) -> np.ndarray:
    """At most n non-zeros per group of m along axis (exactly n when full)."""
    a = random_tensor(rng, shape, dtype, 0.0)
    moved = np.moveaxis(a, axis, -1)
    groups = moved.reshape(-1, m) if moved.size else moved.reshape(0, m)
    order = np.argsort(rng.random(groups.shape), axis=1)
    keep = np.full(groups.shape[0], n) if full else rng.integers(0, n + 1, groups.shape[0])
    groups[order >= keep[:, None]] = 0
    return np.ascontiguousarray(np.moveaxis(groups.reshape(moved.shape), -1, axis))


@st.composite
def nm_case(draw):
    n, m = draw(st.sampled_from(NM_PATTERNS))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    ndim = draw(st.integers(1, 4))
    axis = draw(st.integers(0, ndim - 1))
    shape = [draw(st.integers(0 if draw(st.booleans()) else 1, 5)) for _ in range(ndim)]
    shape[axis] = m * draw(st.integers(0, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32)))
    a = nm_tensor(rng, tuple(shape), dtype, n, m, axis, full=draw(st.booleans()))
    return a, n, m, axis - (ndim if draw(st.booleans()) else 0)


@settings(max_examples=300, deadline=None)
@given(nm_case())
def test_nm_formats_round_trip_on_any_axis_and_pad_short_groups(case):
    a, n, m, axis = case
    sizes = codec.candidate_sizes(a, nm=(n, m, axis))
    assert {"nm_hw", "nm_rank"} <= set(sizes)
    for fmt in ("nm_hw", "nm_rank"):
        enc = check_round_trip(a, fmt, sizes, n=n, m=m, axis=axis)
        assert enc.params["axis"] == axis % a.ndim
    enc = codec.choose(a, nm=(n, m, axis))
    assert enc.nbytes == min(sizes.values())
    assert_bit_exact(codec.decode(enc), a)


def test_nm_formats_are_rejected_when_the_pattern_breaks():
    a = np.ones((4, 8), np.float32)
    a[:, 1::4] = 0
    sizes = codec.candidate_sizes(a, nm=(2, 4, 1))
    assert "nm_hw" not in sizes and "nm_rank" not in sizes
    with pytest.raises(ValueError, match="not 2:4 along axis 1"):
        codec.encode(a, "nm_rank", n=2, m=4, axis=1)
    with pytest.raises(ValueError, match="multiple of 4"):
        codec.encode(np.zeros((4, 6), np.float32), "nm_hw", n=2, m=4, axis=1)
    assert codec.candidate_sizes(np.zeros((4, 6), np.float32), nm=(2, 4, 1)).keys() == set(UNSTRUCTURED)
    with pytest.raises(ValueError, match="needs an N:M pattern"):
        codec.choose(a, force="nm_hw")
    with pytest.raises(ValueError, match="1 <= N <= M"):
        codec.candidate_sizes(a, nm=(5, 4, 1))


def test_negative_zero_and_nan_are_values_and_survive_every_format():
    a = np.array([[0.0, -0.0, np.nan, 0.0], [-np.nan, 0.0, 0.0, -0.0]], np.float16)
    a[1, 0] = np.frombuffer(b"\x01\xfe", np.float16)[0]  # a NaN with payload bits and the sign set
    assert int(np.count_nonzero(bits(a))) == 4
    sizes = codec.candidate_sizes(a, nm=(2, 4, 1))
    for fmt in codec.FORMATS:
        kw = {"n": 2, "m": 4, "axis": 1} if fmt.startswith("nm") else {}
        check_round_trip(a, fmt, sizes, **kw)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(0,), (3, 0, 2), (), (5,), (2, 3, 4, 4)])
def test_empty_and_all_zero_tensors(dtype, shape):
    a = np.zeros(shape, DTYPES[dtype])
    nm = (2, 4, len(shape) - 1) if shape and shape[-1] % 4 == 0 else None
    sizes = codec.candidate_sizes(a, nm=nm)
    for fmt in sizes:
        kw = {"n": 2, "m": 4, "axis": nm[2]} if fmt.startswith("nm") else {}
        check_round_trip(a, fmt, sizes, **kw)
    if a.size == 0:
        assert codec.choose(a).format == "dense"  # every size is 0 or more: ties go to dense


@pytest.mark.parametrize("shape, coo, csr_idx, csc_idx", [
    ((2, 256), 2, 1, 1),      # 512 elements: flat index needs 2 bytes, column 255 fits 1
    ((2, 257), 2, 2, 1),      # column 256 needs 2 bytes
    ((2, 300), 2, 2, 1),
    ((300, 2), 2, 1, 2),      # row index 299 needs 2 bytes in CSC
    ((2, 70_000), 4, 4, 1),   # past 65,536: 4-byte column and flat indices
    ((1, 65_536), 2, 2, 1),   # largest index 65,535 still fits 2 bytes
    ((70_000,), 4, 4, 1),
])
def test_index_widths_follow_the_dimensions(shape, coo, csr_idx, csc_idx):
    rng = np.random.default_rng(0)
    a = random_tensor(rng, shape, "float16", 0.995)
    a.reshape(-1)[-1] = 1.0  # the largest index is used
    sizes = codec.candidate_sizes(a)
    assert check_round_trip(a, "coo", sizes).params["index_bytes"] == coo
    csr = check_round_trip(a, "csr", sizes)
    assert csr.params["index_bytes"] == csr_idx
    assert csr.params["pointer_bytes"] == (1 if csr.params["nnz"] < 256 else 2)
    assert check_round_trip(a, "csc", sizes).params["index_bytes"] == csc_idx
    for fmt in ("bitmap", "rle"):
        check_round_trip(a, fmt, sizes)


def test_csr_pointer_width_grows_with_nnz():
    a = np.ones((3, 100), np.int8)
    enc = codec.encode(a, "csr")
    assert enc.params["pointer_bytes"] == 2 and enc.params["index_bytes"] == 1
    assert_bit_exact(codec.decode(enc), a)


@pytest.mark.parametrize("rle_bits", [1, 2, 3, 4, 5, 8, 12, 16])
def test_rle_escapes_cover_runs_longer_than_the_code(rle_bits):
    a = np.zeros(200_000, np.float32)
    a[[0, 1, 17, 5_000, 70_000, 199_998]] = [1, -0.0, 3, np.nan, 5, 6]
    sizes = codec.candidate_sizes(a, rle_bits=rle_bits)
    enc = check_round_trip(a, "rle", sizes, rle_bits=rle_bits)
    escape = (1 << rle_bits) - 1
    runs = np.diff(np.flatnonzero(bits(a)), prepend=-1) - 1
    assert enc.params["entries"] == 6 + int((runs // escape).sum())
    assert enc.params["entries"] > 6 or rle_bits == 16


def test_rle_rejects_bad_bits():
    with pytest.raises(ValueError, match="rle_bits"):
        codec.encode(np.ones(4, np.float32), "rle", rle_bits=17)
    with pytest.raises(ValueError, match="rle_bits"):
        codec.candidate_sizes(np.ones(4, np.float32), rle_bits=0)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_nm_rank_metadata_is_within_one_percent_of_log2_c(n, m):
    rng = np.random.default_rng(1)
    a = nm_tensor(rng, (512, 1024), "float16", n, m, 1, full=True)
    enc = codec.encode(a, "nm_rank", n=n, m=m, axis=1)
    groups = a.size // m
    meta_bits = 8 * (enc.nbytes - groups * n * a.itemsize)
    bound = math.log2(math.comb(m, n))
    assert meta_bits / groups <= 1.01 * bound
    g, w = rank_layout(n, m)
    assert (enc.params["group_words"], enc.params["word_bits"]) == (g, w)
    assert codec.encode(a, "nm_hw", n=n, m=m, axis=1).nbytes > enc.nbytes


def test_rank_layouts_are_documented_values():
    assert rank_layout(2, 4) == (5, 13)  # 6**5 = 7776 <= 2**13: 2.6 bits per group
    assert rank_layout(1, 4) == (1, 2)
    assert rank_layout(4, 8) == (6, 37)
    assert rank_layout(2, 8) == (6, 29)


def test_nm_hw_matches_the_cutlass_2_4_metadata_before_reordering():
    """Each group's two kept indices, low index in the low 2 bits, groups packed LSB first."""
    a = np.zeros((1, 16), np.float16)
    kept = [(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3), (3,), ()]  # the last two are padded
    for g, pos in enumerate(kept[:4]):
        a[0, 4 * g + np.array(pos)] = 1.0
    enc = codec.encode(a, "nm_hw", n=2, m=4, axis=1)
    meta = np.frombuffer(enc.payload[8 * 2:], np.uint16)
    assert meta.tolist() == [0b0100 | 0b1000 << 4 | 0b1001 << 8 | 0b1100 << 12]
    b = np.zeros((1, 8), np.float16)
    b[0, 3] = 2.0  # one non-zero: padded with position 0; none: positions 0 and 1
    enc = codec.encode(b, "nm_hw", n=2, m=4, axis=1)
    assert enc.payload[8:] == bytes([0b1100 | 0b0100 << 4])
    assert_bit_exact(codec.decode(enc), b)


def test_auto_picks_the_smallest_and_force_overrides():
    rng = np.random.default_rng(2)
    sparse = random_tensor(rng, (64, 64), "float32", 0.97)
    assert codec.choose(sparse).format in ("coo", "csr", "csc", "rle")
    assert codec.choose(random_tensor(rng, (64, 64), "float32", 0.0)).format == "dense"
    half = random_tensor(rng, (64, 64), "float16", 0.5)
    assert codec.choose(half).format == "bitmap"
    nm = nm_tensor(rng, (64, 64), "float16", 2, 4, 1, full=True)
    assert codec.choose(nm, nm=(2, 4, 1)).format == "nm_rank"
    assert codec.choose(nm, nm=(2, 4, 1), force="csr").format == "csr"
    assert codec.choose(nm, force="auto").format == "bitmap"
    with pytest.raises(ValueError, match="unknown encoding"):
        codec.choose(nm, force="zip")


def test_formula_estimates_match_the_lecture():
    assert codec.formula_estimate("dense", (1000,), 100, 16) == 2000
    assert codec.formula_estimate("bitmap", (1000,), 100, 16) == (100 * 16 + 1000) // 8
    assert codec.formula_estimate("coo", (1000,), 100, 16) == 100 * (16 + 16) // 8
    assert codec.formula_estimate("csr", (10, 100), 100, 16) == (100 * (16 + 8) + 11 * 8) // 8
    assert codec.formula_estimate("rle", (1000,), 100, 16, rle_bits=8) == math.ceil(100 * 24 / 8)
    assert codec.formula_estimate("nm_hw", (16, 16), 128, 16, n=2, m=4) == (128 * 16 + 128 * 2) // 8
    assert codec.formula_estimate("nm_rank", (16, 16), 128, 16, n=2, m=4) == math.ceil(
        (128 * 16 + 64 * math.log2(6)) / 8)
    rng = np.random.default_rng(3)
    a = random_tensor(rng, (256, 256), "float16", 0.7)
    est = codec.formula_estimates(a)
    sizes = codec.candidate_sizes(a)
    for fmt in ("dense", "bitmap", "coo", "csr", "csc"):
        assert est[fmt] == sizes[fmt]  # closed forms: the estimate is the size
    assert abs(est["rle"] - sizes["rle"]) / sizes["rle"] < 0.02


def test_decode_rejects_corrupt_payloads_with_value_errors():
    rng = np.random.default_rng(4)
    a = nm_tensor(rng, (8, 16), "float32", 2, 4, 1, full=True)
    for fmt in codec.FORMATS:
        kw = {"n": 2, "m": 4, "axis": 1} if fmt.startswith("nm") else {}
        enc = codec.encode(a, fmt, **kw)
        short = codec.Encoded(enc.format, enc.shape, enc.dtype, enc.params, enc.payload[:-1])
        with pytest.raises(ValueError, match="corrupt"):
            codec.decode(short)
    enc = codec.encode(a, "coo")
    bad = bytearray(enc.payload)
    bad[-1] = 0xFF  # flat index beyond the tensor
    with pytest.raises(ValueError, match="outside"):
        codec.decode(codec.Encoded("coo", enc.shape, enc.dtype, enc.params, bytes(bad)))
    enc = codec.encode(a, "nm_hw", n=2, m=4, axis=1)
    bad = bytearray(enc.payload)
    bad[-1] = 0  # positions (0, 0): not ascending
    with pytest.raises(ValueError, match="ascending"):
        codec.decode(codec.Encoded("nm_hw", enc.shape, enc.dtype, enc.params, bytes(bad)))
    enc = codec.encode(a, "nm_rank", n=2, m=4, axis=1)
    with pytest.raises(ValueError, match="word_bits"):
        params = {**enc.params, "word_bits": 12}
        codec.decode(codec.Encoded("nm_rank", enc.shape, enc.dtype, params, enc.payload))
    with pytest.raises(ValueError, match="nnz"):
        enc = codec.encode(a, "bitmap")
        codec.decode(codec.Encoded("bitmap", enc.shape, enc.dtype, {"nnz": "x"}, enc.payload))


@settings(max_examples=80, deadline=None)
@given(st.sampled_from([*range(1, 58), 64]), st.integers(0, 70_000), st.integers(0, 2**32))
def test_bit_streams_round_trip_across_chunks(width, count, seed):
    codes = np.random.default_rng(seed).integers(0, 2**width, count, dtype=np.uint64)
    packed = pack_bits(codes, width)
    assert packed.size == (count * width + 7) // 8
    np.testing.assert_array_equal(unpack_bits(packed, width, count).astype(np.uint64), codes)
    rows = codes[: count // 7 * 7].reshape(7, -1)
    packed_rows = pack_rows(rows, width)
    assert packed_rows.shape == (7, (rows.shape[1] * width + 7) // 8)
    np.testing.assert_array_equal(unpack_rows(packed_rows, width, rows.shape[1]).astype(np.uint64), rows)


@pytest.mark.parametrize("n, m, axis", [(2, 4, 0), (2, 4, 1), (4, 8, 0), (1, 4, 1), (3, 8, 1), (2, 16, 0)])
def test_nm_round_trips_on_large_tensors(n, m, axis):
    rng = np.random.default_rng(5)
    a = nm_tensor(rng, (512, 384), "float16", n, m, axis, full=False)
    sizes = codec.candidate_sizes(a, nm=(n, m, axis))
    for fmt in codec.FORMATS:
        check_round_trip(a, fmt, sizes, **({"n": n, "m": m, "axis": axis} if fmt.startswith("nm") else {}))


def test_non_contiguous_and_big_endian_inputs_encode_their_values():
    a = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    big = np.array([[1.5, 0.0, -0.0, np.nan]], dtype=">f4")
    for src in (a, big):
        want = np.ascontiguousarray(src, dtype=src.dtype.newbyteorder("="))
        for fmt in UNSTRUCTURED:
            assert_bit_exact(codec.decode(codec.encode(src, fmt)), want)
