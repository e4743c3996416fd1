"""Helpers of the bad-input tests (`test_bad_input_*.py`): run a command that must fail, and check how.

The ground rule they check: bad input gets one line `error: ...` on stderr and exit code 2, no traceback, no
half-written output, no hang; nothing unpickles or runs code from a file a user did not explicitly trust.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from hf_wemoe.cli.main import main


def run_error(args: list[str], capsys) -> str:
    """Run the command line in-process; it must exit with 2 and print one `error:` line. Returns that line."""
    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, (code, captured.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in captured.err
    return lines[0]


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 240) -> tuple[int, str, float]:
    """Run `python -m hf_wemoe ARGS` in a subprocess; returns (exit code, stderr, seconds)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "hf_wemoe", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stderr, time.perf_counter() - start


def assert_one_line_error(code: int, stderr: str) -> str:
    """The checks of `run_error` on the outcome of `run_cli`; returns the error line."""
    lines = stderr.strip().splitlines()
    assert code == 2, (code, stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    return lines[0]


def entries(folder: Path) -> set[str]:
    """Names in a folder (to compare before and after a failed command)."""
    return {path.name for path in folder.iterdir()}


@contextlib.contextmanager
def silent_endpoint() -> Iterator[str]:
    """A local HTTP endpoint that accepts connections and never answers; yields its URL."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                continue
            held.append(connection)  # kept open and never read: the client waits for an answer

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for connection in held:
            connection.close()
        server.close()


def silent_endpoint_env(env: dict[str, str], url: str, hf_home: Path) -> dict[str, str]:
    """A client environment pointed at `url`, with 1 s Hub timeouts so the test stays short."""
    return {
        **env,
        "HF_ENDPOINT": url,
        "HF_HOME": str(hf_home),
        "HF_HUB_DOWNLOAD_TIMEOUT": "1",
        "HF_HUB_ETAG_TIMEOUT": "1",
        "HF_HUB_DISABLE_XET": "1",
    }


class _RunsCode:
    """An object whose unpickling runs `os.system`: what a crafted pickle file does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_malicious_pickle(path: Path, marker: Path, torch_format: bool = False) -> Path:
    """A pickle file that creates `marker` when unpickled (nothing else happens); with `torch_format`, written by
    `torch.save` like a `pytorch_model.bin`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"state": _RunsCode(marker)}
    if torch_format:
        import torch

        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle)
    return path
