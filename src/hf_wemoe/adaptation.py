"""Router adaptation: train only the WEMoE routers, by entropy minimisation on unlabelled data (or supervised).

One step takes one batch from every task (tasks are all sampled every step) and sums the per-task losses. An
`accelerate.Accelerator` drives devices, mixed precision, gradient accumulation and trackers. Checkpoints are
safetensors and JSON written here (not accelerate's pickle files), so resuming never unpickles anything.

Data order is a pure function of (seed, task, position): each task's samples form an endless stream of seeded
permutations, and the global batch of micro-step m is positions [m*B, (m+1)*B) of that stream. A checkpoint
therefore only needs the micro-step counter to continue exactly, and with several processes each rank takes
every world_size-th sample of the global batch, so the update equals a one-process run with the same global
batch (router gradients are averaged across processes).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from hf_wemoe.errors import WEMoEError
from hf_wemoe.io.outputs import atomic_output_dir
from hf_wemoe.io.state import decode_state, encode_state, read_json, read_tensors, write_tensors
from hf_wemoe.models.configuration_wemoe import RoutingMode
from hf_wemoe.models.modeling_wemoe import is_router_parameter
from hf_wemoe.utils.progress import progress_bar
from hf_wemoe.zeroshot.classifier import ClassificationTask, ZeroShotClassifier
from hf_wemoe.zeroshot.data import collate_images


class TrainOptions(BaseModel):
    """Router-adaptation hyperparameters, shared by the `hf-wemoe train` flags and its YAML config file."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(1000, ge=1, description="optimizer steps")
    lr: float = Field(1e-4, gt=0, allow_inf_nan=False, description="Adam learning rate")
    batch_size_per_task: int = Field(16, ge=1, description="global batch size per task and step")
    scheduler: Literal["constant", "cosine"] = Field("constant", description="learning-rate schedule")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="autocast precision")
    seed: int = Field(0, description="seed of the data order")
    objective: Literal["entropy", "supervised"] = Field(
        "entropy",
        description="loss: entropy of the predictions (unlabelled), or cross-entropy with the labels",
    )
    routing: RoutingMode | None = Field(
        None,
        description="routing mode while training and evaluating",
        json_schema_extra={"default_text": "the model's"},
    )
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0: never)")
    log_every: int = Field(10, ge=1, description="log the loss to trackers every N steps")


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of softmax(logits) over the batch (computed in float32)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1).mean()


def stream_indices(num_samples: int, seed: int, task_index: int, start: int, count: int) -> list[int]:
    """Positions `start .. start+count-1` of a task's endless stream of seeded permutations of its samples."""
    out: list[int] = []
    position = start
    while len(out) < count:
        epoch, offset = divmod(position, num_samples)
        generator = torch.Generator().manual_seed(_stream_seed(seed, task_index, epoch))
        permutation = torch.randperm(num_samples, generator=generator)
        take = min(count - len(out), num_samples - offset)
        out.extend(permutation[offset : offset + take].tolist())
        position += take
    return out


def _stream_seed(seed: int, task_index: int, epoch: int) -> int:
    return (seed * 1_000_003 + task_index * 10_007 + epoch) % (2**63 - 1)


class _ProgressState:
    """The step counters: all a checkpoint needs to continue the data order exactly."""

    def __init__(self) -> None:
        self.step = 0
        self.micro_step = 0


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: safetensors and JSON only, so resuming never unpickles anything (a pickle can run code).

CHECKPOINT_STATE_NAME = "trainer_state.json"
CHECKPOINT_ROUTERS_NAME = "routers.safetensors"
CHECKPOINT_TENSORS_NAME = "optimizer.safetensors"
_CHECKPOINT_FORMAT = "hf_wemoe.router_checkpoint.v1"


def _router_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if is_router_parameter(name)}


def _data_order(tasks: Sequence[ClassificationTask], options: TrainOptions) -> dict:
    """What the data order of a run depends on: a resumed run continues it exactly only if these are equal."""
    return {
        "seed": options.seed,
        "batch_size_per_task": options.batch_size_per_task,
        "gradient_accumulation_steps": options.gradient_accumulation_steps,
        "tasks": {task.name: len(task.dataset) for task in tasks},
    }


def save_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    scaler,
    progress: _ProgressState,
    data_order: dict,
) -> None:
    """Write a training checkpoint (router weights, optimizer, scheduler and grad-scaler state, counters, data
    order) atomically: the folder appears complete or not at all."""
    tensors: dict[str, torch.Tensor] = {}
    state = {
        "format": _CHECKPOINT_FORMAT,
        "step": progress.step,
        "micro_step": progress.micro_step,
        "data_order": data_order,
        "optimizer": encode_state(optimizer.state_dict(), tensors, "optimizer"),
        "scheduler": encode_state(scheduler.state_dict(), tensors, "scheduler"),
        "grad_scaler": encode_state(scaler.state_dict(), tensors, "grad_scaler") if scaler is not None else None,
    }
    routers = {name: p.detach().cpu() for name, p in _router_parameters(model).items()}
    with atomic_output_dir(folder, overwrite=True) as staging:
        write_tensors(staging / CHECKPOINT_ROUTERS_NAME, routers)
        write_tensors(staging / CHECKPOINT_TENSORS_NAME, tensors)
        (staging / CHECKPOINT_STATE_NAME).write_text(json.dumps(state, indent=1) + "\n")


def load_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    scaler,
    progress: _ProgressState,
    data_order: dict,
) -> None:
    """Restore what `save_checkpoint` wrote, reading only safetensors and JSON (other files are ignored).

    Raises `WEMoEError` for a folder that is not such a checkpoint, one written for other routers, or one whose
    data order (seed, batch size, tasks) differs from this run's, which could not continue exactly.
    """
    folder = Path(folder)
    state_path = folder / CHECKPOINT_STATE_NAME
    if not state_path.is_file():
        pickled = sorted(p.name for p in folder.glob("*") if p.suffix in (".pkl", ".bin")) if folder.is_dir() else []
        if pickled:
            raise WEMoEError(
                f"{folder} holds pickle files ({pickled[0]}, ...) but no {CHECKPOINT_STATE_NAME}: it was written by "
                "an earlier version or another tool, and pickle files are never loaded (they can run code); start "
                "the training again without --resume-from"
            )
        raise WEMoEError(f"{folder} is not a training checkpoint (written by --save-every)")
    state = read_json(state_path)
    if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
        raise WEMoEError(f"{state_path} is not a router-training checkpoint of this version of hf-wemoe")
    if state.get("data_order") != data_order:
        raise WEMoEError(
            f"{folder} was written by a run with data order {state.get('data_order')}, this run has {data_order}; "
            "resume with the same --seed, --batch-size-per-task, --gradient-accumulation-steps and tasks"
        )
    routers = read_tensors(folder / CHECKPOINT_ROUTERS_NAME)
    parameters = _router_parameters(model)
    for name, parameter in parameters.items():
        stored = routers.get(name)
        if stored is None or stored.shape != parameter.shape:
            raise WEMoEError(
                f"{folder} holds no router weight '{name}' of shape {tuple(parameter.shape)}: it was written for "
                "another model"
            )
    try:
        tensors = read_tensors(folder / CHECKPOINT_TENSORS_NAME)
        step, micro_step = int(state["step"]), int(state["micro_step"])
        optimizer.load_state_dict(decode_state(state["optimizer"], tensors))
        scheduler.load_state_dict(decode_state(state["scheduler"], tensors))
        if scaler is not None and state.get("grad_scaler") is not None:
            scaler.load_state_dict(decode_state(state["grad_scaler"], tensors))
    except (KeyError, TypeError, ValueError) as err:
        raise WEMoEError(f"{folder} is a damaged training checkpoint: {' '.join(str(err).split())}") from err
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(routers[name])
    progress.step, progress.micro_step = step, micro_step


def launched_on_cpu_only() -> bool:
    """Whether this is one of several processes (torchrun: WORLD_SIZE > 1) on a machine without an accelerator.

    accelerate only joins such processes into one run on an accelerator or when told to use the CPU; otherwise
    each process would train a copy of its own, all racing on the output folder. On the CPU they join over gloo.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return False
    if world <= 1:
        return False
    devices = getattr(torch, "accelerator", None)  # torch >= 2.6
    if devices is not None:
        device = devices.current_accelerator()
        return device is None or device.type == "mps"  # accelerate does not distribute over MPS
    return not torch.cuda.is_available()


def adapt_routers(
    classifier: ZeroShotClassifier,
    tasks: Sequence[ClassificationTask],
    options: TrainOptions,
    checkpoint_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    report_to: str | Sequence[str] | None = None,
    run_config: dict | None = None,
    progress: bool | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Train the routers of `classifier.vision_model` in place; returns a summary (steps, final loss, time).

    `progress` reports steps, loss and images per second on the main process (a bar on a terminal, log lines
    elsewhere; None follows the package's progress policy, False shows nothing).

    Raises `WEMoEError` for a model without routers, unlabelled data with the supervised objective, or a
    non-finite loss.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if not classifier.is_wemoe:
        raise WEMoEError(
            "the model has no routers to adapt (a static CLIP vision model); build a WEMoE model with "
            "`hf-wemoe merge --method wemoe` first"
        )
    if options.objective == "supervised":
        unlabelled = [t.name for t in tasks if t.dataset.label_column is None]
        if unlabelled:
            raise WEMoEError(
                f"--objective supervised needs labels; task(s) {unlabelled} have no label column"
            )

    accelerator = Accelerator(
        cpu=launched_on_cpu_only(),
        mixed_precision=options.mixed_precision,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        log_with=report_to or None,
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    if options.batch_size_per_task % world:
        raise WEMoEError(
            f"--batch-size-per-task {options.batch_size_per_task} must be divisible by the number of processes "
            f"({world}): each process takes an equal share of every global batch"
        )
    set_seed(options.seed)
    vision = classifier.vision_model
    if options.routing is not None:
        vision.set_routing(options.routing)
    classifier.to(accelerator.device)
    classifier.check_runs()
    heads = {task.name: task.head.to(accelerator.device) for task in tasks}
    routers = vision.router_parameters()
    optimizer = torch.optim.Adam(routers, lr=options.lr)
    scheduler = _make_scheduler(optimizer, options)
    optimizer = accelerator.prepare_optimizer(optimizer)
    progress_state = _ProgressState()
    data_order = _data_order(tasks, options)
    if resume_from is not None:
        load_checkpoint(
            resume_from, vision, optimizer, scheduler, accelerator.scaler, progress_state, data_order
        )
    if report_to:
        accelerator.init_trackers("hf-wemoe", config=run_config or options.model_dump())

    local_batch = options.batch_size_per_task // world
    start_time, images, last_loss = time.perf_counter(), 0, float("nan")
    bar = progress_bar(
        options.steps,
        "adapting routers",
        unit="step",
        show=progress if accelerator.is_local_main_process else False,
        initial=progress_state.step,
    )
    classifier.train()
    while progress_state.step < options.steps:
        with accelerator.accumulate(classifier):
            batches = [
                collate_images([task.dataset[i] for i in indices])
                for task, indices in zip(
                    tasks, _step_indices(tasks, options, progress_state.micro_step, rank, world)
                )
            ]
            with accelerator.autocast():
                embeds = _embed_batches(
                    classifier, [b["pixel_values"].to(accelerator.device) for b in batches]
                )
            loss = 0.0
            for task, batch, task_embeds in zip(tasks, batches, embeds):
                logits = heads[task.name](task_embeds.float())
                if options.objective == "entropy":
                    loss = loss + entropy_loss(logits)
                else:
                    loss = loss + torch.nn.functional.cross_entropy(
                        logits, batch["labels"].to(accelerator.device)
                    )
                images += local_batch * world
            if not torch.isfinite(loss):
                raise WEMoEError(
                    f"the loss became {loss.item()} at step {progress_state.step + 1}; lower --lr or use "
                    "--mixed-precision no"
                )
            accelerator.backward(loss)
            progress_state.micro_step += 1
            if accelerator.sync_gradients:
                _average_gradients(routers, accelerator)
            optimizer.step()
            optimizer.zero_grad()
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        progress_state.step += 1
        # The loss of the whole global batch, for reporting (each process computed its share).
        last_loss = float(accelerator.reduce(loss.detach(), reduction="mean"))
        if on_step is not None:
            on_step(progress_state.step, last_loss)
        rate = images / max(time.perf_counter() - start_time, 1e-9)
        bar.update(1, loss=f"{last_loss:.4f}", img_s=f"{rate:.0f}")
        if report_to and progress_state.step % options.log_every == 0:
            accelerator.log({"loss": last_loss, "lr": scheduler.get_last_lr()[0]}, step=progress_state.step)
        if checkpoint_dir and options.save_every and progress_state.step % options.save_every == 0:
            if accelerator.is_main_process:  # every process holds the same routers and optimizer state
                save_checkpoint(
                    Path(checkpoint_dir) / f"step-{progress_state.step}",
                    vision,
                    optimizer,
                    scheduler,
                    accelerator.scaler,
                    progress_state,
                    data_order,
                )
            accelerator.wait_for_everyone()
    bar.close()
    classifier.eval()
    if report_to:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return {
        "steps": progress_state.step,
        "final_loss": last_loss,
        "seconds": round(time.perf_counter() - start_time, 2),
        "processes": world,
        "is_main_process": accelerator.is_main_process,
    }


def _step_indices(
    tasks: Sequence[ClassificationTask], options: TrainOptions, micro_step: int, rank: int, world: int
) -> list[list[int]]:
    """This process's share of every task's global batch for one micro-step."""
    size = options.batch_size_per_task
    return [
        stream_indices(len(task.dataset), options.seed, index, micro_step * size, size)[rank::world]
        for index, task in enumerate(tasks)
    ]


def _embed_batches(classifier: ZeroShotClassifier, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Image embeddings of every task's batch. With per-sample routing every image is routed on its own, so
    all tasks go through the model as one batch (same result, one pass); batch routing averages the routing
    weights over a batch, so each task keeps its own pass."""
    if classifier.vision_model.config.routing == "sample":
        return list(classifier.embed(torch.cat(batches)).split([len(b) for b in batches]))
    return [classifier.embed(batch) for batch in batches]


def _average_gradients(parameters: Sequence[torch.nn.Parameter], accelerator) -> None:
    """Average router gradients over processes (the model is not wrapped in DDP: only routers have gradients,
    and DDP would broadcast the large frozen task-vector buffers)."""
    if accelerator.num_processes == 1:
        return
    for parameter in parameters:
        if parameter.grad is not None:
            parameter.grad.copy_(accelerator.reduce(parameter.grad, reduction="mean"))


def _make_scheduler(optimizer: torch.optim.Optimizer, options: TrainOptions):
    if options.scheduler == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    total = options.steps
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    )
