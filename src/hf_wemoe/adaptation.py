"""Router adaptation: train only the WEMoE routers on unlabelled data (or supervised).

One step takes one batch from every task (tasks are all sampled every step) and sums the per-task losses. An
`accelerate.Accelerator` drives devices, mixed precision, gradient accumulation and trackers. Checkpoints are
safetensors and JSON written here (not accelerate's pickle files), so resuming never unpickles anything.

Objectives (`TrainOptions.objective`), all per task and summed over tasks:

- `entropy`: the papers' test-time objective, the mean entropy of the predictions. It can collapse: a task whose
  predictions drift towards a few classes lowers its entropy by predicting those classes ever more confidently.
- `infomax`: mean entropy minus the entropy of the batch-marginal prediction (information maximisation): confident
  *and* diverse predictions, so predicting one class everywhere is penalised instead of rewarded.
- `supervised`: cross-entropy with the labels.

`routing_loss` adds a term that uses only which task's dataset each image came from (test-time adaptation knows
it; inference does not need it): the mean squared distance of every MoE layer's routing weights of a task's images
from routing to that task's own expert alone (tasks must be named like experts). Inference stays per-sample
routing without any task id.

Every `monitor_every` steps, a fixed probe set of unlabelled images per task measures how many classes each task
still predicts (the exponential of the marginal entropy), the mean entropy, the mutual information between
images and predictions (marginal minus mean entropy), and the mean routing weight of every expert. A task whose
number of predicted classes falls below `collapse_fraction` of its starting value is *collapsing*: a warning names
it. With `keep_best`, the routers of the probe with the highest mean mutual information (an unlabelled criterion;
the starting routers included) are kept at the end instead of the last ones.

Data order is a pure function of (seed, task, position): each task's samples form an endless stream of seeded
permutations, and the global batch of micro-step m is positions [m*B, (m+1)*B) of that stream. A checkpoint
therefore only needs the micro-step counter to continue exactly, and with several processes each rank takes
every world_size-th sample of the global batch, so the update equals a one-process run with the same global
batch (router gradients are averaged across processes).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
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

logger = logging.getLogger(__name__)

Objective = Literal["entropy", "infomax", "supervised"]
# The routing term's weight when `routing_loss` is left unset and every task is named like an expert.
AUTO_ROUTING_LOSS = 3.0
OBJECTIVES: tuple[str, ...] = ("entropy", "infomax", "supervised")


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
    objective: Objective = Field(
        "infomax",
        description="loss per task: infomax (mean entropy minus the entropy of the batch-marginal prediction: "
        "confident and diverse; chosen from measurements on both toy-zoo presets), entropy (the papers': mean "
        "entropy of the predictions, can collapse), or supervised (cross-entropy with the labels)",
    )
    routing_loss: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="weight of a term pulling each task's routing towards its own expert (uses which task's "
        "dataset an image came from, never at inference; tasks must be named like experts)",
        json_schema_extra={"metavar": "W", "default_text": "3 when every task is named like an expert, else 0"},
    )
    monitor_every: int = Field(
        20, ge=0, description="measure collapse and routing on a fixed probe set every N steps (0: never)"
    )
    monitor_images: int = Field(64, ge=1, description="unlabelled probe images per task for the monitor")
    collapse_fraction: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="warn when a task predicts fewer than this fraction of the classes it predicted at the start",
        json_schema_extra={"metavar": "F"},
    )
    keep_best: bool = Field(
        False,
        description="keep the routers of the probe with the highest mutual information between images and "
        "predictions (unlabelled; the starting routers included) instead of the last ones",
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


def marginal_entropy(
    logits: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """Shannon entropy of the batch-marginal prediction, the mean of softmax(logits) over the batch (float32).

    `gather` maps this process's mean prediction to the mean over the global batch of all processes (with the
    gradient of this process's share), so that several processes compute the entropy of one global marginal.
    """
    marginal = torch.softmax(logits.float(), dim=-1).mean(dim=0)
    if gather is not None:
        marginal = gather(marginal)
    return -(marginal * torch.log(marginal.clamp_min(1e-12))).sum()


def infomax_loss(
    logits: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """Mean entropy minus marginal entropy: minimised by confident predictions that still use every class."""
    return entropy_loss(logits) - marginal_entropy(logits, gather)


def routing_target_loss(routing: Sequence[torch.Tensor], expert: int) -> torch.Tensor:
    """How far routing weights (one (B, K) tensor per MoE layer) are from routing to `expert` alone: the squared
    shortfall of its weight below 1 plus the squared weights of the other experts, averaged over samples and
    layers. Weights above 1 on the own expert cost nothing: a pruned task vector may want more than its share."""
    stacked = torch.stack([weights.float() for weights in routing])  # (layers, B, K)
    own = stacked[..., expert]
    others = stacked.pow(2).sum(dim=-1) - own.pow(2)
    return (torch.relu(1.0 - own).pow(2) + others).mean()


def objective_label(options: TrainOptions) -> str:
    """How a row of a results table was adapted, e.g. `entropy` or `infomax + routing 1`."""
    label = options.objective
    if options.routing_loss is None:
        label += " + routing auto"
    elif options.routing_loss:
        label += f" + routing {options.routing_loss:g}"
    return label + (" (best kept)" if options.keep_best else "")


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


def router_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the router parameters (what adaptation and calibration change)."""
    return {name: parameter.detach().clone() for name, parameter in _router_parameters(model).items()}


@torch.no_grad()
def load_router_state(model: torch.nn.Module, routers: Mapping[str, torch.Tensor]) -> None:
    """Copy `routers` (name -> tensor, as `router_state` gives) into the model's router parameters."""
    parameters = _router_parameters(model)
    for name, value in routers.items():
        parameters[name].copy_(value)


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
    monitor: AdaptationMonitor | None = None,
) -> None:
    """Write a training checkpoint (router weights, optimizer, scheduler and grad-scaler state, counters, data
    order, the monitor's records and best routers) atomically: the folder appears complete or not at all."""
    tensors: dict[str, torch.Tensor] = {}
    state = {
        "format": _CHECKPOINT_FORMAT,
        "step": progress.step,
        "micro_step": progress.micro_step,
        "data_order": data_order,
        "optimizer": encode_state(optimizer.state_dict(), tensors, "optimizer"),
        "scheduler": encode_state(scheduler.state_dict(), tensors, "scheduler"),
        "grad_scaler": encode_state(scaler.state_dict(), tensors, "grad_scaler") if scaler is not None else None,
        "monitor": monitor.state() if monitor is not None else None,
    }
    if monitor is not None and monitor.best_routers is not None:
        tensors.update({_BEST_PREFIX + name: value.cpu() for name, value in monitor.best_routers.items()})
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
    monitor: AdaptationMonitor | None = None,
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
        if monitor is not None and state.get("monitor") is not None:
            monitor.load_state(state["monitor"], tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise WEMoEError(f"{folder} is a damaged training checkpoint: {' '.join(str(err).split())}") from err
    load_router_state(model, {name: routers[name] for name in parameters})
    progress.step, progress.micro_step = step, micro_step


# ----------------------------------------------------------------------------------------------------------------
# The monitor: collapse detection, routing statistics and the best routers by an unlabelled criterion.


class AdaptationMonitor:
    """Measures every task on a fixed probe set of unlabelled images, detects collapse and keeps the best routers.

    The probe images of each task are the first `options.monitor_images` of a seeded permutation of its samples,
    the same in every process and every run with the same seed. A probe (`measure`) records per task:
    `classes` (the exponential of the marginal entropy: how many classes the task still predicts), `entropy`
    (mean prediction entropy), `information` (marginal minus mean entropy: the mutual information between images
    and predictions, in nats) and `routing` (mean routing weight of every expert, averaged over MoE layers); its
    `score` is the mean information over tasks.
    """

    def __init__(
        self,
        classifier: ZeroShotClassifier,
        tasks: Sequence[ClassificationTask],
        options: TrainOptions,
        batch_size: int = 128,
    ) -> None:
        self.classifier = classifier
        self.tasks = list(tasks)
        self.options = options
        self.batch_size = batch_size
        self.indices = {
            task.name: torch.randperm(
                len(task.dataset), generator=torch.Generator().manual_seed(_stream_seed(options.seed, i, -1))
            )[: options.monitor_images].tolist()
            for i, task in enumerate(self.tasks)
        }
        self.records: list[dict] = []
        self.start: dict[str, float] = {}
        self.collapsed: dict[str, int] = {}
        self.best_score = -math.inf
        self.best_step: int | None = None
        self.best_routers: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def measure(self, step: int) -> dict:
        """Probe every task at `step`; warns about newly collapsing tasks and updates the best routers."""
        was_training = self.classifier.training
        self.classifier.eval()
        device = next(self.classifier.parameters()).device
        record: dict = {"step": step, "tasks": {}}
        try:
            for task in self.tasks:
                logits, routing = [], []
                indices = self.indices[task.name]
                for first in range(0, len(indices), self.batch_size):
                    batch = collate_images([task.dataset[i] for i in indices[first : first + self.batch_size]])
                    out, weights = self.classifier(
                        batch["pixel_values"].to(device), task.head.to(device), output_routing_weights=True
                    )
                    logits.append(out.float())
                    routing.append(torch.stack([w.float() for w in weights]).mean(dim=0))  # (B, K)
                logits_all = torch.cat(logits)
                mean_entropy = float(entropy_loss(logits_all))
                marginal = float(marginal_entropy(logits_all))
                record["tasks"][task.name] = {
                    "classes": round(math.exp(marginal), 4),
                    "entropy": round(mean_entropy, 5),
                    "information": round(marginal - mean_entropy, 5),
                    "routing": [round(float(v), 5) for v in torch.cat(routing).mean(dim=0)],
                }
        finally:
            self.classifier.train(was_training)
        record["score"] = round(sum(t["information"] for t in record["tasks"].values()) / len(self.tasks), 5)
        self.records.append(record)
        self._check_collapse(record)
        if record["score"] > self.best_score:
            self.best_score, self.best_step = record["score"], step
            if self.options.keep_best:
                self.best_routers = router_state(self.classifier.vision_model)
        return record

    def _check_collapse(self, record: dict) -> None:
        for name, values in record["tasks"].items():
            if name not in self.start:
                self.start[name] = values["classes"]
                continue
            if name in self.collapsed or values["classes"] >= self.options.collapse_fraction * self.start[name]:
                continue
            self.collapsed[name] = record["step"]
            hint = (
                "the best routers so far will be kept (--keep-best)"
                if self.options.keep_best
                else "use --objective infomax, a --routing-loss, or --keep-best to keep the best routers"
            )
            logger.warning(
                "task %r is collapsing at step %d: its predictions use %.1f classes, %.1f at the start; %s",
                name,
                record["step"],
                values["classes"],
                self.start[name],
                hint,
            )

    def restore_best(self) -> bool:
        """Put the best routers back (with `keep_best`); returns whether they differ from the last ones."""
        if self.best_routers is None or self.best_step == (self.records[-1]["step"] if self.records else None):
            return False
        load_router_state(self.classifier.vision_model, self.best_routers)
        return True

    def tracker_values(self, record: dict) -> dict[str, float]:
        """The probe's scalars, named for trackers (`monitor/<task>/classes`, ...)."""
        values = {"monitor/score": record["score"]}
        for task, stats in record["tasks"].items():
            for key in ("classes", "entropy", "information"):
                values[f"monitor/{task}/{key}"] = stats[key]
            for expert, weight in zip(self.classifier.vision_model.config.expert_names, stats["routing"]):
                values[f"monitor/{task}/routing/{expert}"] = weight
        return values

    def state(self) -> dict:
        """What a checkpoint keeps of the monitor (the best routers are stored as tensors beside it)."""
        return {
            "records": self.records,
            "start": self.start,
            "collapsed": self.collapsed,
            "best_score": self.best_score if self.best_step is not None else None,
            "best_step": self.best_step,
        }

    def load_state(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Restore `state()` and the best routers saved with it."""
        self.records = list(state.get("records", []))
        self.start = dict(state.get("start", {}))
        self.collapsed = {k: int(v) for k, v in state.get("collapsed", {}).items()}
        self.best_step = state.get("best_step")
        self.best_score = state["best_score"] if state.get("best_score") is not None else -math.inf
        best = {k[len(_BEST_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_BEST_PREFIX)}
        self.best_routers = best or None

    def summary(self) -> dict:
        """The trajectory, the collapsed tasks (name -> step) and the best probe, for eval_results.json."""
        return {
            "probe_images": self.options.monitor_images,
            "every": self.options.monitor_every,
            "trajectory": self.records,
            "collapsed": dict(self.collapsed),
            "best_step": self.best_step,
            "best_score": self.best_score if self.best_step is not None else None,
        }


_BEST_PREFIX = "best_routers."


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
    experts = list(classifier.vision_model.config.expert_names)
    strangers = [t.name for t in tasks if t.name not in experts]
    if options.routing_loss is None:
        options = options.model_copy(update={"routing_loss": AUTO_ROUTING_LOSS if not strangers else 0.0})
        logger.info("routing term weight %g (tasks %s named like experts)", options.routing_loss,
                    "all" if not strangers else "not all")  # fmt: skip
    if options.routing_loss:
        if strangers:
            raise WEMoEError(
                f"--routing-loss pulls each task towards the expert of the same name, and task(s) {strangers} "
                f"name no expert (experts: {', '.join(experts)}); rename the tasks or drop --routing-loss"
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
    monitor = AdaptationMonitor(classifier, tasks, options) if options.monitor_every else None
    if resume_from is not None:
        load_checkpoint(
            resume_from, vision, optimizer, scheduler, accelerator.scaler, progress_state, data_order, monitor
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
    expert_index = {name: i for i, name in enumerate(vision.config.expert_names)}

    def gather_mean(local: torch.Tensor) -> torch.Tensor:
        # The global batch's mean, differentiable in this process's share: router gradients are averaged over
        # processes, so each process back-propagates the whole marginal term through its own images.
        if world == 1:
            return local
        total = accelerator.reduce(local.detach().clone(), reduction="mean")
        return local + (total - local).detach()

    with_routing = bool(options.routing_loss)
    if monitor is not None and not monitor.records:
        _log_probe(monitor, monitor.measure(progress_state.step), accelerator, report_to)
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
                    classifier, [b["pixel_values"].to(accelerator.device) for b in batches], with_routing
                )
            loss = 0.0
            for task, batch, (task_embeds, routing) in zip(tasks, batches, embeds):
                logits = heads[task.name](task_embeds.float())
                if options.objective == "entropy":
                    loss = loss + entropy_loss(logits)
                elif options.objective == "infomax":
                    loss = loss + infomax_loss(logits, gather_mean)
                else:
                    loss = loss + torch.nn.functional.cross_entropy(
                        logits, batch["labels"].to(accelerator.device)
                    )
                if with_routing:
                    loss = loss + options.routing_loss * routing_target_loss(routing, expert_index[task.name])
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
        if monitor is not None and progress_state.step % options.monitor_every == 0:
            _log_probe(monitor, monitor.measure(progress_state.step), accelerator, report_to)
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
                    monitor,
                )
            accelerator.wait_for_everyone()
    bar.close()
    if monitor is not None and monitor.records[-1]["step"] != progress_state.step:
        # The end of this run, after its last checkpoint: a resumed run never sees this probe, as a longer
        # uninterrupted run would not have made it either.
        _log_probe(monitor, monitor.measure(progress_state.step), accelerator, report_to)
    classifier.eval()
    kept_best = monitor.restore_best() if monitor is not None and options.keep_best else False
    if kept_best:
        logger.info("kept the routers of step %s (highest mutual information on the probe set)", monitor.best_step)
    if report_to:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return {
        "steps": progress_state.step,
        "final_loss": last_loss,
        "seconds": round(time.perf_counter() - start_time, 2),
        "processes": world,
        "is_main_process": accelerator.is_main_process,
        "objective": objective_label(options),
        "monitor": monitor.summary() if monitor is not None else None,
        "kept_step": (monitor.best_step if kept_best else progress_state.step) if monitor is not None else None,
    }


def _log_probe(monitor: AdaptationMonitor, record: dict, accelerator, report_to) -> None:
    logger.debug("probe at step %d: score %.4f", record["step"], record["score"])
    if report_to:
        accelerator.log(monitor.tracker_values(record), step=record["step"])


def _step_indices(
    tasks: Sequence[ClassificationTask], options: TrainOptions, micro_step: int, rank: int, world: int
) -> list[list[int]]:
    """This process's share of every task's global batch for one micro-step."""
    size = options.batch_size_per_task
    return [
        stream_indices(len(task.dataset), options.seed, index, micro_step * size, size)[rank::world]
        for index, task in enumerate(tasks)
    ]


def _embed_batches(
    classifier: ZeroShotClassifier, batches: list[torch.Tensor], with_routing: bool = False
) -> list[tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]]:
    """`(embeddings, routing weights per MoE layer or None)` of every task's batch. With per-sample routing every
    image is routed on its own, so all tasks go through the model as one batch (same result, one pass); batch
    routing averages the routing weights over a batch, so each task keeps its own pass."""
    if classifier.vision_model.config.routing == "sample":
        sizes = [len(b) for b in batches]
        if not with_routing:
            return [(e, None) for e in classifier.embed(torch.cat(batches)).split(sizes)]
        embeds, routing = classifier.embed(torch.cat(batches), output_routing_weights=True)
        per_layer = [weights.split(sizes) for weights in routing]
        return [(e, tuple(layer[i] for layer in per_layer)) for i, e in enumerate(embeds.split(sizes))]
    if not with_routing:
        return [(classifier.embed(batch), None) for batch in batches]
    return [classifier.embed(batch, output_routing_weights=True) for batch in batches]


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
