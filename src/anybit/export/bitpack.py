"""Integer codes packed at ``b`` bits each (1..8), little-endian within a byte stream.

``pack_codes(codes, 3)`` stores eight 3-bit codes in three bytes; ``unpack_codes`` inverts it exactly and
refuses a buffer whose length does not match the code count (a truncated or padded file).
"""

from __future__ import annotations

import numpy as np
import torch

PACK_BITS = tuple(range(1, 9))


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if bits not in PACK_BITS:
        raise ValueError(f"codes are packed at 1..8 bits, not {bits}")


def pack_codes(codes: torch.Tensor | np.ndarray, bits: int) -> torch.Tensor:
    """Pack unsigned integer ``codes`` (each in ``[0, 2**bits - 1]``) into a flat ``uint8`` tensor."""
    _check_bits(bits)
    flat = np.asarray(codes.cpu() if isinstance(codes, torch.Tensor) else codes).reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] to be packed at {bits} bits "
                         f"(got [{flat.min()}, {flat.max()}])")
    if bits == 8:
        return torch.from_numpy(flat.astype(np.uint8))
    planes = ((flat[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_codes(data: torch.Tensor | np.ndarray, bits: int, count: int) -> torch.Tensor:
    """The ``count`` codes packed by :func:`pack_codes` at ``bits`` bits, as an ``int64`` tensor."""
    _check_bits(bits)
    raw = np.asarray(data.cpu() if isinstance(data, torch.Tensor) else data).reshape(-1)
    if raw.dtype != np.uint8:
        raise ValueError(f"packed codes must be uint8 bytes, not {raw.dtype}")
    expected = packed_nbytes(count, bits)
    if raw.size != expected:
        raise ValueError(f"{count} codes at {bits} bits take {expected} bytes, the data has {raw.size}")
    if bits == 8:
        return torch.from_numpy(raw.astype(np.int64))
    planes = np.unpackbits(raw, count=count * bits, bitorder="little").reshape(count, bits).astype(np.int64)
    return torch.from_numpy((planes << np.arange(bits)).sum(axis=1))
