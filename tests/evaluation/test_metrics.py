"""The packaged `evaluate` accuracy metric: correct, offline, and usable from several processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from hf_wemoe.metrics import ACCURACY_PATH, load_accuracy


@pytest.fixture
def accuracy(tmp_path):
    return load_accuracy(cache_dir=str(tmp_path))


def test_metric_script_ships_in_the_package():
    assert (ACCURACY_PATH / "accuracy.py").is_file()
    assert ACCURACY_PATH.parent.name == "metrics" and ACCURACY_PATH.parent.parent.name == "hf_wemoe"


def test_compute(accuracy):
    assert accuracy.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2]) == {"accuracy": 0.75}
    assert accuracy.compute(predictions=[3, 3], references=[3, 3]) == {"accuracy": 1.0}
    assert accuracy.compute(predictions=[0, 1, 0], references=[1, 0, 1], normalize=False) == {"accuracy": 0.0}


def test_batches_and_tensors_match_a_direct_count(accuracy):
    rng = np.random.default_rng(0)
    predictions = rng.integers(0, 5, 103)
    references = rng.integers(0, 5, 103)
    for start in range(0, 103, 25):
        # torch tensors, as the evaluation loop passes them
        accuracy.add_batch(
            predictions=torch.from_numpy(predictions[start : start + 25]),
            references=torch.from_numpy(references[start : start + 25]),
        )
    expected = float((predictions == references).mean())
    assert accuracy.compute()["accuracy"] == pytest.approx(expected, abs=1e-12)


def test_several_processes_gather_on_process_zero(tmp_path):
    # Two workers with the same experiment id rendezvous through the cache folder; process 0 gets the result.
    # (Threads stand in for processes: the protocol is the same file-lock exchange.)
    results: dict[int, object] = {}
    shards = {0: ([0, 1, 2], [0, 1, 1]), 1: ([3, 3], [3, 0])}

    def worker(rank: int) -> None:
        metric = load_accuracy(
            num_process=2, process_id=rank, experiment_id="shards", cache_dir=str(tmp_path)
        )
        metric.add_batch(predictions=shards[rank][0], references=shards[rank][1])
        results[rank] = metric.compute()

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in shards]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == {0: {"accuracy": 3 / 5}, 1: None}


@pytest.mark.slow
def test_loads_offline_without_network(tmp_path):
    # A fresh process with the Hub switched off and an unreachable endpoint: the metric still loads.
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HOME": str(tmp_path / "hf_home"),
    }
    code = (
        "from hf_wemoe.metrics import load_accuracy\n"
        f"m = load_accuracy(cache_dir={str(tmp_path / 'metric_cache')!r})\n"
        "print(m.compute(predictions=[1, 2, 3, 4], references=[1, 2, 0, 4])['accuracy'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0.75"
