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


def _read_bytes(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetFormatError(f"{path}: not a readable gzip file ({e}); delete it and get the file again") from e


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed if named ``*.gz``) into a native-endian numpy array.

    Raises DatasetFormatError when the magic number, the header or the file size is wrong.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DatasetFormatError(f"{path}: {len(raw)} bytes, too short for an IDX header; the file is truncated")
    (magic,) = struct.unpack(">I", raw[:4])
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
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: header needs {header} bytes but the file has {len(raw)}; truncated")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _DTYPES[code]
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DatasetFormatError(
            f"{path}: header says shape {tuple(dims)} ({expected} bytes) but the file has {len(raw)} bytes; {problem}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=True)


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
