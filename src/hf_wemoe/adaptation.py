"""Router adaptation: train only the WEMoE routers, by entropy minimisation on unlabelled data (or supervised).

One step takes one batch from every task (tasks are all sampled every step) and sums the per-task losses. An
`accelerate.Accelerator` drives devices, mixed precision, gradient accumulation, trackers and checkpointing.

Data order is a pure function of (seed, task, position): each task's samples form an endless stream of seeded
permutations, and the global batch of micro-step m is positions [m*B, (m+1)*B) of that stream. A checkpoint
therefore only needs the micro-step counter to continue exactly, and with several processes each rank takes
every world_size-th sample of the global batch, so the update equals a one-process run with the same global
batch (router gradients are averaged across processes).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from hf_wemoe.errors import WEMoEError
from hf_wemoe.models.configuration_wemoe import ROUTING_MODES
from hf_wemoe.zeroshot.classifier import ClassificationTask, ZeroShotClassifier
from hf_wemoe.zeroshot.data import collate_images


class TrainOptions(BaseModel):
    """Router-adaptation hyperparameters, shared by the `hf-wemoe train` flags and its YAML config file."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(1000, ge=1, description="optimizer steps")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate")
    batch_size_per_task: int = Field(16, ge=1, description="global batch size per task and step")
    scheduler: Literal["constant", "cosine"] = Field("constant", description="learning-rate schedule")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="autocast precision")
    seed: int = Field(0, description="seed of the data order")
    objective: Literal["entropy", "supervised"] = Field(
        "entropy",
        description="loss: entropy of the predictions (unlabelled), or cross-entropy with the labels",
    )
    routing: Literal[ROUTING_MODES] | None = Field(  # type: ignore[valid-type]
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


class _RouterState:
    """Router weights as a checkpointable object (`state_dict`/`load_state_dict`), so checkpoints stay small."""

    def __init__(self, model: torch.nn.Module):
        self.parameters = dict((name, p) for name, p in model.named_parameters() if ".router." in f".{name}")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().cpu().clone() for name, p in self.parameters.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self.parameters.items():
                p.copy_(state[name])


class _ProgressState:
    """The step counters: all a checkpoint needs to continue the data order exactly."""

    def __init__(self) -> None:
        self.step = 0
        self.micro_step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "micro_step": self.micro_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.micro_step = int(state["step"]), int(state["micro_step"])


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
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Train the routers of `classifier.vision_model` in place; returns a summary (steps, final loss, time).

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
        vision.config.routing = options.routing
    classifier.to(accelerator.device)
    heads = {task.name: task.head.to(accelerator.device) for task in tasks}
    routers = vision.router_parameters()
    optimizer = torch.optim.Adam(routers, lr=options.lr)
    scheduler = _make_scheduler(optimizer, options)
    optimizer = accelerator.prepare_optimizer(optimizer)
    router_state, progress_state = _RouterState(vision), _ProgressState()
    accelerator.register_for_checkpointing(scheduler, router_state, progress_state)
    if resume_from is not None:
        if not Path(resume_from, "custom_checkpoint_0.pkl").is_file():
            raise WEMoEError(f"{resume_from} is not a training checkpoint (written by --save-every)")
        accelerator.load_state(str(resume_from))
    if report_to:
        accelerator.init_trackers("hf-wemoe", config=run_config or options.model_dump())

    local_batch = options.batch_size_per_task // world
    start_time, images, last_loss = time.perf_counter(), 0, float("nan")
    bar = tqdm(
        total=options.steps,
        initial=progress_state.step,
        desc="adapting routers",
        disable=not (progress and accelerator.is_local_main_process),
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
        bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{rate:.0f}")
        bar.update(1)
        if report_to and progress_state.step % options.log_every == 0:
            accelerator.log({"loss": last_loss, "lr": scheduler.get_last_lr()[0]}, step=progress_state.step)
        if checkpoint_dir and options.save_every and progress_state.step % options.save_every == 0:
            accelerator.save_state(str(Path(checkpoint_dir) / f"step-{progress_state.step}"))
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
