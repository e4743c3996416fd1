"""How the benchmark measures: interleaved timing, single-thread CPU time, peak resident memory (sampled with
psutil), worker processes and the description of the machine the numbers come from."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch

# Workers run the entry script again (`--worker KIND --spec JSON`), so they start as fresh processes.
ENTRY_SCRIPT = Path(__file__).resolve().parents[1] / "benchmark.py"


def synchronize(device: torch.device) -> None:
    """Wait for queued accelerator work, so that a timer stops after the work and not after its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as printed in the report ("n/a" where the OS has none)."""
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


class PeakRSS:
    """Samples the resident set size of a process (and its children) in a background thread."""

    def __init__(self, pid: int | None = None, interval: float = 0.005):
        import psutil  # only measuring needs it; re-rendering a report does not

        self.process = psutil.Process(pid)
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def sample(self) -> int:
        """The current resident set size in bytes; also raises `peak`."""
        import psutil  # only measuring needs it; re-rendering a report does not

        total = 0
        try:
            total = self.process.memory_info().rss
            for child in self.process.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += child.memory_info().rss
        except psutil.Error:
            pass
        self.peak = max(self.peak, total)
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def round_robin(
    variants: dict[str, Callable[[], Any]], repeats: dict[str, int], device: torch.device
) -> dict[str, list[float]]:
    """Time every variant `repeats[name]` times, interleaved, after one untimed warm-up call each.

    Variants timed only once get no warm-up (they are the slow ones, whose first-call costs are negligible).
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for name, fn in variants.items():
            if repeats[name] > 1:
                fn()
        synchronize(device)
        for round_index in range(max(repeats.values())):
            for name, fn in variants.items():
                if round_index >= repeats[name]:
                    continue
                synchronize(device)
                start = time.perf_counter()
                fn()
                synchronize(device)
                times[name].append(time.perf_counter() - start)
                print(f"  {name}: {times[name][-1]:.3f}s", file=sys.stderr, flush=True)
    return times


def single_thread_cpu_times(
    variants: dict[str, Callable[[], Any]], repeats: int, once: Collection[str] = ()
) -> dict[str, list[float]]:
    """CPU time of each variant on one thread (round-robin; the variants in `once` run in the first round only).

    With one thread all work runs on the calling thread, whose CPU time hardly depends on other processes: a
    load-robust companion to the two-thread wall-clock times.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        with torch.inference_mode():
            for round_index in range(repeats):
                for name, fn in variants.items():
                    if name in once and round_index > 0:
                        continue
                    start = time.thread_time()
                    fn()
                    times[name].append(time.thread_time() - start)
                    print(f"  {name}: {times[name][-1]:.3f}s CPU", file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(threads)
    return times


def run_worker(kind: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one measurement of `kind` in a fresh process (its peak memory is its own); its JSON result.

    A failed worker gives `{"error": <the last line of its stderr>}` instead of stopping the benchmark.
    """
    command = [sys.executable, str(ENTRY_SCRIPT), "--worker", kind, "--spec", json.dumps(spec)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_process(command: list[str], timeout: float) -> dict[str, Any]:
    """Run a command; its wall time and peak RSS (process and children, sampled every 10 ms)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakRSS(process.pid, interval=0.01) as rss:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        return {"error": (stderr.strip().splitlines() or ["failed"])[-1], "seconds": seconds}
    return {"seconds": seconds, "peak_rss": rss.peak, "stdout": stdout.strip().splitlines()[-1:] or [""]}


def machine_info(threads: int, device: str) -> dict[str, Any]:
    """CPU, cores, memory, data caches, software versions, torch threads and device of this run."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = int(line.split()[1]) * 1024
    caches = {}
    for index in range(8):
        base = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}")
        with contextlib.suppress(OSError):
            level, kind = (base / "level").read_text().strip(), (base / "type").read_text().strip()
            if kind != "Instruction":
                caches[f"L{level}"] = (base / "size").read_text().strip()
    versions = {}
    for package in ("torch", "transformers", "fusion-bench", "hf-wemoe", "psutil"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    if device.startswith("cuda") and torch.cuda.is_available():
        device += f" ({torch.cuda.get_device_name(torch.device(device))})"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": memory,
        "caches": caches,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "threads": threads,
        "device": device,
    }
