"""Sizes as qemu-img spells them: 1G, 512M, 64k, 1T; binary multiples."""

from __future__ import annotations

import math

from .errors import RequestError

SECTOR_SIZE = 512
_SUFFIXES = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_SIZE_PATTERN = r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpeb]?)(?:i?b)?\s*$"


def parse_size(text: str | int, default_suffix: str = "") -> int:
    """Parse '10G', '1.5M', '512', '64K' (qemu-img's suffixes, powers of 1024)."""
    if isinstance(text, int):
        return text
    # The usual spellings ("4k", "512", "1G") without re, which costs `vdisk convert` (whose
    # -S default is one) a good part of a bare start; the pattern below reads the same.
    number, suffix = text[:-1], text[-1:].lower()
    if text.isascii() and text.isdigit():
        return int(text) << _SUFFIXES[default_suffix.lower()]
    if number.isascii() and number.isdigit() and suffix in "kmgtpeb":
        return int(number) << _SUFFIXES[suffix]
    import re  # here: `vdisk info` formats sizes and never parses one

    m = re.match(_SIZE_PATTERN, text, re.IGNORECASE)
    if not m:
        raise RequestError(
            f"invalid size {text!r}: expected a number with an optional k, M, G, T, P or E suffix"
        )
    number, suffix = m.group(1), (m.group(2) or default_suffix).lower()
    value = (
        float(number) * (1 << _SUFFIXES[suffix])
        if "." in number
        else int(number) << _SUFFIXES[suffix]
    )
    if value != int(value):
        raise RequestError(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def format_size(n: int) -> str:
    """Human size exactly as qemu-img prints it: '1 GiB', '196 KiB', '1.5 MiB', '512 B'."""
    # Switch to the next unit once the integer part would reach 1000 (as QEMU's size_to_str).
    exponent = math.frexp(n / (1000.0 / 1024.0))[1]
    unit = max(0, (exponent - 1) // 10)
    return f"{n / (1 << (unit * 10)):.3g} {_UNITS[unit]}B"


_UNITS = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")


def round_up_to_sector(size: int) -> int:
    """``size`` rounded up to whole 512-byte sectors (how QEMU sizes raw files and new images)."""
    return -(-size // SECTOR_SIZE) * SECTOR_SIZE

