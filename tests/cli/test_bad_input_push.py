"""`hf-wemoe push` on bad input: one `error:` line, exit code 2, no traceback, nothing sent, no hang.

Each probe is one parametrized case: how the model folder is spoiled, and a fragment of the expected message.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bad_input import assert_one_line_error, run_cli, run_error, silent_endpoint, silent_endpoint_env
from clip_worlds import make_clip_world, merge


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A WEMoE vision tower written by hf-wemoe merge."""
    root = tmp_path_factory.mktemp("bad-push")
    return merge(make_clip_world(root), root / "wemoe")


def with_weight(folder: Path, key: str, change) -> Path:
    state = load_file(folder / "model.safetensors")
    state[key] = change(state[key])
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def link_out(folder: Path, tmp: Path, name: str) -> Path:
    """A symbolic link in the folder to a secret outside it."""
    secret = tmp / "token"
    secret.write_text("hf_secret_token")
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).symlink_to(secret)
    return folder


def nan_at(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[3] = float("nan")
    return tensor


PROBES = [
    ("symlink-out", lambda f, t: link_out(f, t, "notes.txt"), "notes.txt' is a symbolic link to"),
    ("symlink-out-nested", lambda f, t: link_out(f, t, "extra/token.json"), "outside the folder; hf-wemoe push never uploads"),
    ("nan-weight", lambda f, t: with_weight(f, "post_layernorm.weight", nan_at), "weight 'post_layernorm.weight' has non-finite values (1 of"),
    ("inf-task-vector", lambda f, t: with_weight(f, "encoder.layers.0.mlp.task_vectors.fc2_bias", lambda x: x / 0), "has non-finite values"),
    ("int-header", lambda f, t: with_weight(f, "post_layernorm.weight", lambda x: x.view(torch.int32)), "is stored as I32, the model expects a floating-point tensor"),
]  # fmt: skip


@pytest.mark.parametrize("spoil, fragment", [probe[1:] for probe in PROBES], ids=[probe[0] for probe in PROBES])
def test_bad_push_input(model, tmp_path, capsys, hub_server, spoil, fragment):
    folder = spoil(Path(shutil.copytree(model, tmp_path / "model")), tmp_path)
    hub_server.clear_requests()
    message = run_error(["push", str(folder), "--repo-id", "testorg/bad-push", "-q"], capsys)
    assert fragment in message, message
    assert hub_server.requests == [], "a refused folder reached the Hub"


def test_a_symlink_inside_the_folder_is_pushed(model, tmp_path, hub_server):
    from hf_wemoe.hub.push import push_folder

    folder = Path(shutil.copytree(model, tmp_path / "model"))
    (folder / "notes.md").write_text("notes")
    (folder / "notes-link.md").symlink_to(folder / "notes.md")
    result = push_folder(folder, "testorg/inner-link", show_progress=False)
    assert {"notes.md", "notes-link.md"} <= set(result.files)
    assert hub_server.read_file("testorg/inner-link", "notes-link.md") == b"notes"


def test_a_hub_that_never_answers_ends_in_one_line(model, tmp_path):
    with silent_endpoint() as url:
        env = silent_endpoint_env(dict(os.environ), url, tmp_path / "hf_home")
        code, stderr, seconds = run_cli(["push", str(model), "--repo-id", "testorg/silent", "-q"], env, tmp_path)
    message = assert_one_line_error(code, stderr)
    assert f"cannot reach the Hub at {url}" in message and "nothing was committed" in message
    assert "HF_HUB_DOWNLOAD_TIMEOUT" in message and seconds < 90
