"""`hf-wemoe merge` on bad input: one `error:` line, exit code 2, no traceback, nothing written, no hang.

Each probe is one parametrized case: how the input is spoiled, and a fragment of the expected message.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bad_input import (
    assert_one_line_error,
    entries,
    run_cli,
    run_error,
    silent_endpoint,
    silent_endpoint_env,
    write_malicious_pickle,
)
from checkpoints import write_expert_world


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return write_expert_world(tmp_path_factory.mktemp("bad-merge"), num_experts=2, seed=0)


def spoiled(world: dict[str, Path], tmp: Path, how: str) -> Path:
    """A copy of expert task1, spoiled in one way."""
    folder = Path(shutil.copytree(world["task1"], tmp / f"spoiled-{how}"))
    weights = folder / "model.safetensors"
    state = load_file(weights)
    key = "encoder.layers.1.mlp.fc1.weight"
    if how in ("nan", "inf"):
        state[key][0, 0] = float(how)
        save_file(state, weights, metadata={"format": "pt"})
    elif how == "int-header":
        # The same bytes under a header that says int32: read as integers, they would be task vectors of ~1e9.
        state[key] = state[key].view(torch.int32)
        save_file(state, weights, metadata={"format": "pt"})
    elif how == "malicious-pickle":
        weights.unlink()
        write_malicious_pickle(folder / "pytorch_model.bin", tmp / "ran", torch_format=True)
    elif how == "typed-config":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "hidden_size": "big"}))
    return folder


def expert(folder: Path | str) -> list[str]:
    """A second expert, spoiled or mistyped."""
    return ["--expert", f"b={folder}"]


PROBES = [
    ("scaling-nan", lambda w, t: ["--scaling", "nan"], "invalid --scaling (scaling): Input should be a finite number"),
    ("scaling-inf", lambda w, t: ["--scaling", "inf"], "invalid --scaling (scaling): Input should be a finite number"),
    ("scaling-nan-yaml", lambda w, t: ["--config", yaml_file(t, "scaling: .nan\n")], "Input should be a finite number"),
    ("nan-expert", lambda w, t: expert(spoiled(w, t, "nan")), "tensor 'encoder.layers.1.mlp.fc1.weight' of '"),
    ("inf-expert", lambda w, t: expert(spoiled(w, t, "inf")), "has non-finite values (1 of 2048 are NaN or infinite"),
    ("int-header", lambda w, t: expert(spoiled(w, t, "int-header")), "'encoder.layers.1.mlp.fc1.weight' is stored as I32"),
    ("malicious-pickle", lambda w, t: [*expert(spoiled(w, t, "malicious-pickle")), "--allow-pickle"], "holds more than tensors, which torch.load(weights_only=True) refuses"),
    ("typed-config", lambda w, t: expert(spoiled(w, t, "typed-config")), "invalid CLIP vision config"),
    ("missing-local", lambda w, t: expert(folder_in(t, "experts") / "task1x"), "no such folder"),
    ("missing-local-relative", lambda w, t: expert("experts/task1x"), "no such folder"),
    ("mistyped-hub-shaped", lambda w, t: expert("typo/task1"), "is not a local folder (no folder "),
    ("overflow", lambda w, t: ["--method", "task-arithmetic", "--scaling", "1e300"], "lower --scaling"),
]  # fmt: skip


def yaml_file(tmp: Path, text: str) -> str:
    path = tmp / "recipe.yaml"
    path.write_text(text)
    return str(path)


def folder_in(tmp: Path, name: str) -> Path:
    (tmp / name).mkdir(exist_ok=True)
    return tmp / name


@pytest.mark.parametrize("spoil, fragment", [probe[1:] for probe in PROBES], ids=[probe[0] for probe in PROBES])
def test_bad_merge_input(world, tmp_path, monkeypatch, capsys, hub_server, spoil, fragment):
    monkeypatch.chdir(tmp_path)
    folder_in(tmp_path, "experts")
    extra = spoil(world, tmp_path)
    before = entries(tmp_path)
    args = ["merge", "-q", "--base", str(world["base"]), "--expert", f"a={world['task0']}"]
    args += ["--output", str(tmp_path / "merged"), *extra]
    message = run_error(args, capsys)
    assert fragment in message, message
    assert entries(tmp_path) == before, "a failed merge left files behind"
    assert not (tmp_path / "ran").exists(), "a pickle file ran code"


def test_a_mistyped_expert_names_the_folder_looked_in(world, tmp_path, monkeypatch, capsys, hub_server):
    monkeypatch.chdir(tmp_path)
    args = ["merge", "-q", "--base", str(world["base"]), "--expert", "a=typo/task1", "--output", "out"]
    message = run_error(args, capsys)
    assert f"no folder {tmp_path / 'typo' / 'task1'}" in message and "not a reachable Hub repo" in message
    assert "'typo/task1' was not found on the Hub" in message


def test_a_hub_that_never_answers_ends_in_one_line(tmp_path):
    with silent_endpoint() as url:
        env = silent_endpoint_env(dict(os.environ), url, tmp_path / "hf_home")
        args = ["merge", "-q", "--base", "org/base", "--expert", "a=org/expert", "--output", "merged"]
        code, stderr, seconds = run_cli(args, env, tmp_path)
    message = assert_one_line_error(code, stderr)
    assert f"cannot reach the Hub at {url}" in message and "trying to find model repo 'org/base'" in message
    assert "HF_HUB_DOWNLOAD_TIMEOUT" in message and "timed out" in message
    assert seconds < 90 and not (tmp_path / "merged").exists()
