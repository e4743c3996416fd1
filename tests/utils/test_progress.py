"""One progress and logging policy: bars on a terminal, plain log lines in pipes, `--quiet`,
`HF_HUB_DISABLE_PROGRESS_BARS` and `-v` honoured by every long command."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest

from adaptation_fixtures import make_adaptation_world
from hf_wemoe.cli.main import main
from hf_wemoe.toy import TASKS, custom_preset
from hf_wemoe.toy import build as build_module
from hf_wemoe.toy.training import FinetuneRecipe, PretrainRecipe
from hf_wemoe.utils import progress as progress_module
from hf_wemoe.utils.progress import progress, progress_bar, progress_enabled, set_verbosity
from hub_server import client_env


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_adaptation_world(tmp_path_factory.mktemp("progress-world"))


@pytest.fixture
def policy(monkeypatch):
    """The policy's defaults for one test: no `--quiet` from an earlier in-process command, no env switch."""
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setattr(progress_module, "_state", {"quiet": False, "verbose": False})
    level = logging.getLogger("hf_wemoe").level
    yield monkeypatch
    logging.getLogger("hf_wemoe").setLevel(level)


def run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`hf-wemoe ARGS` in a fresh process with stdout and stderr piped (not terminals)."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    result = subprocess.run(
        [sys.executable, "-m", "hf_wemoe", *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return result


def merge_args(world, output) -> list[str]:
    return [
        "merge", "--base", str(world["clip"]), "--expert", f"blocks={world['expert-blocks']}",
        "--expert", f"stripes={world['expert']}", "--output", str(output),
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------- the policy


def test_log_lines_instead_of_bars_when_stderr_is_not_a_terminal(policy, capsys):
    policy.setattr(progress_module, "LOG_INTERVAL", 0.0)
    assert list(progress(range(3), "stage", unit="step")) == [0, 1, 2]
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "stage: 0/3 step"
    assert re.fullmatch(r"stage: 3/3 step \(\d+\.\d\d step/s\)", lines[-1]), lines
    with progress_bar(2, "training", unit="step") as bar:
        bar.update(1, loss="0.500")
        bar.update(1, loss="0.250")
    err = capsys.readouterr().err
    assert "\r" not in err
    assert re.search(r"^training: 2/2 step \(\S+ step/s\), loss=0\.250$", err, re.M), err


def test_lines_are_periodic_not_one_per_step(policy, capsys):
    policy.setattr(progress_module, "LOG_INTERVAL", 3600.0)
    with progress_bar(500, "long stage", unit="step") as bar:
        for _ in range(500):
            bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["long stage: 0/500 step", "long stage: 500/500 step"]


def test_quiet_and_the_hub_switch_turn_progress_off(policy, capsys):
    assert progress_enabled() and progress_enabled(None)
    policy.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    assert not progress_enabled()
    assert progress_enabled(True)  # an explicit request wins
    policy.delenv("HF_HUB_DISABLE_PROGRESS_BARS")
    set_verbosity(quiet=True)
    assert not progress_enabled()
    list(progress(range(3), "hidden"))
    with progress_bar(3, "hidden") as bar:
        bar.update(3)
    assert not progress_enabled(False)
    assert capsys.readouterr().err == ""


def test_toy_zoo_build_reports_its_stages_in_a_pipe(policy, tmp_path, capsys):
    # `hf-wemoe toy-zoo` with stderr not a terminal (a micro build in place of the small preset).
    micro = custom_preset(
        "small",
        n_pretrain=16,
        n_train=16,
        n_test=8,
        pretrain=PretrainRecipe(steps=3, batch_size=16, warmup=1),
        finetune=FinetuneRecipe(steps=3, batch_size=8, warmup=1, preserve_pool=8, preserve_batch_size=4),
        tasks=tuple(TASKS)[:2],
    )
    policy.setitem(build_module.PRESETS, "small", micro)
    assert main(["toy-zoo", "--preset", "small", "--output", str(tmp_path / "zoo"), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    for stage in ("toy zoo (small preset, seed 0)", "toy datasets: 2/2 task", "pretrain base CLIP: 3/3 step",
                  "fine-tune experts (1 process): 2/2 expert", "evaluate toy world: 2/2 task"):  # fmt: skip
        assert stage in err, (stage, err)
    assert "loss=" in err and "\r" not in err
    assert main(["toy-zoo", "--preset", "small", "--output", str(tmp_path / "zoo2"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert not any(stage in err for stage in ("toy zoo", "toy datasets", "pretrain", "fine-tune", "evaluate"))


# ------------------------------------------------------------------------------------- commands, piped


def test_merge_in_a_pipe_writes_progress_lines(world, tmp_path):
    err = run_cli(merge_args(world, tmp_path / "out")).stderr
    assert re.search(r"^wemoe: (\d+)/\1 tensor \(", err, re.M), err
    assert "\r" not in err


def test_merge_quiet_and_hub_switch_are_silent(world, tmp_path):
    err = run_cli([*merge_args(world, tmp_path / "quiet"), "--quiet"]).stderr
    assert "tensor" not in err and "wemoe" not in err, err
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    err = run_cli(merge_args(world, tmp_path / "switch"), env=env).stderr
    assert "tensor" not in err and "wemoe" not in err, err


def test_training_in_a_pipe_logs_steps_and_loss(world, tmp_path):
    args = [
        "train", "--model", str(world["wemoe"]), "--task", f"blocks={world['blocks']}",
        "--task", f"stripes={world['stripes']}", "--templates", "generic", "--batch-size-per-task", "4",
        "--steps", "3", "--output", str(tmp_path / "adapted"),
    ]  # fmt: skip
    err = run_cli(args).stderr
    assert re.search(r"^adapting routers: 3/3 step \(\S+ step/s\), loss=\d+\.\d{4}, img_s=\d+$", err, re.M), err
    assert re.search(r"^eval blocks: 1/1 batch", err, re.M), err
    assert "\r" not in err
    err = run_cli([*args[:-1], str(tmp_path / "quiet"), "--quiet"]).stderr
    assert "adapting routers" not in err and "eval " not in err, err


def test_verbose_shows_package_debug_lines_only(world, hub_server, tmp_path):
    # From the Hub, so that the HTTP client and file locks log debug lines of their own.
    for repo, folder in (("progress/clip", world["clip"]), ("progress/blocks", world["expert-blocks"])):
        hub_server.create_repo(repo)
        hub_server.commit_folder(repo, folder)
    env = client_env(hub_server, tmp_path / "hf_home")
    result = run_cli(
        ["-v", "merge", "--base", "progress/clip", "--expert", "blocks=progress/blocks", "--output",
         str(tmp_path / "out")],
        env=env,
    )  # fmt: skip
    debug = [line for line in result.stderr.splitlines() if line.startswith("DEBUG ")]
    assert any(line.startswith("DEBUG hf_wemoe.") for line in debug), result.stderr
    assert all(line.startswith("DEBUG hf_wemoe.") for line in debug), debug
