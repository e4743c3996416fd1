"""`hf-wemoe analyze` on bad input: one `error:` line, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bad_input import entries, run_error
from checkpoints import write_checkpoint, write_expert_world
from lora_adapters import edit_adapter_config, make_adapter
from tiny_models import make_base_and_experts


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-analyze")
    folders = write_expert_world(root, num_experts=1, seed=0)
    folders["lora"] = make_adapter(folders["base"], root / "lora", seed=1, r=2, target_modules=["q_proj"])
    folders["wide"] = write_checkpoint(make_base_and_experts(0, seed=2, hidden_size=48)[0], root / "wide")
    return folders


def dora(world: dict[str, Path], tmp: Path) -> list[str]:
    folder = edit_adapter_config(Path(shutil.copytree(world["lora"], tmp / "dora")), use_dora=True)
    return ["--expert", f"d={folder}"]


def pickled(world: dict[str, Path], tmp: Path) -> list[str]:
    folder = Path(shutil.copytree(world["lora"], tmp / "pickled"))
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    return ["--expert", f"p={folder}"]


def existing_output(world: dict[str, Path], tmp: Path) -> list[str]:
    (tmp / "report").mkdir(exist_ok=True)
    return []


PROBES = [
    ("energy-zero", lambda w, t: ["--energy", "0"], "invalid --energy (energy): Input should be greater than 0"),
    ("energy-above-one", lambda w, t: ["--energy", "1.5"], "invalid --energy (energy): Input should be less than or equal to 1"),
    ("energy-nan", lambda w, t: ["--energy", "nan"], "invalid --energy (energy)"),
    ("output-exists", existing_output, "already exists"),
    ("output-is-the-base", lambda w, t: ["--output", str(w["base"]), "--overwrite"], "would replace the model folder"),
    ("other-architecture", lambda w, t: ["--expert", f"w={w['wide']}"], "tensor 'embeddings.class_embedding' has shape (48,), the base has (32,)"),
    ("dora", dora, "uses DoRA"),
    ("pickle-adapter", pickled, "only has pickle weights (adapter_model.bin)"),
    ("missing-expert", lambda w, t: ["--expert", f"m={t / 'nowhere'}"], "no such folder"),
    ("bad-expert-name", lambda w, t: ["--expert", f"a b={w['task0']}"], "expert name 'a b' must start with"),
]  # fmt: skip


@pytest.mark.parametrize(
    "spoil, fragment", [probe[1:] for probe in PROBES], ids=[probe[0] for probe in PROBES]
)
def test_bad_analyze_input(world, tmp_path, monkeypatch, capsys, spoil, fragment):
    monkeypatch.chdir(tmp_path)
    extra = spoil(world, tmp_path)
    before = entries(tmp_path)
    base_files = entries(world["base"])
    args = ["analyze", "-q", "--base", str(world["base"]), "--expert", f"a={world['task0']}"]
    if "--output" not in extra:
        args += ["--output", str(tmp_path / "report")]
    message = run_error([*args, *extra], capsys)
    assert fragment in message, message
    assert entries(tmp_path) == before, "a failed analysis left files behind"
    assert entries(world["base"]) == base_files


def test_no_experts(world, capsys):
    message = run_error(["analyze", "--base", str(world["base"])], capsys)
    assert "--expert (experts) is required" in message or "no experts" in message, message
