"""``weights.sparsec``: one file holding every encoded weight, memory-mappable, checksummed.

Layout (docs/FORMAT.md): 8-byte magic, uint32 LE version, uint64 LE manifest length, uint32 LE
CRC32 of the manifest, the UTF-8 JSON manifest, zero padding to a multiple of 64, then the
payloads, each starting at a multiple of 64 from the start of the data section. Readers check
magic, version, bounds and CRC32s before decoding, and every failure is a one-line SparsecError
that names the file and the tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sparsec.encoding.codec import FORMATS, Encoded, decode_buffer
from sparsec.encoding.codec_bits import DTYPES
from sparsec.errors import SparsecError

MAGIC = b"SPARSEC\0"
VERSION = 1
ALIGN = 64
HEADER = struct.Struct("<8sIQI")  # magic, version, manifest length, manifest CRC32: 24 bytes
_KEYS = {"name": str, "shape": list, "dtype": str, "format": str, "params": dict, "offset": int,
         "length": int, "checksum": str}


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _checksum(data: Any) -> str:
    return f"crc32:{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def write_container(path: Path | str, tensors: dict[str, Encoded]) -> None:
    """Write all tensors atomically (temporary file in the same folder, then os.replace)."""
    stream_container(path, tensors.items())


def stream_container(path: Path | str, tensors: Iterable[tuple[str, Encoded]]) -> None:
    """Write (name, encoding) pairs one at a time: given a generator, a model's blobs never sit in
    memory together. The payloads go to a scratch file first (the manifest, which comes first,
    needs every checksum), which is then copied behind the header; the file appears atomically."""
    path = Path(path)
    entries: list[dict] = []
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    scratch = Path(tmp + ".data")
    try:
        with open(scratch, "wb") as data:
            for name, enc in tensors:
                if not isinstance(name, str) or not name:
                    raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
                if enc.format not in FORMATS or enc.dtype not in DTYPES:
                    raise ValueError(f"tensor {name!r}: unknown format {enc.format!r} or dtype {enc.dtype!r}")
                data.write(bytes(_align(data.tell()) - data.tell()))
                entries.append({"name": name, "shape": [int(d) for d in enc.shape], "dtype": enc.dtype,
                                "format": enc.format, "params": enc.params, "offset": data.tell(),
                                "length": len(enc.payload), "checksum": _checksum(enc.payload)})
                data.write(enc.payload)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600: the container gets the mode of a plain open()
        with os.fdopen(fd, "wb") as f, open(scratch, "rb") as data:
            head = _head(entries)
            f.write(head + bytes(_align(len(head)) - len(head)))
            shutil.copyfileobj(data, f, 16 << 20)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        scratch.unlink(missing_ok=True)


def _head(entries: list[dict]) -> bytes:
    manifest = json.dumps({"alignment": ALIGN, "tensors": entries}, separators=(",", ":")).encode()
    return HEADER.pack(MAGIC, VERSION, len(manifest), zlib.crc32(manifest)) + manifest


def _corrupt(path: Path, detail: str) -> SparsecError:
    return SparsecError(f"corrupt manifest in {path}: {detail}", hint="write the container again")


def _read_head(path: Path) -> tuple[list[dict], int, int]:
    """(manifest entries, absolute start of the data section, file size), all checked."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
    except OSError as e:
        raise SparsecError(f"cannot read {path}: {e.strerror or e}") from e
    if head[:len(MAGIC)] != MAGIC:
        raise SparsecError(f"not a sparsec container: {path}", hint="the file does not start with SPARSEC\\0")
    if len(head) < HEADER.size:
        raise SparsecError(f"container truncated: the header needs {HEADER.size} bytes, "
                           f"file has {size}: {path}")
    _, version, length, crc = HEADER.unpack(head)
    if version != VERSION:
        raise SparsecError(f"unsupported sparsec container version {version} in {path}",
                           hint=f"this sparsec reads version {VERSION}")
    if HEADER.size + length > size:
        raise SparsecError(f"container truncated: the manifest needs bytes {HEADER.size}.."
                           f"{HEADER.size + length}, file has {size}: {path}")
    with open(path, "rb") as f:
        f.seek(HEADER.size)
        raw = f.read(length)
    if zlib.crc32(raw) != crc:
        raise _corrupt(path, f"manifest checksum mismatch (stored crc32:{crc:08x}, computed "
                             f"crc32:{zlib.crc32(raw):08x})")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"not JSON ({e})") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("tensors"), list):
        raise _corrupt(path, "no 'tensors' list")
    seen = set()
    for entry in manifest["tensors"]:
        if not isinstance(entry, dict):
            raise _corrupt(path, "a tensor entry is not an object")
        for key, kind in _KEYS.items():
            if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
                raise _corrupt(path, f"tensor {entry.get('name')!r} has no valid {key!r}")
        if entry["name"] in seen:
            raise _corrupt(path, f"tensor {entry['name']!r} appears twice")
        seen.add(entry["name"])
        if entry["offset"] < 0 or entry["offset"] % ALIGN or entry["length"] < 0:
            raise _corrupt(path, f"tensor {entry['name']!r} has a bad offset or length")
    return manifest["tensors"], _align(HEADER.size + length), size


def read_manifest(path: Path | str) -> list[dict]:
    """The manifest entries (name, shape, dtype, format, params, offset, length, checksum)."""
    return _read_head(Path(path))[0]


def _select(path: Path, entries: list[dict], names: list[str] | None) -> list[dict]:
    if names is None:
        return entries
    by_name = {e["name"]: e for e in entries}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise SparsecError(f"no tensor named {missing[0]!r} in {path}")
    return [by_name[n] for n in names]


def _payload(path: Path, data: np.ndarray, entry: dict, start: int, size: int, verify: bool) -> np.ndarray:
    """The entry's payload bytes as a view of the mapped file, bounds- and checksum-checked."""
    lo = start + entry["offset"]
    hi = lo + entry["length"]
    if hi > size:
        raise SparsecError(f"container truncated: tensor {entry['name']!r} needs bytes {lo}..{hi}, "
                           f"file has {size}: {path}")
    buf = data[lo:hi]
    if verify and _checksum(buf) != entry["checksum"]:
        raise SparsecError(f"checksum mismatch for tensor {entry['name']!r} in {path}: stored "
                           f"{entry['checksum']}, computed {_checksum(buf)}", hint="the file is corrupt")
    return buf


def _encoded(entry: dict, payload: bytes = b"") -> Encoded:
    return Encoded(entry["format"], tuple(entry["shape"]), entry["dtype"], entry["params"], payload)


def _map(path: Path, size: int) -> np.ndarray:
    if size == 0:
        return np.empty(0, np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)


def read_container(path: Path | str, *, names: list[str] | None = None,
                   verify: bool = True) -> dict[str, np.ndarray]:
    """Decode the named tensors (default: all) from a memory map of the file."""
    return dict(iter_container(path, names=names, verify=verify))


def iter_container(path: Path | str, *, names: list[str] | None = None,
                   verify: bool = True) -> Iterator[tuple[str, np.ndarray]]:
    """(name, values) of the named tensors (default: all), decoded one at a time, in file order."""
    path = Path(path)
    entries, start, size = _read_head(path)
    chosen = _select(path, entries, names)
    data = _map(path, size)
    for entry in chosen:
        buf = _payload(path, data, entry, start, size, verify)
        try:
            values = decode_buffer(_encoded(entry), buf)
        except ValueError as e:
            raise SparsecError(f"cannot decode tensor {entry['name']!r} in {path}: {e}") from e
        yield entry["name"], values


def read_encoded(path: Path | str, name: str, *, verify: bool = True) -> Encoded:
    """One tensor's stored encoding, payload copied out of the file."""
    path = Path(path)
    entries, start, size = _read_head(path)
    entry = _select(path, entries, [name])[0]
    return _encoded(entry, _payload(path, _map(path, size), entry, start, size, verify).tobytes())
