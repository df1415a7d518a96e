"""Parse bit-width lists such as ``"1,2,4,8,32"`` or ``"1-8,32"``."""

from __future__ import annotations

import re

from .functional import FLOAT_BITS, VALID_BITS, BitsError, check_bits

_NUMBER = re.compile(r"[0-9]+\Z")              # ASCII digits only (int() also takes "1_6" and "٤")
_RANGE = re.compile(r"([0-9]+)-([0-9]+)\Z")


def parse_bit_list(text: str | list | tuple, allow_duplicates: bool = False) -> list[int]:
    """Bit-widths from ``"1,2,4-8,32"`` (or a list of ints), in the order given.

    Empty lists and empty items (``"1,,2"``), anything but plain ASCII numbers, values outside
    1..16/32 and (unless allowed) duplicates raise :class:`BitsError`. Ranges are checked against
    the valid bit-widths before they are expanded.
    """
    items: list[int] = []
    if isinstance(text, (list, tuple)):
        parts = list(text)
    else:
        parts = [p.strip() for p in str(text).split(",")]
        if len(parts) > 1 and any(not p for p in parts):
            raise BitsError(f"the bit list {text!r} has an empty item: give bit-widths separated by single commas, "
                            f"e.g. 1,2,4,8,32")
        parts = [p for p in parts if p]
    for part in parts:
        if isinstance(part, str):
            match = _RANGE.match(part)
            if match:
                lo, hi = int(match[1]), int(match[2])
                for end in (lo, hi):
                    if end not in VALID_BITS:
                        raise BitsError(f"bit range {part!r}: {end} is not a valid bit-width (1..16, or 32 for "
                                        f"full precision)")
                if lo > hi:
                    raise BitsError(f"bit range {part!r} is empty: LOW must not exceed HIGH")
                items.extend(range(lo, hi + 1))
                continue
            if "-" in part.strip("-"):
                raise BitsError(f"bit range {part!r} is not of the form LOW-HIGH (e.g. 1-8)")
            if not _NUMBER.match(part):
                raise BitsError(f"{part!r} in the bit list {text!r} is not a bit-width: expected plain numbers "
                                f"(1..16, or {FLOAT_BITS} for full precision), e.g. 1,2,4,8,32")
            items.append(int(part))
        else:
            items.append(part)
    if not items:
        raise BitsError(f"the bit list {text!r} is empty: give at least one bit-width, e.g. 1,2,4,8,32")
    for b in items:
        check_bits(b, "bit-width")
    if not allow_duplicates and len(set(items)) != len(items):
        dups = sorted({b for b in items if items.count(b) > 1})
        raise BitsError(f"the bit list {text!r} repeats {dups}: give each bit-width once")
    return items
