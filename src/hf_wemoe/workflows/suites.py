"""The task suites that experiments run: the offline toy zoo (`hf-wemoe demo`) and the paper's eight tasks (TA8,
`scripts/reproduce_ta8.py`). Built here, in one place, with every task's prompt templates spelled out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hf_wemoe.errors import WEMoEError
from hf_wemoe.zeroshot.templates import get_templates

if TYPE_CHECKING:
    from hf_wemoe.toy.manifest import ZooManifest


@dataclass
class SuiteTask:
    """One task of an experiment: its expert, its test data (also the unlabelled adaptation data) and templates."""

    name: str
    expert: str
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


def toy_suite(zoo: ZooManifest, max_test_images: int | None = None) -> Suite:
    """The toy zoo as a suite: its base, one expert per task, the test splits (at most `max_test_images` images
    each) and each task's own templates."""
    split = "test" if max_test_images is None else f"test[:{max_test_images}]"
    return Suite(
        name=f"toy zoo ({zoo.preset})",
        base=str(zoo.base_path),
        tasks=[
            SuiteTask(
                task, str(zoo.expert_path(task)), f"{zoo.dataset_path(task)}#{split}", list(zoo.templates[task])
            )
            for task in zoo.tasks
        ],
    )


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
    tasks = list(TA8_DATASETS if tasks is None else tasks)
    unknown = [task for task in tasks if task not in TA8_DATASETS]
    if unknown:
        raise WEMoEError(f"unknown TA8 task(s) {unknown}; choose from {list(TA8_DATASETS)}")
    return Suite(
        name=f"TA8 clip-vit-{model}",
        base=f"openai/clip-vit-{model}",
        tasks=[
            SuiteTask(task, f"tanganke/clip-vit-{model}_{task}", TA8_DATASETS[task], get_templates(task))
            for task in tasks
        ],
    )


__all__ = ["TA8_DATASETS", "Suite", "SuiteTask", "ta8_suite", "toy_suite"]
