"""One progress and logging policy for every long command.

- On a terminal, long work draws a tqdm bar on stderr.
- When stderr is not a terminal (CI logs, files, pipes), it writes plain log lines instead, one when a stage
  starts, then one every `LOG_INTERVAL` seconds and one when it ends (`stage: step/total unit (rate), loss=...`),
  never carriage-return bar spam.
- `--quiet` and `HF_HUB_DISABLE_PROGRESS_BARS` turn both off. Library functions take `progress`/`show`:
  None follows this policy, False turns progress off, True turns it on whatever the policy says.
- `-v` shows the package's own debug lines (logger `hf_wemoe`); third-party libraries stay at warnings, and
  their own per-call bars and advisory messages are held back by `quiet_libraries`.

The command line calls `set_verbosity` once; library code calls `progress(...)`, `progress_bar(...)`,
`progress_enabled()` and `quiet_libraries(...)`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

logger = logging.getLogger("hf_wemoe")

_state = {"quiet": False, "verbose": False}
# Seconds between two log lines when stderr is not a terminal.
LOG_INTERVAL = 10.0
_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def set_verbosity(quiet: bool = False, verbose: bool = False) -> None:
    """Configure logging for a command-line run: package debug lines with `verbose`, no progress with `quiet`.

    Third-party loggers stay at warnings, also with `verbose`. An application that configured logging itself
    keeps its handlers (as with `logging.basicConfig`).
    """
    _state["quiet"], _state["verbose"] = bool(quiet), bool(verbose)
    logging.basicConfig(level=logging.WARNING, format=_LOG_FORMAT)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def is_verbose() -> bool:
    """Whether the command line asked for debug output (`-v`)."""
    return _state["verbose"]


def _hub_bars_disabled() -> bool:
    return os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def progress_enabled(show: bool | None = None) -> bool:
    """Whether long work reports progress: `show` when given, else off under `--quiet` or
    `HF_HUB_DISABLE_PROGRESS_BARS`, on otherwise."""
    if show is not None:
        return bool(show)
    return not (_state["quiet"] or _hub_bars_disabled())


def _on_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def bars_on_terminal(show: bool | None = None) -> bool:
    """Whether progress shows as bars: enabled by the policy and stderr is a terminal."""
    return progress_enabled(show) and _on_terminal()


class ProgressBar:
    """Progress of one stage, updated by hand: a tqdm bar on a terminal, periodic log lines elsewhere.

    `update(n, **postfix)` advances by `n` steps and shows `postfix` (e.g. `loss="0.123"`) with the count.
    A disabled bar does nothing. Use it as a context manager or call `close()`.
    """

    def __init__(
        self,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        show: bool | None = None,
        initial: int = 0,
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.count = initial
        self.enabled = progress_enabled(show)
        self._bar: Any = None
        self._postfix: dict[str, Any] = {}
        self._start = self._last = time.monotonic()
        self._start_count = initial
        self._logged_count: int | None = None
        if not self.enabled:
            return
        if _on_terminal():
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                file=sys.stderr,
                dynamic_ncols=True,
                leave=False,
            )
        elif total is None or total > 1:
            # Say at once which stage runs: the first periodic line may be minutes away.
            self._log()

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by `n` steps; `postfix` values are shown beside the count."""
        if not self.enabled:
            return
        self.count += n
        self._postfix.update(postfix)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(self._postfix, refresh=False)
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= LOG_INTERVAL or (self.total is not None and self.count >= self.total):
            self._log(now)

    def close(self) -> None:
        """End the stage: closes the bar, or writes the last log line if the final count was not logged."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._logged_count != self.count:
            self._log()
        self.enabled = False

    def _log(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        of = f"/{self.total}" if self.total is not None else ""
        text = f"{self.desc}: {self.count}{of} {self.unit}"
        done = self.count - self._start_count
        if done > 0:
            text += f" ({done / max(now - self._start, 1e-9):.2f} {self.unit}/s)"
        if self._postfix:
            text += ", " + ", ".join(f"{key}={value}" for key, value in self._postfix.items())
        print(text, file=sys.stderr, flush=True)
        self._last, self._logged_count = now, self.count

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(
    total: int | None = None, desc: str = "", unit: str = "it", show: bool | None = None, initial: int = 0
) -> ProgressBar:
    """A `ProgressBar` for a stage updated by hand (see the module policy)."""
    return ProgressBar(total, desc, unit, show, initial)


def progress(
    iterable: Iterable[T],
    desc: str = "",
    total: int | None = None,
    unit: str = "it",
    show: bool | None = None,
) -> Iterable[T]:
    """Wrap `iterable` with the policy: a bar on a terminal, log lines elsewhere, nothing when disabled."""
    if not progress_enabled(show):
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    return _reported(iterable, ProgressBar(total, desc, unit, show=True))


def _reported(iterable: Iterable[T], bar: ProgressBar) -> Iterator[T]:
    with bar:
        for item in iterable:
            yield item
            bar.update(1)


def log_stage(message: str, show: bool | None = None) -> None:
    """One line on stderr saying which stage of a long command starts (when progress is enabled)."""
    if not progress_enabled(show):
        return
    if _on_terminal():
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet_libraries(show_progress: bool | None = False, *, datasets: bool = False) -> Iterator[None]:
    """Hold third-party output to the policy while the block runs, then restore it.

    - transformers: no per-load progress bars; advisory messages at error level (warnings with `-v`);
    - huggingface_hub (downloads, uploads) and datasets (when already imported, or with `datasets=True`):
      bars only where `show_progress` allows progress and stderr is a terminal (in a log they would be
      carriage-return spam).
    """
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    ds = None
    if datasets or "datasets" in sys.modules:
        import datasets as ds
    hub_was_disabled = are_progress_bars_disabled()
    transformers_bars = transformers_logging.is_progress_bar_enabled()
    transformers_verbosity = transformers_logging.get_verbosity()
    datasets_bars = ds.is_progress_bar_enabled() if ds is not None else False
    show_bars = bars_on_terminal(show_progress)
    show_hub_bars = show_bars and not hub_was_disabled
    # The libraries warn when an environment variable overrides a switch: the variable wins, as it should.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # transformers' switch also turns huggingface_hub's bars off, so the hub's are set after it.
        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity(logging.WARNING if is_verbose() else logging.ERROR)
        (enable_progress_bars if show_hub_bars else disable_progress_bars)()
        if ds is not None:
            (ds.enable_progress_bars if show_bars and datasets_bars else ds.disable_progress_bars)()
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transformers_logging.set_verbosity(transformers_verbosity)
            if transformers_bars:
                transformers_logging.enable_progress_bar()
            if ds is not None:
                (ds.enable_progress_bars if datasets_bars else ds.disable_progress_bars)()
            (disable_progress_bars if hub_was_disabled else enable_progress_bars)()

__all__ = [
    "LOG_INTERVAL",
    "ProgressBar",
    "bars_on_terminal",
    "is_verbose",
    "log_stage",
    "progress",
    "progress_bar",
    "progress_enabled",
    "quiet_libraries",
    "set_verbosity",
]
