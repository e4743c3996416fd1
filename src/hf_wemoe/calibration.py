"""Router calibration: set the WEMoE routers from a few unlabelled images per task, without gradient steps.

Each task is routed to its own expert (a one-hot routing on expert k gives exactly expert k's MLP). The encoder is
walked layer by layer over all calibration images at once, so the whole calibration is one forward pass: at every
MoE layer the router's features of the states it reads (the MLP input, or attention's input when the layer routes
attention projections) are computed (depth 2: token mean of ReLU(hidden(h)) with the router's current hidden
layer; depth 1: token mean of h), the router's output layer is fitted to one-hot targets by ridge regression in
closed form, and the layer then runs with the fitted router to give the next layer its input.

A shared router is refitted at every MoE layer on the features of all MoE layers so far: its final fit covers
every layer, but the inputs of the earlier layers were computed while the earlier fits routed them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from hf_wemoe.errors import WEMoEError
from hf_wemoe.models.modeling_wemoe import WEMoEAttention, WEMoECLIPVisionModel, WEMoERouter
from hf_wemoe.utils.progress import progress as report_progress

MAX_IMAGES_PER_TASK = 64
"""The most calibration images per task: calibration is meant for a handful of unlabelled images."""

DEFAULT_RIDGE = 1e-3
"""Ridge strength relative to the features' mean eigenvalue (scale-free: the same for any model width)."""


class CalibrationTask(Protocol):
    """What calibration reads from a task: its name (an expert's) and a dataset of `{"pixel_values": ...}` items
    (a `ClassificationTask` qualifies)."""

    name: str
    dataset: Any


@dataclass
class CalibrationSummary:
    """What a router calibration did."""

    tasks: list[str]
    images_per_task: dict[str, int]
    """Calibration images used per task (fewer than asked when a dataset is smaller)."""
    layers: int
    """MoE layers calibrated."""
    seconds: float
    routing_accuracy: float
    """Fraction of calibration images whose routing, averaged over the MoE layers, is largest on their task's
    expert after calibration."""
    own_weight: float
    """Mean routing weight of each calibration image's own expert, averaged over MoE layers (1 is one-hot)."""

    def line(self) -> str:
        """A one-line summary for the command line."""
        counts = sorted(set(self.images_per_task.values()))
        images = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        return (
            f"calibrated the routers of {self.layers} MoE layers on {len(self.tasks)} tasks ({images} images "
            f"each, {self.seconds:.1f}s): {100 * self.routing_accuracy:.1f}% of the images route to their "
            f"task's expert (mean own weight {self.own_weight:.2f})"
        )

    def to_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready data."""
        return asdict(self)


def check_calibration(
    expert_names: Sequence[str], router_depth: int, tasks: Sequence[str], images_per_task: int
) -> None:
    """Refuse, in one line each, what calibration cannot do: a depth-0 router (it ignores its input), a task that
    names no expert, or more than `MAX_IMAGES_PER_TASK` images per task.

    Raises:
        WEMoEError: the first problem found.
    """
    if router_depth not in (1, 2):
        raise WEMoEError(
            f"router calibration needs router_depth 1 or 2; this model has router_depth {router_depth}, whose "
            "routers ignore their input (merge with --router-depth 1 or 2)"
        )
    for name in tasks:
        if name not in expert_names:
            raise WEMoEError(
                f"calibration task {name!r} is not an expert of the model; name each task after the expert it "
                f"should route to: {', '.join(expert_names)}"
            )
    if not 1 <= images_per_task <= MAX_IMAGES_PER_TASK:
        raise WEMoEError(
            f"images per task must be 1 to {MAX_IMAGES_PER_TASK} (calibration uses a few unlabelled images); "
            f"got {images_per_task}"
        )
    if not tasks:
        raise WEMoEError("router calibration needs at least one task")


def calibration_indices(num_samples: int, count: int, seed: int, task_index: int) -> list[int]:
    """The first `count` positions of a seeded permutation of a task's samples (all of them when fewer)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + task_index)
    return torch.randperm(num_samples, generator=generator)[:count].tolist()


@torch.no_grad()
def calibrate_routers(
    vision: WEMoECLIPVisionModel,
    tasks: Sequence[CalibrationTask],
    images_per_task: int = MAX_IMAGES_PER_TASK,
    seed: int = 0,
    ridge: float = DEFAULT_RIDGE,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> CalibrationSummary:
    """Set the routers of `vision` in place so that each task's images route to its expert (its name).

    Only router output layers change (and nothing else: the depth-2 hidden layers keep their values). The images
    are the first `images_per_task` of a permutation of each task's dataset seeded by `seed`; layers run on
    chunks of `batch_size` images; `device` defaults to the model's (the model returns to its device after).
    `ridge` scales the ridge penalty by the mean eigenvalue of the centred features. The same arguments give
    bit-identical routers.

    Raises:
        WEMoEError: a model without routers, a depth-0 router, a task that is not an expert, images per task not
            in 1..64, an empty dataset.
    """
    start = time.perf_counter()
    if not isinstance(vision, WEMoECLIPVisionModel):
        raise WEMoEError(
            f"a {type(vision).__name__} has no routers to calibrate; build a WEMoE model with "
            "`hf-wemoe merge --method wemoe` first"
        )
    config = vision.config
    names = list(config.expert_names)
    check_calibration(names, config.router_depth, [task.name for task in tasks], images_per_task)
    if ridge <= 0:
        raise WEMoEError(f"the ridge strength must be positive, got {ridge}")

    pixels, targets, counts = [], [], {}
    for index, task in enumerate(tasks):
        if len(task.dataset) == 0:
            raise WEMoEError(f"calibration task {task.name!r} has no images")
        chosen = calibration_indices(len(task.dataset), images_per_task, seed, index)
        pixels.extend(task.dataset[i]["pixel_values"] for i in chosen)
        targets.extend([names.index(task.name)] * len(chosen))
        counts[task.name] = len(chosen)
    expert = torch.tensor(targets)
    one_hot = torch.nn.functional.one_hot(expert, len(names)).double()

    original_device = next(vision.parameters()).device
    target_device = torch.device(device) if device is not None else original_device
    vision.to(target_device)
    try:
        routing = _walk_and_fit(
            vision, torch.stack(pixels), one_hot, ridge, batch_size, target_device, progress
        )
    finally:
        vision.to(original_device)
    mean_routing = routing.mean(dim=0)  # (N, K), averaged over MoE layers
    return CalibrationSummary(
        tasks=[task.name for task in tasks],
        images_per_task=counts,
        layers=routing.shape[0],
        seconds=time.perf_counter() - start,
        routing_accuracy=float((mean_routing.argmax(dim=-1) == expert).double().mean()),
        own_weight=float(mean_routing.gather(1, expert[:, None]).mean()),
    )


def _walk_and_fit(
    vision: WEMoECLIPVisionModel,
    pixel_values: torch.Tensor,
    targets: torch.Tensor,
    ridge: float,
    batch_size: int,
    device: torch.device,
    progress: bool | None,
) -> torch.Tensor:
    """One forward pass over all images, fitting each MoE layer's router before its MLP runs; returns the
    fitted routing (num_moe_layers, N, K) of the calibration images."""
    dtype = vision.embeddings.patch_embedding.weight.dtype
    chunks = [
        vision.pre_layrnorm(vision.embeddings(chunk.to(device=device, dtype=dtype)))
        for chunk in pixel_values.split(batch_size)
    ]
    shared = vision.encoder.router
    features: list[torch.Tensor] = []  # the shared router's features of every MoE layer so far
    routing: list[torch.Tensor] = []
    layers = report_progress(vision.encoder.layers, "calibrating routers", unit="layer", show=progress)
    for layer in layers:
        # A router reads the states entering the layer's first routed module: attention's input when the layer
        # routes attention projections, else the MLP's (see WEMoECLIPEncoderLayer).
        routes_attention = isinstance(layer.self_attn, WEMoEAttention)
        if not routes_attention:
            # The layer's forward, split at the MLP input.
            chunks = [
                chunk + layer.self_attn(hidden_states=layer.layer_norm1(chunk), attention_mask=None)[0]
                for chunk in chunks
            ]
        if layer.is_moe:
            routed = layer.self_attn if routes_attention else layer.mlp
            norm = layer.layer_norm1 if routes_attention else layer.layer_norm2
            router = shared if shared is not None else routed.router
            layer_features = torch.cat([_router_features(router, norm(c)) for c in chunks])
            features.append(layer_features)
            fitted = features if shared is not None else [layer_features]
            _fit_output_layer(router, torch.cat(fitted), targets.repeat(len(fitted), 1), ridge)
            routing.append(router.output(layer_features.to(router.output.weight.dtype)).double().cpu())
            # The layer itself routes with the fitted router, one merged layer per image.
            if routes_attention:
                chunks = [layer(c, router=shared, routing="sample")[0] for c in chunks]
            else:
                chunks = [c + layer.mlp(layer.layer_norm2(c), router=shared, routing="sample")[0] for c in chunks]
        else:
            chunks = [c + layer.mlp(layer.layer_norm2(c)) for c in chunks]
    if shared is not None:  # the final shared fit routes every layer's features
        routing = [shared.output(f.to(shared.output.weight.dtype)).double().cpu() for f in features]
    return torch.stack(routing)


def _router_features(router: WEMoERouter, hidden_states: torch.Tensor) -> torch.Tensor:
    """What the router's output layer reads, averaged over tokens (see WEMoERouter.forward): (B, features)."""
    features = hidden_states.to(router.output.weight.dtype)
    if router.depth == 2:
        features = torch.relu(router.hidden(features))
    return features.mean(dim=1)


def _fit_output_layer(
    router: WEMoERouter, features: torch.Tensor, targets: torch.Tensor, ridge: float
) -> None:
    """Write the ridge-regression fit of `targets` (N, K) on `features` (N, F) into the router's output layer."""
    x = features.double().cpu()
    mean_x, mean_y = x.mean(dim=0), targets.mean(dim=0)
    x, y = x - mean_x, targets - mean_y
    num, dim = x.shape
    energy = float(x.square().sum())
    # Relative to the mean non-zero eigenvalue of x^T x, so the default suits any width and feature scale.
    penalty = ridge * energy / min(num, dim) if energy > 0 else ridge
    if num < dim:  # dual form: an N x N system
        weight = x.T @ torch.linalg.solve(x @ x.T + penalty * torch.eye(num, dtype=x.dtype), y)
    else:
        weight = torch.linalg.solve(x.T @ x + penalty * torch.eye(dim, dtype=x.dtype), x.T @ y)
    bias = mean_y - mean_x @ weight
    output = router.output
    output.weight.copy_(weight.T.to(output.weight))
    output.bias.copy_(bias.to(output.bias))


__all__ = [
    "DEFAULT_RIDGE",
    "MAX_IMAGES_PER_TASK",
    "CalibrationSummary",
    "CalibrationTask",
    "calibrate_routers",
    "calibration_indices",
    "check_calibration",
]
