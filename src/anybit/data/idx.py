"""Reader and writer for the IDX format of (Fashion-)MNIST, with header and size checks."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .errors import DatasetFormatError

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801

_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


MAX_IDX_BYTES = 2**30   # the largest IDX payload read (Fashion-MNIST's training images are 47 MB)


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_exact(f, n: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        chunk = f.read(min(left, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed if named ``*.gz``) into a native-endian numpy array.

    The header is read and checked first, so a file that claims (or decompresses to) more than
    :data:`MAX_IDX_BYTES` is refused before it is decompressed. Raises DatasetFormatError when the
    magic number, the header or the file size is wrong.
    """
    path = Path(path)
    try:
        with _open(path) as f:
            return _read_idx(f, path, expected_magic)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DatasetFormatError(f"{path}: not a readable gzip file ({e}); delete it and get the file again") from e


def _read_idx(f, path: Path, expected_magic: int | None) -> np.ndarray:
    head = _read_exact(f, 4)
    if len(head) < 4:
        raise DatasetFormatError(f"{path}: {len(head)} bytes, too short for an IDX header; the file is truncated")
    (magic,) = struct.unpack(">I", head)
    code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    if expected_magic is not None and magic != expected_magic:
        raise DatasetFormatError(
            f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}; not the right IDX file"
        )
    if magic >> 16 != 0 or code not in _DTYPES or ndim == 0:
        raise DatasetFormatError(
            f"{path}: bad IDX magic number 0x{magic:08x}; expected 0x0000TTNN with type TT in "
            f"{[f'{c:02x}' for c in _DTYPES]} and NN dimensions"
        )
    raw_dims = _read_exact(f, 4 * ndim)
    header = 4 + 4 * ndim
    if len(raw_dims) < 4 * ndim:
        raise DatasetFormatError(f"{path}: header needs {header} bytes but the file has {4 + len(raw_dims)}; truncated")
    dims = struct.unpack(f">{ndim}I", raw_dims)
    dtype = _DTYPES[code]
    payload = math.prod(dims) * dtype.itemsize
    if payload > MAX_IDX_BYTES:
        raise DatasetFormatError(
            f"{path}: header says shape {tuple(dims)} ({payload:,} bytes), more than anybit reads from an IDX file "
            f"({MAX_IDX_BYTES:,} bytes); the file is corrupt or not a dataset file"
        )
    data = _read_exact(f, payload + 1)
    if len(data) != payload:
        problem = "truncated" if len(data) < payload else "has trailing bytes"
        size = header + len(data) if len(data) < payload else f"more than {header + payload}"
        raise DatasetFormatError(
            f"{path}: header says shape {tuple(dims)} ({header + payload} bytes) but the file has {size} bytes; {problem}"
        )
    array = np.frombuffer(data, dtype=dtype).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzip-compressed if named ``*.gz``), e.g. for small test fixtures."""
    path = Path(path)
    array = np.asarray(array)
    codes = {dtype.newbyteorder("=").str: code for code, dtype in _DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("=").str)
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}; use one of uint8, int8, int16, int32, float32, float64")
    header = struct.pack(f">I{array.ndim}I", (code << 8) | array.ndim, *array.shape)
    payload = header + array.astype(_DTYPES[code], copy=False).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
