"""Build the toy zoo: datasets, a tiny pretrained CLIP and one fine-tuned vision expert per task.

Layout of a built zoo (Hub-like folders, everything loadable with ``from_pretrained`` / ``load_from_disk``)::

    <zoo>/zoo.json                                  the manifest (:class:`ZooManifest`)
    <zoo>/models/<BASE_NAME>/                       CLIPModel + tokenizer + CLIPProcessor files
    <zoo>/models/<BASE_NAME>_<task>/                CLIPVisionModel of the task's expert + image processor
    <zoo>/datasets/<task>/                          DatasetDict (train/test), columns image, label

The recipe (see :data:`PRESETS`):

1. Datasets: every task's train and test splits, plus a separate captioned "pretrain" corpus (same
   generators, independent samples; kept in memory only). The train and test images are a closer, noisier view
   than the pretraining images (:func:`~hf_wemoe.toy.tasks.apply_domain_shift`), the way a specialised
   dataset differs from web images: the base's features carry over, its zero-shot accuracy drops.
2. Base: a tiny CLIP trained from scratch with the CLIP contrastive loss on the pretrain corpus, captions
   being the tasks' templates filled with class names.
3. Experts: for each task, the base vision tower fine-tuned on the task's train split against the frozen
   zero-shot head (logits = logit_scale * normalize(visual_projection(pooled)) @ head.T, at the base's own
   learned scale, so the base and the experts are calibrated alike); ``visual_projection`` stays frozen. MLP
   tensors train at the full learning rate, attention and layer norms at 1/100 of it, the embeddings not at
   all, so the task knowledge sits in the MLPs: the part a WEMoE model routes per input. A feature-preservation
   term keeps each expert's layer states on the other tasks' images close to the base's (see
   :class:`~hf_wemoe.toy.training.FinetuneRecipe`). Experts train in parallel worker processes.
4. Evaluation of the world (:func:`hf_wemoe.toy.evaluate_world.evaluate_world`), stored in the manifest.

Builds are deterministic: the same seed (and torch version, CPU type) gives byte-identical dataset files
and safetensors files; torch runs with a fixed thread count during the build (see ``BUILD_THREADS``).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPVisionModel

from hf_wemoe.errors import WEMoEError
from hf_wemoe.io.outputs import OutputExistsError, atomic_output_dir
from hf_wemoe.toy.evaluate_world import evaluate_world
from hf_wemoe.toy.manifest import BASE_NAME, MANIFEST_FILE, RECIPE_VERSION, ZooManifest, default_zoo_dir
from hf_wemoe.toy.models import (
    ModelSizes,
    build_clip_config,
    build_image_processor,
    build_processor,
    build_tokenizer,
    to_pixel_values,
)
from hf_wemoe.toy.tasks import TASKS, generate_split
from hf_wemoe.toy.training import (
    BUILD_THREADS,
    PRETRAIN_THREADS,
    FinetuneRecipe,
    PreserveData,
    PretrainRecipe,
    TaskData,
    deterministic_torch,
    finetune_expert,
    layer_states,
    pretrain_clip,
    zero_shot_head,
)
from hf_wemoe.utils.progress import log_stage, progress, progress_bar, quiet_libraries
from hf_wemoe.version import __version__

__all__ = ["PRESETS", "ToyZooPreset", "build_toy_zoo", "custom_preset", "get_toy_zoo"]


@dataclass(frozen=True)
class ToyZooPreset:
    """Sizes and training budgets of one toy zoo build."""

    name: str
    n_pretrain: int
    n_train: int
    n_test: int
    pretrain: PretrainRecipe
    finetune: FinetuneRecipe
    sizes: ModelSizes = field(default_factory=ModelSizes)
    tasks: tuple[str, ...] = tuple(TASKS)
    domain_shift: float = 0.0
    expert_logit_scale: float | None = None
    """Logit scale the experts are fine-tuned at; None: the base's own learned scale (calibrated like the base)."""

    def to_dict(self) -> dict:
        """Plain-dict form for the manifest."""
        return asdict(self)


_FULL = ToyZooPreset(
    name="full",
    n_pretrain=1500,
    n_train=2000,
    n_test=400,
    pretrain=PretrainRecipe(steps=1500, batch_size=128, lr=2e-3, warmup=100),
    finetune=FinetuneRecipe(steps=500, batch_size=64, lr=5e-3, other_lr_scale=0.01, warmup=20, preserve_weight=3.0),
    domain_shift=1.0,
)

#: The built-in presets. ``full`` shows the paper's effect clearly; ``plain`` is the same recipe built plainly
#: (experts fine-tuned on their task against the frozen zero-shot head and nothing else: no feature-preservation
#: term, CLIP's usual logit scale 100 instead of the base's own), the world where entropy adaptation collapses;
#: ``small`` is a quick build for tests.
PRESETS: dict[str, ToyZooPreset] = {
    "full": _FULL,
    "plain": replace(
        _FULL, name="plain", finetune=replace(_FULL.finetune, preserve_weight=0.0), expert_logit_scale=100.0
    ),
    "small": ToyZooPreset(
        name="small",
        n_pretrain=300,
        n_train=400,
        n_test=200,
        pretrain=PretrainRecipe(steps=200, batch_size=64, lr=2e-3, warmup=30),
        finetune=FinetuneRecipe(
            steps=120,
            batch_size=32,
            lr=1e-2,
            other_lr_scale=0.01,
            warmup=10,
            preserve_weight=3.0,
            preserve_batch_size=32,
            preserve_pool=100,
        ),
        # Six tasks that a short fine-tuning learns (shapes and textures need the full budget).
        tasks=("digits", "gratings", "colors", "dots", "arrows", "scenes"),
        domain_shift=1.0,
    ),
}


def default_workers() -> int:
    """Processes that fine-tune experts in parallel: one per CPU core, at most 4."""
    return max(
        1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    )


def _check_replaceable(target: Path) -> None:
    """Refuse to delete anything but a toy zoo (a folder with ``zoo.json``) or an empty folder."""
    if target.is_dir() and ((target / MANIFEST_FILE).is_file() or not any(target.iterdir())):
        return
    raise WEMoEError(f"{target} exists and is not a toy zoo; choose another output folder")


def _resolve_preset(preset: str | ToyZooPreset) -> ToyZooPreset:
    if isinstance(preset, ToyZooPreset):
        return preset
    if preset not in PRESETS:
        raise WEMoEError(f"unknown toy zoo preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def _save_dataset(path: Path, task: str, splits: dict[str, tuple[list[np.ndarray], list[int]]]) -> None:
    from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features
    from datasets import Image as ImageFeature
    from PIL import Image

    spec = TASKS[task]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(spec.classnames))})
    info = DatasetInfo(description=f"hf-wemoe toy task '{task}': {spec.description}.", features=features)
    dataset = DatasetDict(
        {
            split: Dataset.from_dict(
                {"image": [Image.fromarray(a) for a in arrays], "label": labels}, features=features, info=info
            )
            for split, (arrays, labels) in splits.items()
        }
    )
    dataset.save_to_disk(str(path))


def _task_data(arrays: list[np.ndarray], labels: list[int]) -> TaskData:
    return TaskData(to_pixel_values(np.stack(arrays)), torch.tensor(labels, dtype=torch.long))


def _versions() -> dict[str, str]:
    import datasets
    import transformers

    return {
        "hf_wemoe": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
    }


def build_toy_zoo(
    output_dir: str | os.PathLike,
    preset: str | ToyZooPreset = "full",
    seed: int = 0,
    progress: bool | None = None,
    overwrite: bool = False,
    workers: int | None = None,
) -> ZooManifest:
    """Build a toy zoo into ``output_dir`` and return its manifest.

    ``workers`` processes fine-tune the experts (default :func:`default_workers`); the files do not depend on it.
    ``progress``: None follows the package's progress policy (bars on a terminal, log lines elsewhere).

    The zoo is built in a hidden staging folder beside ``output_dir`` and renamed into place at the end
    (:func:`hf_wemoe.io.outputs.atomic_output_dir`), so an interrupted build never leaves a half-written zoo
    behind. Only a toy zoo or an empty folder is ever replaced; a zoo that another build finished first is
    kept. ``preset`` is ``"full"`` (about 4 minutes on two CPU cores), ``"plain"`` (the same recipe without the
    feature-preservation term and logit-scale calibration), ``"small"`` (about a minute, for tests) or a
    :class:`ToyZooPreset`.

    Raises:
        WEMoEError: unknown preset, or ``output_dir`` exists and ``overwrite`` is false.
    """
    spec = _resolve_preset(preset)
    target = Path(output_dir).expanduser().resolve()
    if target.exists():
        if not overwrite:
            raise WEMoEError(f"{target} already exists; pass overwrite=True (CLI: --force) to rebuild it")
        _check_replaceable(target)
    try:
        # A fresh staging folder: concurrent builds of the same zoo never share one.
        with atomic_output_dir(target, overwrite=overwrite, replaceable=_check_replaceable) as staging:
            manifest = _build_into(staging, spec, seed, progress, workers or default_workers())
    except OutputExistsError:
        # Another process finished the same zoo first: keep theirs.
        return ZooManifest.load(target)
    manifest.root = target
    return manifest


@dataclass
class _ExpertJob:
    """Everything one expert's fine-tuning needs (picklable, for a worker process).

    ``base`` and ``preserve_pools`` are the same objects in every job: forked workers share them, and each job
    takes the other tasks' pools only when it runs.
    """

    task: str
    base: CLIPVisionModel
    projection: torch.nn.Linear
    head: torch.Tensor
    train: TaskData
    recipe: FinetuneRecipe
    seed: int
    logit_scale: float
    preserve_pools: dict[str, PreserveData]


def _finetune_job(job: _ExpertJob) -> tuple[str, dict]:
    """Fine-tune one expert from the base weights; returns ``(task, state_dict)``."""
    others = [pool for task, pool in job.preserve_pools.items() if task != job.task]
    preserve = (
        PreserveData(torch.cat([p.pixels for p in others]), torch.cat([p.targets for p in others]))
        if others
        else None
    )
    with deterministic_torch():
        vision = copy.deepcopy(job.base)
        finetune_expert(
            vision,
            job.projection,
            job.head,
            job.train,
            job.recipe,
            job.seed,
            progress=False,
            logit_scale=job.logit_scale,
            preserve=preserve,
        )
    return job.task, vision.state_dict()


def _run_expert_jobs(jobs: list[_ExpertJob], workers: int) -> Iterator[tuple[str, dict]]:
    """Run the jobs in ``workers`` processes (in this process when 1), yielding results in job order."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield _finetune_job(job)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # On Linux, forked workers (each single-threaded, like a DataLoader's) start at once and need no
    # `if __name__ == "__main__"` guard in the calling script; elsewhere fork is unsafe, so spawn.
    global _FORKED_JOBS
    fork = sys.platform == "linux"
    context = multiprocessing.get_context("fork" if fork else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as executor:
        if fork:
            # Forked workers inherit the jobs: only their positions and the results cross process boundaries.
            _FORKED_JOBS = jobs
            try:
                yield from executor.map(_finetune_forked_job, range(len(jobs)))
            finally:
                _FORKED_JOBS = []
        else:
            yield from executor.map(_finetune_job, jobs)


_FORKED_JOBS: list[_ExpertJob] = []


def _finetune_forked_job(position: int) -> tuple[str, dict]:
    return _finetune_job(_FORKED_JOBS[position])


def _build_into(root: Path, spec: ToyZooPreset, seed: int, show: bool | None, workers: int) -> ZooManifest:
    timings: dict[str, float] = {}
    start = time.perf_counter()
    tasks = list(spec.tasks)
    base_rel = f"models/{BASE_NAME}"
    paths = {
        "base": base_rel,
        "experts": {t: f"models/{BASE_NAME}_{t}" for t in tasks},
        "datasets": {t: f"datasets/{t}" for t in tasks},
    }
    log_stage(f"toy zoo ({spec.name} preset, seed {seed}): building into {root.parent}", show)
    with quiet_libraries(datasets=True), deterministic_torch():
        # 1. Datasets (saved) and the pretraining corpus (memory only).
        t0 = time.perf_counter()
        train, pretrain = {}, {}
        for task in progress(tasks, "toy datasets", unit="task", show=show):
            splits = {
                "train": generate_split(task, "train", spec.n_train, seed, spec.domain_shift),
                "test": generate_split(task, "test", spec.n_test, seed, spec.domain_shift),
            }
            _save_dataset(root / paths["datasets"][task], task, splits)
            train[task] = _task_data(*splits["train"])
            pretrain[task] = _task_data(*generate_split(task, "pretrain", spec.n_pretrain, seed))
        timings["datasets"] = time.perf_counter() - t0

        # 2. Base CLIP, pretrained contrastively on the captioned corpus.
        t0 = time.perf_counter()
        tokenizer = build_tokenizer(model_max_length=spec.sizes.max_text_length)
        torch.manual_seed(seed)
        from transformers import CLIPModel

        model = CLIPModel(build_clip_config(tokenizer, spec.sizes))
        with deterministic_torch(PRETRAIN_THREADS):
            pretrain_clip(model, tokenizer, pretrain, spec.pretrain, seed=seed, progress=show)
        base_dir = root / base_rel
        model.save_pretrained(base_dir)
        build_processor(tokenizer).save_pretrained(base_dir)
        # The image processor also as preprocessor_config.json, the file vision-only tools look for.
        image_processor = build_image_processor()
        image_processor.save_pretrained(base_dir)
        timings["pretrain"] = time.perf_counter() - t0

        # 3. One expert per task; only the vision tower changes. Experts are independent and single-threaded,
        # so they train in parallel worker processes with the same results as one after another.
        t0 = time.perf_counter()
        # Experts are fine-tuned at the base's own learned logit scale: the scale its zero-shot heads use, so
        # the pretrained model and the experts are calibrated alike and their confidences can be compared.
        # The plain preset fine-tunes at a fixed scale instead.
        logit_scale = (
            float(model.logit_scale.detach().exp()) if spec.expert_logit_scale is None else spec.expert_logit_scale
        )
        pool = spec.finetune.preserve_pool
        preserve_pools = {}
        if spec.finetune.preserve_weight > 0:
            preserve_pools = {
                t: PreserveData(
                    train[t].pixels[:pool], layer_states(model.vision_model, train[t].pixels[:pool])
                )
                for t in tasks
            }
        jobs = [
            _ExpertJob(
                task=task,
                base=model.vision_model,
                projection=model.visual_projection,
                head=zero_shot_head(model, tokenizer, task),
                train=train[task],
                recipe=spec.finetune,
                seed=seed * 1000 + 1 + index,
                logit_scale=logit_scale,
                preserve_pools=preserve_pools,
            )
            for index, task in enumerate(tasks)
        ]
        processes = max(1, min(workers, len(jobs)))
        stage = f"fine-tune experts ({processes} process{'es' if processes > 1 else ''})"
        with progress_bar(len(jobs), stage, "expert", show) as bar:
            for task, state in _run_expert_jobs(jobs, workers):
                vision = copy.deepcopy(model.vision_model)
                vision.load_state_dict(state)
                expert_dir = root / paths["experts"][task]
                vision.save_pretrained(expert_dir)
                image_processor.save_pretrained(expert_dir)
                bar.update(1, done=task)
        timings["experts"] = time.perf_counter() - t0

    manifest = ZooManifest(
        recipe_version=RECIPE_VERSION,
        seed=seed,
        preset=spec.name,
        base_model=BASE_NAME,
        tasks=tasks,
        classnames={t: list(TASKS[t].classnames) for t in tasks},
        templates={t: list(TASKS[t].templates) for t in tasks},
        paths=paths,
        num_examples={t: {"train": spec.n_train, "test": spec.n_test} for t in tasks},
        # Through JSON so that the in-memory manifest equals the one read back from zoo.json.
        settings=json.loads(
            json.dumps(
                {**spec.to_dict(), "build_threads": BUILD_THREADS, "pretrain_threads": PRETRAIN_THREADS}
            )
        ),
        versions=_versions(),
        root=root,
    )
    # 4. Measure the world from the saved files.
    t0 = time.perf_counter()
    manifest.accuracies = evaluate_world(manifest, progress=show)
    timings["evaluate"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start
    manifest.timings = {k: round(v, 2) for k, v in timings.items()}
    manifest.save()
    return manifest


def get_toy_zoo(
    preset: str | ToyZooPreset = "full",
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
    force: bool = False,
    workers: int | None = None,
) -> ZooManifest:
    """The toy zoo at ``output_dir`` (default :func:`default_zoo_dir`), built first if needed.

    An existing zoo is reused when its manifest matches the recipe version, preset and seed; otherwise (or
    with ``force``) it is rebuilt.
    """
    spec = _resolve_preset(preset)
    target = Path(output_dir) if output_dir is not None else default_zoo_dir(spec.name, seed)
    if not force and (target / MANIFEST_FILE).is_file():
        try:
            manifest = ZooManifest.load(target)
        except WEMoEError:
            manifest = None
        if manifest and (manifest.recipe_version, manifest.preset, manifest.seed) == (
            RECIPE_VERSION,
            spec.name,
            seed,
        ):
            return manifest
    return build_toy_zoo(target, spec, seed=seed, progress=progress, overwrite=True, workers=workers)


def custom_preset(base: str = "small", **changes) -> ToyZooPreset:
    """A copy of a built-in preset with some fields changed (e.g. tiny budgets for quick checks)."""
    return replace(_resolve_preset(base), **changes)
