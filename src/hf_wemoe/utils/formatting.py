"""Sizes and messages as the command line prints them: one home for each format."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(value: int | str) -> int:
    """Bytes in a size such as 5GB, 500MB, 2GiB or a plain integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"size must be positive, got {value}")
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"size must look like 5GB, 500MB or 2GiB, got {value!r}")
    size = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").upper()])
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


def format_size(size: int | float) -> str:
    """Bytes as a short human-readable size in decimal units (`512 B`, `1.50 MB`, `2.04 GB`)."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    return f"{size:.2f} GB"


def one_line(err: BaseException | str) -> str:
    """An exception (or text) as one line: its whitespace folded, or its type name when it has no message."""
    text = " ".join(str(err).split())
    if text:
        return text
    return type(err).__name__ if isinstance(err, BaseException) else ""


def first_line(err: BaseException | str) -> str:
    """The first line of an exception's message (libraries put a traceback-like tail below it), or its type."""
    text = str(err).strip()
    if text:
        return text.splitlines()[0]
    return type(err).__name__ if isinstance(err, BaseException) else ""
