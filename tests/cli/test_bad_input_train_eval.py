"""`hf-wemoe train` and `hf-wemoe eval` on bad input: one `error:` line, exit code 2, no traceback, no output left
behind, no hang, and nothing unpickled or run from a file the user did not trust.

Each probe is one parametrized case: the command, how its input is spoiled, and a fragment of the message.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adaptation_fixtures import make_adaptation_world
from bad_input import (
    assert_one_line_error,
    entries,
    run_cli,
    run_error,
    silent_endpoint,
    silent_endpoint_env,
    write_malicious_pickle,
)
from hf_wemoe.cli.main import main
from tiny_clip import make_tiny_clip


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    import datasets
    from PIL import Image

    root = tmp_path_factory.mktemp("bad-train-eval")
    world = make_adaptation_world(root)
    experts = [f"--expert=blocks={world['expert-blocks']}", f"--expert=stripes={world['expert']}"]
    world["e-wemoe"] = root / "e-wemoe"
    merge = ["merge", "-q", "--base", str(world["clip"]), *experts, "--method", "e-wemoe"]
    assert main([*merge, "--output", str(world["e-wemoe"])]) == 0
    # Integer labels 0..4 (no ClassLabel feature): with three class names, two labels have no class.
    images = [Image.new("RGB", (32, 32), (40 * i, 0, 0)) for i in range(10)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    labels = [i % 5 for i in range(10)]
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(
        str(root / "five-labels")
    )
    world["five-labels"] = root / "five-labels"
    (root / "three-classes.txt").write_text("a\nb\nc\n")
    world["three-classes"] = root / "three-classes.txt"
    world["other-clip"] = make_tiny_clip(root / "other-clip", seed=3, hidden_size=48, projection_dim=24)
    return world


def eval_args(world: dict[str, Path], tmp: Path, *extra: str, model: str | Path | None = None) -> list[str]:
    model = world["wemoe"] if model is None else model
    return ["eval", "--model", str(model), "--task", f"blocks={world['blocks']}", "--templates", "generic",
            "--output-json", str(tmp / "results.json"), "--quiet", *extra]  # fmt: skip


def train_args(world: dict[str, Path], tmp: Path, *extra: str, model: str | Path | None = None) -> list[str]:
    model = world["wemoe"] if model is None else model
    return ["train", "--model", str(model), "--task", f"blocks={world['blocks']}",
            "--task", f"stripes={world['stripes']}", "--templates", "generic", "--batch-size-per-task", "4",
            "--steps", "2", "--quiet", "--output", str(tmp / "adapted"), *extra]  # fmt: skip


def edited_config(world: dict[str, Path], tmp: Path, key: str = "wemoe", **changes) -> Path:
    """A copy of a model folder whose config.json was edited apart from its weights."""
    folder = Path(shutil.copytree(world[key], tmp / "edited"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def pickled_expert(world: dict[str, Path], tmp: Path, marker: Path | None = None) -> Path:
    """The static expert with pickle weights only (malicious ones when `marker` is given)."""
    folder = tmp / "pickled"
    folder.mkdir()
    shutil.copy(world["expert"] / "config.json", folder / "config.json")
    if marker is None:
        torch.save(load_file(world["expert"] / "model.safetensors"), folder / "pytorch_model.bin")
    else:
        write_malicious_pickle(folder / "pytorch_model.bin", marker, torch_format=True)
    return folder


def corrupted_sparse(world: dict[str, Path], tmp: Path) -> Path:
    """The E-WEMoE model with block counts that no longer sum to the kept entries."""
    folder = Path(shutil.copytree(world["e-wemoe"], tmp / "corrupted"))
    state = load_file(folder / "model.safetensors")
    key = next(key for key in state if key.endswith("fc1_weight_block_counts"))
    state[key] = torch.zeros_like(state[key])
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def existing_parent(tmp: Path) -> str:
    (tmp / "out").mkdir()
    return "out/nope"


def clip(world: dict[str, Path]) -> list[str]:
    return ["--clip-model", str(world["clip"])]


mismatch = "its config.json does not match its weights"
PROBES = [
    ("pickle-refused", eval_args, lambda w, t: dict(model=pickled_expert(w, t), extra=clip(w)), "--allow-pickle"),
    ("pickle-refused-train", train_args, lambda w, t: dict(model=pickled_expert(w, t)), "pass --allow-pickle"),
    ("malicious-pickle", eval_args, lambda w, t: dict(model=pickled_expert(w, t, t / "ran"), extra=[*clip(w), "--allow-pickle"]), "UnpicklingError"),
    ("router-depth", eval_args, lambda w, t: dict(model=edited_config(w, t, router_depth=1)), mismatch),
    ("layer-count", eval_args, lambda w, t: dict(model=edited_config(w, t, num_hidden_layers=1)), "has weight 'encoder.layers.1."),
    ("layer-count-train", train_args, lambda w, t: dict(model=edited_config(w, t, num_hidden_layers=1)), mismatch),
    ("expert-count", eval_args, lambda w, t: dict(model=edited_config(w, t, expert_names=["blocks"])), "the model expects (1,"),
    ("expert-count-train", train_args, lambda w, t: dict(model=edited_config(w, t, expert_names=["a", "b", "c"])), "the model expects (3,"),
    ("typed-field", eval_args, lambda w, t: dict(model=edited_config(w, t, hidden_size="big")), "Field 'hidden_size' expected int"),
    ("inconsistent-field", train_args, lambda w, t: dict(model=edited_config(w, t, routing="sometimes")), "routing must be one of"),
    ("corrupted-sparse", eval_args, lambda w, t: dict(model=corrupted_sparse(w, t)), "corrupted sparse task vectors"),
    ("corrupted-sparse-train", train_args, lambda w, t: dict(model=corrupted_sparse(w, t)), "corrupted sparse task vectors"),
    ("labels-beyond-classes", eval_args, lambda w, t: dict(extra=["--task", f"five={w['five-labels']}", "--classnames", f"five={w['three-classes']}"]), "range over 0..4, but the head has 3 classes"),
    ("labels-beyond-classes-train", train_args, lambda w, t: dict(extra=["--task", f"five={w['five-labels']}", "--classnames", f"five={w['three-classes']}", "--objective", "supervised"]), "range over 0..4"),
    ("output-json-folder", eval_args, lambda w, t: dict(extra=["--output-json", str(t)]), "is a folder; give a file name"),
    ("clip-projection", eval_args, lambda w, t: dict(model=w["expert"], extra=["--clip-model", str(w["other-clip"])]), "takes 48 features, but"),
    ("missing-folder", eval_args, lambda w, t: dict(model=existing_parent(t)), "no such folder: 'out/nope'"),
    ("missing-dot-folder", train_args, lambda w, t: dict(model="./nope"), "no such folder: './nope'"),
    ("unknown-hub-id", eval_args, lambda w, t: dict(model="testorg/no-such-model"), "not a reachable Hub repo"),
    ("lr-nan", train_args, lambda w, t: dict(extra=["--lr", "nan"]), "invalid --lr (lr): Input should be a finite number"),
]  # fmt: skip


@pytest.mark.parametrize(
    "command, spoil, fragment", [probe[1:] for probe in PROBES], ids=[probe[0] for probe in PROBES]
)
def test_bad_train_eval_input(world, tmp_path, monkeypatch, capsys, hub_server, command, spoil, fragment):
    monkeypatch.chdir(tmp_path)
    spoiled = spoil(world, tmp_path)
    args = command(world, tmp_path, *spoiled.get("extra", ()), model=spoiled.get("model"))
    before = entries(tmp_path)
    message = run_error(args, capsys)
    assert fragment in message, message
    assert entries(tmp_path) == before, "a failed command left files behind"
    assert not (tmp_path / "ran").exists(), "a pickle file ran code"


def test_allowed_pickle_loads_with_weights_only(world, tmp_path, capsys):
    model = pickled_expert(world, tmp_path)
    assert main(eval_args(world, tmp_path, *clip(world), "--allow-pickle", model=model)) == 0
    expected = tmp_path / "expected.json"
    assert main(eval_args(world, tmp_path, *clip(world), "--output-json", str(expected), model=world["expert"])) == 0
    assert json.loads((tmp_path / "results.json").read_text())["accuracy"] == json.loads(expected.read_text())["accuracy"]


@pytest.fixture(scope="module")
def checkpoint(world, tmp_path_factory) -> Path:
    """A checkpoint written by --save-every."""
    root = tmp_path_factory.mktemp("checkpoint")
    args = train_args(world, root, "--save-every", "1", "--no-evaluate", "--checkpoint-dir", str(root / "ckpt"))
    assert main(args) == 0
    return root / "ckpt" / "step-2"


def test_checkpoints_hold_no_pickle(checkpoint):
    names = sorted(path.name for path in checkpoint.iterdir())
    assert names == ["optimizer.safetensors", "routers.safetensors", "trainer_state.json"]


def test_a_pickle_only_checkpoint_is_refused_and_never_loaded(world, tmp_path, capsys):
    folder = tmp_path / "crafted"
    write_malicious_pickle(folder / "custom_checkpoint_0.pkl", tmp_path / "ran")
    write_malicious_pickle(folder / "optimizer.bin", tmp_path / "ran", torch_format=True)
    message = run_error(train_args(world, tmp_path, "--resume-from", str(folder)), capsys)
    assert "pickle files are never loaded" in message
    assert not (tmp_path / "ran").exists() and not (tmp_path / "adapted").exists()


def test_a_pickle_planted_in_a_checkpoint_is_ignored(world, checkpoint, tmp_path):
    folder = Path(shutil.copytree(checkpoint, tmp_path / "planted"))
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl"):
        write_malicious_pickle(folder / name, tmp_path / "ran")
    write_malicious_pickle(folder / "optimizer.bin", tmp_path / "ran", torch_format=True)
    assert main(train_args(world, tmp_path, "--steps", "3", "--no-evaluate", "--resume-from", str(folder))) == 0
    assert not (tmp_path / "ran").exists()


def test_resuming_with_another_data_order_is_refused(world, checkpoint, tmp_path, capsys):
    message = run_error(train_args(world, tmp_path, "--seed", "1", "--resume-from", str(checkpoint)), capsys)
    assert "resume with the same --seed" in message and not (tmp_path / "adapted").exists()


@pytest.mark.parametrize(
    "command, spoil, where",
    [
        (eval_args, lambda w: dict(extra=["--task", "remote=org/dataset"]), "find dataset repo 'org/dataset'"),
        (train_args, lambda w: dict(model="org/wemoe"), "find model repo 'org/wemoe'"),
    ],
    ids=["eval-hub-dataset", "train-hub-model"],
)
def test_a_hub_that_never_answers_ends_in_one_line(world, tmp_path, command, spoil, where):
    spoiled = spoil(world)
    args = command(world, tmp_path, *spoiled.get("extra", ()), model=spoiled.get("model"))
    with silent_endpoint() as url:
        env = silent_endpoint_env(dict(os.environ), url, tmp_path / "hf_home")
        code, stderr, seconds = run_cli(args, env, tmp_path)
    message = assert_one_line_error(code, stderr)
    assert f"cannot reach the Hub at {url}" in message and where in message
    assert seconds < 90 and not (tmp_path / "results.json").exists() and not (tmp_path / "adapted").exists()


def test_an_unreachable_hub_falls_back_to_the_local_cache(world, tmp_path, hub_server):
    """A Hub model read once is evaluated from the local Hub cache when the Hub stops answering."""
    hub_server.commit_folder("testorg/cached-expert", world["expert"])
    args = eval_args(world, tmp_path, *clip(world), model="testorg/cached-expert")
    online = {**os.environ, "HF_HOME": str(tmp_path / "hf_home")}
    code, stderr, _ = run_cli(args, online, tmp_path)
    assert code == 0, stderr[-2000:]
    first = json.loads((tmp_path / "results.json").read_text())["accuracy"]
    (tmp_path / "results.json").unlink()
    with silent_endpoint() as url:
        code, stderr, seconds = run_cli(args, silent_endpoint_env(online, url, tmp_path / "hf_home"), tmp_path)
    assert code == 0, stderr[-2000:]
    assert "using the copy of testorg/cached-expert in the local Hub cache" in stderr and seconds < 90
    assert json.loads((tmp_path / "results.json").read_text())["accuracy"] == first
