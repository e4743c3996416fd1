"""One progress and logging policy for every long command.

- On a terminal, long work draws a tqdm bar on stderr.
- When stderr is not a terminal (CI logs, files, pipes), it writes plain periodic log lines instead
  (`stage: step/total, rate`), never carriage-return bar spam.
- `--quiet` and `HF_HUB_DISABLE_PROGRESS_BARS` turn both off; `-v` shows the package's own debug lines, while
  third-party libraries stay at warnings.

The command line calls `set_verbosity` once; library code calls `progress(...)` and `progress_enabled()`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

logger = logging.getLogger("hf_wemoe")

_state = {"quiet": False, "verbose": False}
# Seconds between two log lines when stderr is not a terminal.
LOG_INTERVAL = 10.0


def set_verbosity(quiet: bool = False, verbose: bool = False) -> None:
    """Configure logging for a command-line run: package debug lines with `verbose`, no progress with `quiet`."""
    _state["quiet"], _state["verbose"] = bool(quiet), bool(verbose)
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def _hub_bars_disabled() -> bool:
    return os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def progress_enabled(show: bool | None = None) -> bool:
    """Whether long work reports progress: `show` when given, else off under `--quiet` or
    `HF_HUB_DISABLE_PROGRESS_BARS`, on otherwise."""
    if show is not None:
        return bool(show)
    return not (_state["quiet"] or _hub_bars_disabled())


def progress(
    iterable: Iterable[T],
    desc: str = "",
    total: int | None = None,
    unit: str = "it",
    show: bool | None = None,
    **postfix: Any,
) -> Iterable[T]:
    """Wrap `iterable` with the policy: a bar on a terminal, log lines elsewhere, nothing when disabled."""
    if not progress_enabled(show):
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)
    return _logged(iterable, desc, total, unit)


def _logged(iterable: Iterable[T], desc: str, total: int | None, unit: str) -> Iterator[T]:
    start = last = time.monotonic()
    count = 0
    for item in iterable:
        yield item
        count += 1
        now = time.monotonic()
        if now - last >= LOG_INTERVAL or (total is not None and count == total):
            rate = count / max(now - start, 1e-9)
            of = f"/{total}" if total is not None else ""
            print(f"{desc}: {count}{of} {unit} ({rate:.2f} {unit}/s)", file=sys.stderr, flush=True)
            last = now


__all__ = ["LOG_INTERVAL", "progress", "progress_enabled", "set_verbosity"]
