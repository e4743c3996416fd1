"""The command line's conventions, shared by every command: start-up, help, flag spellings, one-line errors,
-q/-v, YAML config files, deprecated names, old merge recipes, and push composed after the workflows."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from checkpoints import write_expert_world
from hf_wemoe.cli.commands import COMMANDS
from hf_wemoe.cli.main import build_parser, command_name, main
from hf_wemoe.cli.options import resolve_options
from hf_wemoe.errors import WEMoEError
from hf_wemoe.merging.recipe import MergeRecipe

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
NAMES = ["task0", "task1", "task2"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """A tiny base and three experts on disk, as folders `base`, `task0`, ... (the names old recipes use)."""
    root = tmp_path_factory.mktemp("cli-zoo")
    write_expert_world(root, num_experts=3, seed=0)
    return root


def merge_args(zoo: Path, output: Path, *extra: str) -> list[str]:
    experts = [f"--expert={name}={zoo / name}" for name in NAMES]
    return ["merge", "-q", "--base", str(zoo / "base"), *experts, "--output", str(output), *extra]


def one_line_error(args: list[str], capsys) -> str:
    """Run a command that must fail: exit code 2 and exactly one stderr line `error: ...`; returns it."""
    capsys.readouterr()
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of sub-command `name`, with its flags."""
    subparsers = next(a for a in build_parser(name)._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[name]


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser(command_name(argv)).parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# Start-up and help


def test_top_level_help_and_light_commands_do_not_import_heavy_libraries():
    """`hf-wemoe --help` and `--version` (and the help of commands that need no model) load no torch."""
    code = (
        "import sys\n"
        "from hf_wemoe.cli.main import main\n"
        "for argv in (['--help'], ['--version'], ['toy-zoo', '--help'], ['demo', '--help'], ['push', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, (argv, exit.code)\n"
        "heavy = ('torch', 'transformers', 'datasets', 'accelerate')\n"
        "print('LOADED', [name for name in heavy if name in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: hf-wemoe" in result.stdout and "hf-wemoe 0." in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "LOADED []"


def test_top_level_help_lists_every_command_from_the_table(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for command in COMMANDS.values():
        assert command.name in text and " ".join(command.help.split()) in text, command.name
        module = importlib.import_module(f"hf_wemoe.cli.{command.module}")
        for name in ("DESCRIPTION", "EXAMPLES", "add_arguments", "run"):
            assert hasattr(module, name), (command.name, name)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_help_has_a_description_flags_with_one_default_and_an_example(name, capsys):
    with pytest.raises(SystemExit) as exit:
        main([name, "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    module = importlib.import_module(f"hf_wemoe.cli.{COMMANDS[name].module}")
    assert module.DESCRIPTION.splitlines()[0].strip() in text
    assert "example" in text and f"hf-wemoe {name}" in text.split("example")[-1]
    for action in command_parser(name)._actions:
        if action.help in (None, argparse.SUPPRESS) or isinstance(action, argparse._HelpAction):
            continue
        if action.dest == "config":
            continue
        stated = action.help.count("(default:") + action.help.count("(required")
        assert stated == 1, (name, action.option_strings or action.dest, action.help)
    for flag in ("-q, --quiet", "-v, --verbose"):
        assert flag in text, (name, flag)


def test_help_states_each_default_once(capsys):
    """Defaults that used to be in the description and appended again are stated once."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "(default: the recorded base)" in text
        and "(default: none)" not in text.split("--clip-model")[1][:120]
    )
    assert "(default: OUTPUT-checkpoints)" in text and text.count("(default: the model's)") == 1


def test_the_cli_presets_are_the_toy_zoos():
    from hf_wemoe.cli.toy_zoo import PRESET_NAMES
    from hf_wemoe.toy.build import PRESETS

    assert tuple(PRESETS) == PRESET_NAMES


def test_the_demo_objectives_are_the_unlabelled_objectives_of_adaptation():
    from typing import get_args

    from hf_wemoe.adaptation import OBJECTIVES
    from hf_wemoe.cli.demo import Objective

    assert get_args(Objective) == tuple(o for o in OBJECTIVES if o != "supervised")


# ----------------------------------------------------------------------------------------------------------------
# Flag spellings, -q/-v


def test_underscore_spellings_are_aliases_and_values_are_kept():
    kebab = parse(["merge", "--max-shard-size", "50KB", "--no-shared-router", "--expert=my_task=a_b"])
    snake = parse(["merge", "--max_shard_size", "50KB", "--no_shared_router", "--expert=my_task=a_b"])
    assert {**vars(kebab), "_parser": None} == {**vars(snake), "_parser": None}
    assert (
        snake.max_shard_size == "50KB" and snake.shared_router is False and snake.experts == ["my_task=a_b"]
    )
    assert parse(["train", "--batch_size_per_task", "4"]).batch_size_per_task == 4


@pytest.mark.parametrize(
    "argv, flag, meant",
    [
        (["merge", "--out", "x"], "--out", "--output"),
        (["merge", "--exper", "a=b"], "--exper", "--expert"),
        (["train", "--step", "3"], "--step", "--steps"),
        (["push", "DIR", "--repo", "a/b"], "--repo", "--repo-id"),
    ],
)
def test_flags_are_never_abbreviated(argv, flag, meant, capsys):
    message = one_line_error(argv, capsys)
    assert f"unknown option '{flag}' (did you mean '{meant}'?)" in message
    assert f"see 'hf-wemoe {argv[0]} --help'" in message


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["mrege"], "unknown command 'mrege' (did you mean 'merge'?)"),
        (["merge", "--scaling"], "argument --scaling: expected one argument"),
        (["merge", "extra"], "unexpected argument 'extra'"),
        (["push"], "the following arguments are required: DIR"),
        (["--bogus", "merge"], "unknown option '--bogus'"),
        (["eval", "--routing", "nope"], "invalid --routing (routing): Input should be 'sample' or 'batch'"),
        (["merge", "--base", "b", "--expert", "a=b", "--router-depth", "5"], "invalid --router-depth"),
        (["push", "DIR"], "--repo-id (repo_id) is required"),
        (["merge", "--dtype", "float32", "--task-vector-dtype", "float16"], "are the same option"),
    ],
)
def test_parse_errors_are_one_line(argv, expected, capsys):
    assert expected in one_line_error(argv, capsys)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_quiet_and_verbose_are_accepted_before_and_after_every_command(name):
    positional = ["DIR"] if name == "push" else []
    after = parse([name, *positional, "-v", "-q"])
    assert after.quiet is True and after.verbose is True
    before = parse(["-q", name, *positional])
    assert before.quiet is True and before.verbose is False
    mixed = parse(["-v", name, *positional, "--quiet"])
    assert mixed.quiet is True and mixed.verbose is True
    neither = parse([name, *positional])
    assert neither.quiet is False and neither.verbose is False


def test_main_sets_the_verbosity_once(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr("hf_wemoe.cli.main.set_verbosity", lambda **kwargs: calls.append(kwargs))
    assert main(["merge", "-v", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert calls == [{"quiet": False, "verbose": True}]
    assert "cannot read config file" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# YAML config files: the same names and the same errors as the flags


@pytest.mark.parametrize(
    "name, flags, key, value",
    [
        ("merge", ["--base", "b", "--expert", "a=b"], "routing", "nope"),
        ("merge", ["--base", "b", "--expert", "a=b"], "scaling", "much"),
        ("merge", ["--base", "b", "--expert", "a=b"], "router_depth", 5),
        ("train", ["--model", "m"], "steps", "many"),
        ("eval", ["--model", "m"], "eval_batch_size", 0),
        ("eval", ["--model", "m"], "routing", "nope"),
    ],
)
def test_bad_values_read_the_same_from_flags_and_files(name, flags, key, value, tmp_path, capsys):
    from_flag = one_line_error([name, *flags, f"--{key.replace('_', '-')}", str(value)], capsys)
    config = tmp_path / "options.yaml"
    config.write_text(yaml.safe_dump({key: value}))
    from_file = one_line_error([name, *flags, "--config", str(config)], capsys)
    assert from_flag == from_file and f"({key})" in from_flag


@pytest.mark.parametrize("name", ["merge", "train", "eval"])
def test_unknown_and_duplicate_keys_are_refused_by_every_config_file(name, tmp_path, capsys):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("lambda: 0.3\n")
    message = one_line_error([name, "--config", str(unknown)], capsys)
    assert f"unknown option 'lambda' in config file '{unknown}'" in message
    assert "unknown option '--lambda'" in one_line_error([name, "--lambda", "0.3"], capsys)
    duplicate = tmp_path / "duplicate.yaml"
    duplicate.write_text("seed: 1\nseed: 2\n")
    assert "duplicate key 'seed'" in one_line_error([name, "--config", str(duplicate)], capsys)


def test_flags_override_the_config_file(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"model": "m", "task": {"a": "d"}, "steps": 5, "evaluate": False}))
    train, hub = resolve_options(
        parse(["train", "--config", str(config), "--steps", "7", "--evaluate"]), *_train()
    )
    assert (train.steps, train.evaluate, train.task, hub.push_to_hub) == (7, True, {"a": "d"}, None)
    # Tasks as NAME=DATASET strings in the file, like the flags.
    config.write_text(yaml.safe_dump({"task": ["a=d", "b=e"], "push_to_hub": "org/name"}))
    train, hub = resolve_options(parse(["train", "--config", str(config)]), *_train())
    assert train.task == {"a": "d", "b": "e"} and hub.push_to_hub == "org/name"


def _train():
    from hf_wemoe.cli.push import PushToHubOptions
    from hf_wemoe.workflows.train import TrainConfig

    return TrainConfig, PushToHubOptions


# ----------------------------------------------------------------------------------------------------------------
# Same names: deprecated spellings still work, with one warning line


def test_deprecated_merge_names_warn_once_and_keep_working(tmp_path, capsys):
    args = parse(["merge", "--base", "b", "--expert", "a=b", "--dtype", "bfloat16"])
    with pytest.warns(FutureWarning, match="--dtype is deprecated; use --task-vector-dtype"):
        recipe, _ = resolve_options(args, MergeRecipe, _merge_run_options())
    assert recipe.task_vector_dtype == "bfloat16"

    config = tmp_path / "old.yaml"
    config.write_text(
        "base: b\nexperts: {a: b}\ninit_lambda: 0.5\ntask_vector_sparsity: 0.25\ndtype: float16\n"
    )
    with pytest.warns(FutureWarning) as warned:
        recipe, _ = resolve_options(
            parse(["merge", "--config", str(config)]), MergeRecipe, _merge_run_options()
        )
    assert (recipe.scaling, recipe.sparsity, recipe.task_vector_dtype) == (0.5, 0.25, "float16")
    assert {str(w.message) for w in warned} == {
        f"'{old}' in config file '{config}' is deprecated; use '{new}'"
        for old, new in [
            ("dtype", "task_vector_dtype"),
            ("init_lambda", "scaling"),
            ("task_vector_sparsity", "sparsity"),
        ]
    }
    # Python callers too.
    with pytest.warns(FutureWarning, match="'init_lambda' is deprecated; use 'scaling'"):
        assert MergeRecipe(base="b", experts={"a": "b"}, init_lambda=0.4).scaling == 0.4

    # On the command line: one `warning:` line on stderr, then the command goes on (here to a missing base).
    capsys.readouterr()
    assert (
        main(
            [
                "merge",
                "--base",
                str(tmp_path / "none"),
                "--expert",
                "a=b",
                "--output",
                "o",
                "--dtype",
                "float16",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "warning: --dtype is deprecated; use --task-vector-dtype" and len(err) == 2
    assert err[1].startswith("error: ")


def _merge_run_options():
    from hf_wemoe.cli.merge import MergeRunOptions

    return MergeRunOptions


# ----------------------------------------------------------------------------------------------------------------
# Merge recipes: max_shard_size is recorded; recipes written before this change still rebuild


def test_the_recorded_recipe_keeps_the_shard_size(zoo, tmp_path):
    first = tmp_path / "first"
    assert main(merge_args(zoo, first, "--method", "task-arithmetic", "--max-shard-size", "50KB")) == 0
    recipe = yaml.safe_load((first / "merge_config.yaml").read_text())
    assert recipe["max_shard_size"] == "50KB"
    again = tmp_path / "again"
    assert main(["merge", "-q", "--config", str(first / "merge_config.yaml"), "--output", str(again)]) == 0
    assert sorted(p.name for p in again.glob("*.safetensors")) == sorted(
        p.name for p in first.glob("*.safetensors")
    )
    assert len(list(again.glob("*.safetensors"))) > 1
    for path in first.glob("*.safetensors"):
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name


def test_a_merge_config_written_by_0_1_0_still_merges(zoo, tmp_path, monkeypatch, capsys):
    """`merge_config_0.1.0.yaml` was written by version 0.1.0 (`dtype`, no `max_shard_size`), for folders named
    base, task0, task1 and task2 (relative paths), with `--max-shard-size 50KB` that it did not record."""
    for name in ["base", *NAMES]:
        shutil.copytree(zoo / name, tmp_path / name)
    shutil.copy(FIXTURES / "merge_config_0.1.0.yaml", tmp_path / "merge_config.yaml")
    monkeypatch.chdir(tmp_path)
    old = yaml.safe_load(Path("merge_config.yaml").read_text())
    assert old["dtype"] == "bfloat16" and "max_shard_size" not in old and "task_vector_dtype" not in old

    capsys.readouterr()
    assert main(["merge", "-q", "--config", "merge_config.yaml", "--output", "rebuilt"]) == 0
    assert capsys.readouterr().err.strip().splitlines() == [
        "warning: 'dtype' in config file 'merge_config.yaml' is deprecated; use 'task_vector_dtype'"
    ]
    recipe = yaml.safe_load(Path("rebuilt/merge_config.yaml").read_text())
    # The same recipe, with the local sources recorded as absolute paths (so it also works from the model folder).
    absolute = {
        "base": str(Path(old["base"]).resolve()),
        "experts": {name: str(Path(ref).resolve()) for name, ref in old["experts"].items()},
    }
    assert {key: recipe[key] for key in old if key != "dtype"} == {
        key: absolute.get(key, v) for key, v in old.items() if key != "dtype"
    }
    assert recipe["task_vector_dtype"] == "bfloat16" and "dtype" not in recipe
    assert recipe["max_shard_size"] == "5GB"  # the default, now recorded

    # The same merge from today's flags gives the same recipe and the same weights.
    flags = ["--method", "e-wemoe", "--scaling", "0.25", "--router-depth", "1", "--sparsity", "0.5"]
    flags += ["--task-vector-dtype", "bfloat16"]
    experts = [f"--expert={name}={name}" for name in NAMES]
    assert main(["merge", "-q", "--base", "base", *experts, *flags, "--output", "flags"]) == 0
    assert Path("flags/merge_config.yaml").read_bytes() == Path("rebuilt/merge_config.yaml").read_bytes()
    rebuilt, from_flags = load_file("rebuilt/model.safetensors"), load_file("flags/model.safetensors")
    assert rebuilt.keys() == from_flags.keys()
    assert all(rebuilt[key].equal(from_flags[key]) for key in rebuilt)
    config = json.loads(Path("rebuilt/config.json").read_text())
    assert config["task_vector_dtype"] == "bfloat16" and config["shared_router"] is True


# ----------------------------------------------------------------------------------------------------------------
# Push composed by the commands, after the workflows


def test_a_failed_push_after_a_merge_keeps_the_folder_and_says_how_to_retry(
    zoo, tmp_path, monkeypatch, capsys
):
    def failing_push(folder, repo_id, **kwargs):
        raise WEMoEError("the Hub is down")

    monkeypatch.setattr("hf_wemoe.cli.push.push_folder", failing_push)
    output = tmp_path / "merged"
    message = one_line_error(merge_args(zoo, output, "--push-to-hub", "testorg/merged"), capsys)
    assert message == (
        f"error: merged into {output}, but the push failed: the Hub is down (retry with: hf-wemoe push {output} "
        "--repo-id testorg/merged)"
    )
    assert (output / "model.safetensors").is_file()


def test_train_checks_the_push_target_first_and_pushes_after(tmp_path, monkeypatch, capsys):
    from hf_wemoe.workflows.train import TrainSummary

    trained = []

    def fake_train(config, progress=True):
        trained.append(config)
        Path(config.output).mkdir()
        return TrainSummary(2, 0.5, 1.0, 1, True, list(config.task), output=Path(config.output))

    def failing_push(folder, repo_id, **kwargs):
        raise WEMoEError("quota exceeded")

    monkeypatch.setattr("hf_wemoe.cli.train.run_train", fake_train)
    monkeypatch.setattr("hf_wemoe.cli.push.push_folder", failing_push)
    output = tmp_path / "adapted"
    args = ["train", "-q", "--model", "m", "--task", "a=d", "--output", str(output)]
    assert "invalid repo id" in one_line_error([*args, "--push-to-hub", "not a repo"], capsys)
    assert trained == []  # refused before any work
    message = one_line_error([*args, "--push-to-hub", "testorg/adapted"], capsys)
    assert message == (
        f"error: saved the adapted model to {output}, but the push failed: quota exceeded (retry with: hf-wemoe "
        f"push {output} --repo-id testorg/adapted)"
    )
    assert len(trained) == 1 and output.is_dir()


def test_console_script_entry_point_runs_the_same_main():
    result = subprocess.run(
        [sys.executable, "-m", "hf_wemoe", "merge", "--out", "x"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown option '--out' (did you mean '--output'?); see 'hf-wemoe merge --help'"
    ]
