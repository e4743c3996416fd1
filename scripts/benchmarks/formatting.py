"""How measurements are written in the report (also the filters of its template)."""

from __future__ import annotations

import statistics

from benchmarks.settings import GiB


def fmt_seconds(values: list[float]) -> str:
    """The median of repeated times, with their range when there is more than one ("-" for none)."""
    if not values:
        return "-"
    median = statistics.median(values)
    spread = f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""
    return f"{median:.3f} s{spread}"


def fmt_gib(value: float | None) -> str:
    """Bytes in GiB with two decimals ("-" for unknown)."""
    return "-" if value is None else f"{value / GiB:.2f} GiB"


def fmt_status(ok: bool | None) -> str:
    """Whether a target was met; missed targets stand out."""
    return "n/a" if ok is None else ("met" if ok else "**missed**")
