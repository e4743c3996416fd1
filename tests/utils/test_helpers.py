"""One home per helper: the atomic output folder, task arithmetic, sizes, results files, suites.

The atomic folder is tested against what real runs do to it: a second run that installs the same output
meanwhile, `kill -9` in the middle of a write, killed replacements, unwritable places, and failed renames.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from checkpoints import write_expert_world
from hf_wemoe.cli.main import main
from hf_wemoe.errors import WEMoEError
from hf_wemoe.io import outputs
from hf_wemoe.io.outputs import (
    OutputExistsError,
    atomic_output_dir,
    check_output_dir,
    make_staging_dir,
    recover_stale_outputs,
)
from hf_wemoe.io.weights import weight_files
from hf_wemoe.merging.recipe import MergeRecipe
from hf_wemoe.merging.registry import merge_methods
from hf_wemoe.merging.static import TaskArithmetic, task_arithmetic
from hf_wemoe.merging.wemoe import upscale_tensors, wemoe_config
from hf_wemoe.toy.evaluate_world import merge_state_dicts
from hf_wemoe.utils.formatting import format_size
from hf_wemoe.workflows import merge as merge_workflow
from hf_wemoe.workflows.merge import run_merge
from tiny_models import make_base_and_experts

SRC = Path(__file__).resolve().parents[2] / "src" / "hf_wemoe"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return write_expert_world(tmp_path_factory.mktemp("helpers-zoo"), num_experts=2, seed=3)


def merge(zoo, output: Path, overwrite: bool = False, **extra):
    """`run_merge` of every expert of `zoo` into `output`, quietly."""
    experts = {name: str(path) for name, path in zoo.items() if name != "base"}
    recipe = MergeRecipe(base=str(zoo["base"]), experts=experts, **extra)
    return run_merge(recipe, output, overwrite=overwrite, show_progress=False)


@pytest.fixture(params=["atomic rename", "portable fallback"])
def renames(request, monkeypatch):
    """Run a test with Linux's atomic renameat2 and with the fallback for systems without it."""
    if request.param == "portable fallback":
        monkeypatch.setattr(outputs, "_renameat2", lambda source, target, flags: False)
    return request.param


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def entries(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir()}


# ------------------------------------------------------------------------------------------ one home each


def test_each_helper_is_defined_once():
    pattern = re.compile(
        r"^(?:def (_?one_line|_?first_line|_?format_size|_quiet_libraries|_quiet_transformers|_progress_bars|"
        r"_staging_folder|_install|write_results|tqdm_progress)\(|(TOKENIZER_FILES|CARD_NAME|CONFIG_NAME) = )",
        re.M,
    )
    homes: dict[str, list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        for match in pattern.finditer(path.read_text()):
            name = (match.group(1) or match.group(2)).lstrip("_")
            homes.setdefault(name, []).append(str(path.relative_to(SRC)))
    assert {name: files for name, files in homes.items() if len(files) > 1} == {}


def test_task_arithmetic_is_one_computation():
    # The TA merge method, WEMoE outside its MLPs and the toy world's table give the same bits.
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(37, generator=generator)
    experts = [base + 0.01 * torch.randn(37, generator=generator) for _ in range(5)]
    expected = task_arithmetic(base, experts, 0.3)
    assert torch.equal(expected, base + 0.3 * sum(expert - base for expert in experts))
    method = TaskArithmetic(MergeRecipe(base="b", experts={"a": "a"}, scaling=0.3).resolved())
    assert torch.equal(method.merge_tensor("w", base, experts), expected)
    toy = merge_state_dicts({"w": base}, [{"w": expert} for expert in experts], 0.3)["w"]
    assert torch.equal(toy, expected)

    model, _ = make_base_and_experts(num_experts=0)
    config = wemoe_config(model.config, [f"e{k}" for k in range(5)], init_lambda=0.3)
    key = "encoder.layers.0.self_attn.q_proj.bias"
    shaped = [expert[: model.config.hidden_size] for expert in [base, *experts]]
    getters = {f"e{k}": (lambda _, t=t: t) for k, t in enumerate(shaped[1:])}
    ((name, merged),) = upscale_tensors(config, [key], lambda _: shaped[0], getters)
    assert name == key and torch.equal(merged, task_arithmetic(shaped[0], shaped[1:], 0.3))


def test_card_and_summary_print_sizes_alike(zoo, tmp_path):
    summary = merge(zoo, tmp_path / "ta", method="task-arithmetic")
    assert f"{format_size(summary.size_bytes)} on disk" in summary.line()
    weights = sum(path.stat().st_size for path in weight_files(summary.output))
    card = (summary.output / "README.md").read_text()
    assert f"weights on disk: {format_size(weights)} (safetensors)" in card


def test_write_results_writes_json_and_its_table(tmp_path):
    from hf_wemoe.evaluation import write_results
    from hf_wemoe.workflows.experiment import ResultRow, save_results

    write_results(tmp_path / "a" / "eval_results.json", {"accuracy": {"x": 50.0}})
    assert json.loads((tmp_path / "a" / "eval_results.json").read_text()) == {"accuracy": {"x": 50.0}}
    assert not (tmp_path / "a" / "eval_results.md").exists()
    save_results([ResultRow("ties", None, {"x": 50.0})], ["x"], tmp_path / "b", preamble="note")
    assert json.loads((tmp_path / "b" / "results.json").read_text())[0]["method"] == "ties"
    assert (tmp_path / "b" / "results.md").read_text().startswith(
        "note\n\n| method | adaptation | routing | stream | x | average | adaptation time |"
    )


# ------------------------------------------------------------------------------------ experiments, suites


def test_methods_say_what_they_are():
    kinds = {name: method.is_moe for name, method in merge_methods().items()}
    assert kinds == {"wemoe": True, "e-wemoe": True, "task-arithmetic": False, "average": False, "ties": False}


def test_suites_spell_out_their_templates(toy_zoo_small):
    from hf_wemoe.workflows.suites import ta8_suite, toy_suite
    from hf_wemoe.zeroshot.templates import get_templates, known_template_sets

    before = known_template_sets()
    suite = toy_suite(toy_zoo_small, max_test_images=5)
    assert suite.task_names == toy_zoo_small.tasks
    for task in suite.tasks:
        assert task.templates == toy_zoo_small.templates[task.name]
        assert task.dataset.endswith("#test[:5]")
    ta8 = ta8_suite("base-patch16", ["mnist", "dtd"])
    assert ta8.base == "openai/clip-vit-base-patch16"
    assert [task.templates for task in ta8.tasks] == [get_templates("mnist"), get_templates("dtd")]
    with pytest.raises(WEMoEError, match="unknown TA8 task"):
        ta8_suite(tasks=["imagenet"])
    assert known_template_sets() == before  # nothing registered process-wide


# ------------------------------------------------------------------------------------- the atomic folder


def test_staging_is_hidden_and_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_output_dir(tmp_path / "out") as staging:
            assert staging.parent == tmp_path and staging.name.startswith(".out.tmp-")
            handle, private = tempfile.mkstemp(dir=staging)  # 0600, like writers' temporary files
            os.close(handle)
            (staging / "sub").mkdir(mode=0o700)
    finally:
        os.umask(old)
    output = tmp_path / "out"
    assert entries(tmp_path) == {"out"}
    assert (output.stat().st_mode & 0o777, (output / "sub").stat().st_mode & 0o777) == (0o750, 0o750)
    assert (output / Path(private).name).stat().st_mode & 0o777 == 0o640


def test_a_failed_run_leaves_nothing_and_removes_the_parents_it_created(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(tmp_path / "new" / "deeper" / "out") as staging:
            (staging / "partial").write_text("x")
            raise KeyboardInterrupt
    assert entries(tmp_path) == set()


def test_an_existing_output_is_replaced_only_when_complete(tmp_path, renames):
    output = tmp_path / "out"
    with atomic_output_dir(output) as staging:
        (staging / "first").write_text("1")
    with pytest.raises(OutputExistsError, match="already exists"):
        with atomic_output_dir(output):
            pass
    with pytest.raises(RuntimeError):
        with atomic_output_dir(output, overwrite=True) as staging:
            (staging / "second").write_text("2")
            assert entries(output) == {"first"}  # untouched while the new folder is written
            raise RuntimeError("writer failed")
    assert entries(output) == {"first"}
    with atomic_output_dir(output, overwrite=True) as staging:
        (staging / "second").write_text("2")
    assert entries(output) == {"second"} and entries(tmp_path) == {"out"}


def test_the_previous_output_comes_back_when_the_final_rename_fails(tmp_path, monkeypatch):
    output = tmp_path / "out"
    with atomic_output_dir(output) as staging:
        (staging / "first").write_text("1")
    monkeypatch.setattr(outputs, "_renameat2", lambda source, target, flags: False)

    def failing(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs, "_rename_noreplace", failing)
    with pytest.raises(OSError, match="No space"):
        with atomic_output_dir(output, overwrite=True) as staging:
            (staging / "second").write_text("2")
    assert entries(output) == {"first"} and entries(tmp_path) == {"out"}


def test_what_is_not_a_folder_is_never_replaced(tmp_path):
    target = tmp_path / "file"
    target.write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(WEMoEError, match="not a folder"):
            with atomic_output_dir(target, overwrite=overwrite):
                pass
    assert target.read_text() == "keep" and entries(tmp_path) == {"file"}


def test_an_output_that_appeared_meanwhile_is_not_replaced(tmp_path, renames):
    output = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared while this run was writing it"):
        with atomic_output_dir(output) as staging:
            (staging / "mine").write_text("1")
            with atomic_output_dir(output) as other:  # another run finishes first
                (other / "theirs").write_text("2")
    assert entries(output) == {"theirs"} and entries(tmp_path) == {"out"}
    with atomic_output_dir(output, overwrite=True) as staging:
        (staging / "mine").write_text("1")
        with atomic_output_dir(output, overwrite=True) as other:
            (other / "theirs").write_text("2")
    assert entries(output) == {"mine"} and entries(tmp_path) == {"out"}


def test_concurrent_merges_into_one_output(zoo, tmp_path, monkeypatch, capsys):
    # The first merge is still writing when a second one, into the same output, finishes.
    from hf_wemoe.merging import wemoe as wemoe_module

    output = tmp_path / "merged"

    write = wemoe_module.WEMoE.write
    calls = []

    def slow_write(self, job, folder):
        write(self, job, folder)
        if not calls:
            calls.append(folder)
            merge(zoo, output, method="e-wemoe", overwrite=output.exists())

    monkeypatch.setattr(wemoe_module.WEMoE, "write", slow_write)
    args = ["merge", "--base", str(zoo["base"]), "--expert", f"a={zoo['task0']}", "--output", str(output), "-q"]
    assert main(args) == 2
    assert "appeared while this run was writing it" in capsys.readouterr().err
    assert json.loads((output / "config.json").read_text())["expert_names"] == ["task0", "task1"]
    assert entries(tmp_path) == {"merged"}

    calls.clear()
    assert main([*args, "--overwrite"]) == 0
    assert json.loads((output / "config.json").read_text())["expert_names"] == ["a"]
    assert entries(tmp_path) == {"merged"}


_WRITER = """
import sys, time
from hf_wemoe.io.outputs import atomic_output_dir
with atomic_output_dir(sys.argv[1]) as staging:
    (staging / "partial").write_text("x")
    print(staging, flush=True)
    time.sleep(600)
"""


def test_a_killed_run_leaves_a_hidden_folder_that_the_next_run_removes(zoo, tmp_path):
    output = tmp_path / "merged"
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(output)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        killed, live = (Path(writer.stdout.readline().strip()) for writer in writers)
        os.kill(writers[0].pid, signal.SIGKILL)
        writers[0].wait()
        assert killed.is_dir() and killed.name.startswith(".merged.tmp-")  # hidden
        assert main(["merge", "--base", str(zoo["base"]), "--expert", f"a={zoo['task0']}", "--output",
                     str(output), "-q"]) == 0  # fmt: skip
        assert not killed.exists()
        assert (live / "partial").is_file()  # a live run's folder is left alone
        assert entries(tmp_path) == {"merged", live.name}
    finally:
        for writer in writers:
            writer.kill()
            writer.wait()


def test_a_killed_replacement_puts_the_previous_output_back(tmp_path, monkeypatch):
    output = tmp_path / "out"
    with atomic_output_dir(output) as staging:
        (staging / "previous").write_text("1")
    # What the fallback replacement leaves when killed between its two renames.
    monkeypatch.setattr(os, "getpid", dead_pid)
    old = make_staging_dir(tmp_path, ".out.old")
    monkeypatch.undo()
    output.rename(old / "out")
    recover_stale_outputs(output)
    assert entries(output) == {"previous"} and entries(tmp_path) == {"out"}


def test_the_output_place_is_checked_before_any_download(zoo, tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a source was opened")

    monkeypatch.setattr(merge_workflow, "open_source", no_download)
    (tmp_path / "file").write_text("")
    with pytest.raises(WEMoEError, match="is not a folder"):
        merge(zoo, tmp_path / "file" / "sub" / "out")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(WEMoEError, match="cannot write the output folder"):
            merge(zoo, locked / "out")
    with pytest.raises(WEMoEError, match="no folder can be created"):
        check_output_dir("/proc/hf-wemoe-test/out")
    assert entries(tmp_path) == {"file"} | ({"locked"} if os.geteuid() != 0 else set())


def test_a_killed_push_leaves_nothing_the_next_push_keeps(tmp_path, monkeypatch):
    from hf_wemoe.hub import push

    monkeypatch.setattr(os, "getpid", dead_pid)
    stale = make_staging_dir(tmp_path, push.STAGING_STEM)
    monkeypatch.setattr(os, "getpid", os.getppid)  # a live process
    live = make_staging_dir(tmp_path, push.STAGING_STEM)
    monkeypatch.undo()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# card\n")
    model = push.ModelFolder(folder, "clip", "CLIPModel", False, True, files=["config.json", "README.md"])
    with push._upload_staging(model, "org/repo", keep_card=True) as staging:
        assert staging.parent == tmp_path and entries(staging) == {"config.json", "README.md"}
        assert not stale.exists() and live.is_dir()
    assert not staging.exists()
