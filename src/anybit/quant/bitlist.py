"""Parse bit-width lists such as ``"1,2,4,8,32"`` or ``"1-8,32"``."""

from __future__ import annotations

from .functional import BitsError, check_bits


def parse_bit_list(text: str | list | tuple, allow_duplicates: bool = False) -> list[int]:
    """Bit-widths from ``"1,2,4-8,32"`` (or a list of ints), in the order given.

    Empty lists, values outside 1..16/32 and (unless allowed) duplicates raise :class:`BitsError`.
    """
    items: list[int] = []
    parts = text if isinstance(text, (list, tuple)) else [p.strip() for p in str(text).split(",") if p.strip()]
    for part in parts:
        if isinstance(part, str) and "-" in part.strip("-"):
            lo, hi = part.split("-", 1)
            try:
                lo_i, hi_i = int(lo), int(hi)
            except ValueError:
                raise BitsError(f"bit range {part!r} is not of the form LOW-HIGH (e.g. 1-8)") from None
            if lo_i > hi_i:
                raise BitsError(f"bit range {part!r} is empty: LOW must not exceed HIGH")
            items.extend(range(lo_i, hi_i + 1))
        else:
            try:
                items.append(int(part))
            except (TypeError, ValueError):
                raise BitsError(f"{part!r} in the bit list {text!r} is not an integer") from None
    if not items:
        raise BitsError(f"the bit list {text!r} is empty: give at least one bit-width, e.g. 1,2,4,8,32")
    for b in items:
        check_bits(b, "bit-width")
    if not allow_duplicates and len(set(items)) != len(items):
        dups = sorted({b for b in items if items.count(b) > 1})
        raise BitsError(f"the bit list {text!r} repeats {dups}: give each bit-width once")
    return items
