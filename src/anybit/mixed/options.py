"""Precision options of the allocator: ``(w_bits, a_bits)`` pairs built from a bit list."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..quant import FLOAT_BITS, BitsError, check_bits, parse_bit_list
from .errors import MixedBitsError, MixedPrecisionError

Option = tuple[int, int]


def resolve_options(options: str | Iterable[int | Sequence[int]], a_bits: int | None = None) -> list[Option]:
    """``(w, a)`` pairs from ``"2,3,4,8"``, ``[2, 3, 4, 8]`` or explicit pairs ``[(4, 8), (8, 8)]``.

    Plain bit-widths become ``(b, b)`` when ``a_bits`` is None (activations follow weights) and
    ``(b, a_bits)`` otherwise. The result is sorted (lowest precision first) and has no duplicates.
    """
    try:
        return _resolve(options, a_bits)
    except BitsError as e:
        if isinstance(e, MixedPrecisionError):
            raise
        raise MixedBitsError(str(e)) from None


def _resolve(options, a_bits: int | None) -> list[Option]:
    if a_bits is not None:
        a_bits = check_bits(a_bits, "a_bits")
    if isinstance(options, str):
        options = parse_bit_list(options)
    pairs: list[Option] = []
    for item in options:
        if isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise MixedPrecisionError(f"option {item!r} is not a bit-width or a (w_bits, a_bits) pair")
            pair = (check_bits(int(item[0]), "option w_bits"), check_bits(int(item[1]), "option a_bits"))
        else:
            w = check_bits(item, "option")
            pair = (w, a_bits if a_bits is not None else w)
        if pair not in pairs:
            pairs.append(pair)
    if not pairs:
        raise MixedPrecisionError("options is empty: give at least one bit-width, e.g. 2,3,4,8")
    return sorted(pairs)


def option_label(option: Option) -> str:
    """``"4"`` for W4A4, ``"w4a8"`` otherwise, ``"32"`` for float."""
    w, a = option
    if w == a:
        return "float" if w == FLOAT_BITS else str(w)
    return f"w{w}a{a}"
