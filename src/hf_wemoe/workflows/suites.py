"""The task suites that experiments run, built here in one place with every task's prompt templates spelled out:
the offline toy zoo (`hf-wemoe demo`) and the paper's eight tasks (TA8, `scripts/reproduce_ta8.py` and
`scripts/reproduce_sparsity.py`); the generalization protocol's seen/unseen splits of both
(`scripts/reproduce_generalization.py`); the robustness protocol's four tasks on one corrupted test split, the Hub's
and the toy zoo's (`scripts/reproduce_robustness.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from hf_wemoe.errors import WEMoEError
from hf_wemoe.toy.corruptions import CORRUPTIONS, DEFAULT_SEVERITY, check_corruption, get_corrupted_test_sets
from hf_wemoe.zeroshot.templates import get_templates

if TYPE_CHECKING:
    from hf_wemoe.toy.manifest import ZooManifest


@dataclass
class SuiteTask:
    """One task of an experiment: its expert, its test data (also the unlabelled adaptation data) and templates."""

    name: str
    expert: str | None
    """The task's fine-tuned expert; None for an unseen task: evaluated (with the merged model and its own zero-shot
    head) but never merged or adapted on."""
    dataset: str
    templates: list[str] | None = None
    """The prompt templates of the task's zero-shot head; None: the built-in set named like the task or its
    dataset."""


@dataclass
class Suite:
    """A pretrained CLIP model (with text tower) and its tasks."""

    name: str
    base: str
    tasks: list[SuiteTask]

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    @property
    def seen(self) -> list[str]:
        """Tasks with an expert: merged, adapted on and evaluated."""
        return [task.name for task in self.tasks if task.expert is not None]

    @property
    def unseen(self) -> list[str]:
        """Tasks without an expert: only evaluated."""
        return [task.name for task in self.tasks if task.expert is None]


def _sliced(split: str, max_test_images: int | None) -> str:
    return split if max_test_images is None else f"{split}[:{max_test_images}]"


def toy_suite(
    zoo: ZooManifest, max_test_images: int | None = None, tasks: Sequence[str] | None = None
) -> Suite:
    """The toy zoo as a suite: its base, one expert per task, the test splits (at most `max_test_images` images
    each) and each task's own templates; `tasks` picks a subset (in the zoo's order)."""
    chosen = _check_tasks(tasks, zoo.tasks, "toy")
    split = _sliced("test", max_test_images)
    return Suite(
        name=f"toy zoo ({zoo.preset})",
        base=str(zoo.base_path),
        tasks=[
            SuiteTask(
                task, str(zoo.expert_path(task)), f"{zoo.dataset_path(task)}#{split}", list(zoo.templates[task])
            )
            for task in zoo.tasks
            if task in chosen
        ],
    )


def _check_tasks(tasks: Sequence[str] | None, known: Sequence[str], what: str) -> list[str]:
    """`tasks` (default: all of `known`), or a `WEMoEError` naming the unknown ones."""
    tasks = list(known if tasks is None else tasks)
    unknown = [task for task in tasks if task not in known]
    if unknown:
        raise WEMoEError(f"unknown {what} task(s) {unknown}; choose from {list(known)}")
    if not tasks:
        raise WEMoEError(f"no {what} task chosen; choose from {list(known)}")
    return tasks


# Task name (also its built-in template set) -> dataset reference (REPO[@REV][:CONFIG][#SPLIT]).
TA8_DATASETS = {
    "sun397": "tanganke/sun397#test",
    "stanford-cars": "tanganke/stanford_cars#test",
    "resisc45": "tanganke/resisc45#test",
    "eurosat": "tanganke/eurosat#test",
    "svhn": "ufldl-stanford/svhn:cropped_digits#test",
    "gtsrb": "tanganke/gtsrb#test",
    "mnist": "ylecun/mnist#test",
    "dtd": "tanganke/dtd#test",
}


def ta8_suite(model: str = "base-patch32", tasks: Sequence[str] | None = None) -> Suite:
    """The paper's eight-task suite for `openai/clip-vit-<model>` and its `tanganke/clip-vit-<model>_<task>`
    experts (or a subset of the tasks), with the task-arithmetic literature's templates of each task."""
    tasks = _check_tasks(tasks, list(TA8_DATASETS), "TA8")
    return Suite(
        name=f"TA8 clip-vit-{model}",
        base=f"openai/clip-vit-{model}",
        tasks=[
            SuiteTask(task, f"tanganke/clip-vit-{model}_{task}", TA8_DATASETS[task], get_templates(task))
            for task in tasks
        ],
    )


# ----------------------------------------------------------------------------------------------------------------
# Generalization: merge and adapt on the seen tasks, evaluate all of them

# The papers' two splits of TA8: the unseen tasks of each (the other six are seen).
GENERALIZATION_SPLITS = {"1": ("mnist", "eurosat"), "2": ("resisc45", "svhn")}
# The toy zoo's splits, two of its eight tasks held out: 1 holds out the handwritten digits and the landscapes
# (the toy analogues of MNIST and EuroSAT), 2 the road-sign arrows and the textures.
TOY_GENERALIZATION_SPLITS = {"1": ("digits", "scenes"), "2": ("arrows", "textures")}


def with_unseen(suite: Suite, unseen: Sequence[str]) -> Suite:
    """`suite` with the tasks of `unseen` held out: they keep their test data and zero-shot heads but lose their
    expert, so an experiment evaluates them with the merged model and never merges or adapts on them."""
    unseen = list(unseen)
    unknown = [task for task in unseen if task not in suite.task_names]
    if unknown:
        raise WEMoEError(
            f"unknown task(s) {unknown} in the unseen split; choose from {suite.task_names}"
        )
    if len(set(unseen)) == len(suite.tasks):
        raise WEMoEError("every task is unseen; leave at least one task with its expert")
    return Suite(
        name=f"{suite.name}, unseen: {', '.join(unseen)}",
        base=suite.base,
        tasks=[replace(task, expert=None) if task.name in unseen else task for task in suite.tasks],
    )


# ----------------------------------------------------------------------------------------------------------------
# Robustness: four tasks, adapted and evaluated on one corrupted test split at a time

CLEAN = "clean"
# The test conditions of the robustness protocol: the clean test split and the seven corrupted ones, named like
# the Hub datasets' splits (`tanganke/eurosat#impulse_noise`).
ROBUSTNESS_CONDITIONS = (CLEAN, *CORRUPTIONS)
ROBUSTNESS_TASKS = ("stanford-cars", "eurosat", "resisc45", "gtsrb")
# The toy zoo's four: the tasks whose experts matter most (zero-shot below 70% on the full preset).
TOY_ROBUSTNESS_TASKS = ("digits", "shapes", "arrows", "textures")


def check_condition(condition: str) -> None:
    """Raise `WEMoEError` unless `condition` is `clean` or one of the seven corruptions."""
    if condition not in ROBUSTNESS_CONDITIONS:
        raise WEMoEError(f"unknown corruption {condition!r}; choose from {', '.join(ROBUSTNESS_CONDITIONS)}")


def robustness_suite(model: str, condition: str, tasks: Sequence[str] = ROBUSTNESS_TASKS) -> Suite:
    """The robustness protocol's suite for `openai/clip-vit-<model>` on one test condition: each task's Hub dataset
    at the split named like the corruption (`tanganke/stanford_cars#motion_blur`), or its test split for
    `clean`."""
    check_condition(condition)
    suite = ta8_suite(model, _check_tasks(tasks, ROBUSTNESS_TASKS, "robustness (tasks with corrupted splits)"))
    split = "test" if condition == CLEAN else condition
    return Suite(
        name=f"{suite.name}, {condition}",
        base=suite.base,
        tasks=[replace(task, dataset=f"{task.dataset.rpartition('#')[0]}#{split}") for task in suite.tasks],
    )


def toy_robustness_suite(
    zoo: ZooManifest,
    condition: str,
    tasks: Sequence[str] = TOY_ROBUSTNESS_TASKS,
    max_test_images: int | None = None,
    severity: int = DEFAULT_SEVERITY,
    progress: bool | None = None,
) -> Suite:
    """The toy zoo's robustness suite on one test condition: the zoo's test split for `clean`, otherwise the
    test split corrupted by `hf_wemoe.toy.corruptions` at `severity` (built beside the zoo on first use)."""
    check_condition(condition)
    suite = toy_suite(zoo, max_test_images, tasks)
    if condition == CLEAN:
        return replace(suite, name=f"{suite.name}, {CLEAN}")
    check_corruption(condition, severity)
    folders = get_corrupted_test_sets(zoo, suite.task_names, severity, progress=progress)
    split = _sliced(condition, max_test_images)
    return Suite(
        name=f"{suite.name}, {condition} (severity {severity})",
        base=suite.base,
        tasks=[replace(task, dataset=f"{folders[task.name]}#{split}") for task in suite.tasks],
    )


__all__ = [
    "CLEAN",
    "GENERALIZATION_SPLITS",
    "ROBUSTNESS_CONDITIONS",
    "ROBUSTNESS_TASKS",
    "TA8_DATASETS",
    "TOY_GENERALIZATION_SPLITS",
    "TOY_ROBUSTNESS_TASKS",
    "Suite",
    "SuiteTask",
    "check_condition",
    "robustness_suite",
    "ta8_suite",
    "toy_robustness_suite",
    "toy_suite",
    "with_unseen",
]
