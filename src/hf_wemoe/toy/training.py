"""Training loops of the toy zoo: CLIP pretraining, expert fine-tuning, zero-shot heads (its accuracy is the
package's own, see `hf_wemoe.toy.evaluate_world`).

Everything runs on CPU in fp32 with seeded generators, so a build is bitwise reproducible for a fixed
torch version, thread count and CPU (see :func:`deterministic_torch`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, CLIPTokenizer, CLIPVisionModel

from hf_wemoe.toy.tasks import TASKS
from hf_wemoe.utils.progress import ProgressBar, progress_bar

__all__ = [
    "BUILD_THREADS",
    "PRETRAIN_THREADS",
    "FinetuneRecipe",
    "PreserveData",
    "PretrainRecipe",
    "TaskData",
    "deterministic_torch",
    "finetune_expert",
    "is_mlp_key",
    "layer_states",
    "pretrain_clip",
    "zero_shot_head",
]

#: Intra-op threads used while building: CPU float reductions depend on the thread count, so it is fixed.
#: Pretraining (one process) uses ``PRETRAIN_THREADS``; each expert fine-tuning worker uses ``BUILD_THREADS``.
BUILD_THREADS = 1
PRETRAIN_THREADS = 2


@dataclass
class TaskData:
    """Pixels (N, 3, 32, 32, normalised) and integer labels (N,) of one split of one task."""

    pixels: torch.Tensor
    labels: torch.Tensor


@dataclass
class PreserveData:
    """Images of the other tasks (N, 3, 32, 32) and the base model's layer states of them (N, layers, T, D)."""

    pixels: torch.Tensor
    targets: torch.Tensor


@dataclass(frozen=True)
class PretrainRecipe:
    """Contrastive pretraining of the base CLIP on captions of every task."""

    steps: int = 200
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 40


@dataclass(frozen=True)
class FinetuneRecipe:
    """Fine-tuning of one expert's vision tower against the frozen zero-shot head of its task.

    ``other_lr_scale`` multiplies the learning rate of the attention and layer-norm tensors (0 freezes them);
    with ``freeze_embeddings`` the patch, class and position embeddings and the pre-encoder layer norm stay
    at their pretrained values. The task knowledge thus lands in the MLPs. (Embeddings feed every token of
    every layer: even tiny per-expert changes to them add up badly in a merge.)

    ``preserve_weight`` adds a feature-preservation term: the mean squared change, summed over layers, of the
    token states of ``preserve_batch_size`` images of the *other* tasks (drawn from the first ``preserve_pool``
    training images of each). It gives the toy experts the locality that task vectors of large pretrained
    models show by themselves (an expert changes little on other tasks' inputs), without which a tiny model's
    experts push each other's inputs to confident, constant predictions.
    """

    steps: int = 500
    batch_size: int = 64
    lr: float = 5e-3
    other_lr_scale: float = 0.01
    freeze_embeddings: bool = True
    weight_decay: float = 0.0
    warmup: int = 20
    preserve_weight: float = 0.0
    preserve_batch_size: int = 64
    preserve_pool: int = 500


@contextlib.contextmanager
def deterministic_torch(threads: int = BUILD_THREADS) -> Iterator[None]:
    """Run torch with a fixed intra-op thread count and deterministic algorithms; restore both afterwards."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def is_mlp_key(key: str) -> bool:
    """Whether a vision state-dict key belongs to an encoder layer's MLP (fc1/fc2 weight or bias)."""
    return ".mlp.fc1." in key or ".mlp.fc2." in key


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimizer_step(loss: torch.Tensor, optim: torch.optim.Optimizer, sched, bar: ProgressBar) -> float:
    """One optimisation step on ``loss`` (and the schedule); reports and returns the loss."""
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    sched.step()
    value = float(loss.detach())
    bar.update(1, loss=f"{value:.3f}")
    return value


def _tokenize(tokenizer: CLIPTokenizer, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    return tokenizer(list(texts), padding=True, return_tensors="pt")


def _text_embeddings(model: CLIPModel, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
    out = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return F.normalize(model.text_projection(out.pooler_output), dim=-1)


@torch.no_grad()
def zero_shot_head(model: CLIPModel, tokenizer: CLIPTokenizer, task: str) -> torch.Tensor:
    """The (num_classes, projection_dim) zero-shot head of a task from the model's text tower.

    Row c is the normalised mean over the task's templates of the normalised projected text embedding of
    the template filled with class c.
    """
    spec = TASKS[task]
    model.eval()
    rows = []
    for name in spec.classnames:
        emb = _text_embeddings(model, _tokenize(tokenizer, spec.prompts(name)))
        rows.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(rows)


def _image_embeddings(vision: CLIPVisionModel, projection: nn.Linear, pixels: torch.Tensor) -> torch.Tensor:
    return F.normalize(projection(vision(pixel_values=pixels).pooler_output), dim=-1)


def _layer_states(vision: CLIPVisionModel, pixels: torch.Tensor) -> torch.Tensor:
    """Every encoder layer's output token states, stacked: (N, layers, tokens, hidden)."""
    return torch.stack(vision(pixel_values=pixels, output_hidden_states=True).hidden_states[1:], dim=1)


@torch.no_grad()
def layer_states(vision: CLIPVisionModel, pixels: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The layer states of ``pixels`` under ``vision`` (the targets of the feature-preservation term)."""
    vision.eval()
    return torch.cat(
        [_layer_states(vision, pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
    )


def pretrain_clip(
    model: CLIPModel,
    tokenizer: CLIPTokenizer,
    train: Mapping[str, TaskData],
    recipe: PretrainRecipe,
    seed: int,
    progress: bool | None = None,
) -> list[float]:
    """Contrastive (CLIP) pretraining on captioned images of every task; returns the loss curve.

    Each step draws ``batch_size`` images (task uniformly at random, then an image of it) and captions each
    with a random template of its task filled with its class name. The loss is CLIP's symmetric in-batch
    cross-entropy; captions of the same (task, class) are all positives of each other (soft targets), since
    a batch usually holds several images of one class.
    """
    tasks = list(train)
    # Every caption of every (task, class, template), tokenized once.
    captions, caption_class, class_offset = [], [], {}
    first_caption: dict[tuple[int, int], int] = {}
    n_classes = 0
    for t, task in enumerate(tasks):
        spec = TASKS[task]
        class_offset[task] = n_classes
        for c, name in enumerate(spec.classnames):
            first_caption[(t, c)] = len(captions)
            captions.extend(spec.prompts(name))
            caption_class.extend([n_classes + c] * len(spec.templates))
        n_classes += spec.num_classes
    tokens = _tokenize(tokenizer, captions)

    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: _schedule(s, recipe.steps, recipe.warmup))
    losses: list[float] = []
    model.train()
    bar = progress_bar(recipe.steps, "pretrain base CLIP", unit="step", show=progress)
    for _ in range(recipe.steps):
        task_idx = torch.randint(len(tasks), (recipe.batch_size,), generator=gen)
        pixels, classes, caption_idx = [], [], []
        for t in range(len(tasks)):
            picked = (task_idx == t).nonzero().flatten()
            if len(picked) == 0:
                continue
            data = train[tasks[t]]
            rows = torch.randint(len(data.labels), (len(picked),), generator=gen)
            labels = data.labels[rows]
            n_templates = len(TASKS[tasks[t]].templates)
            templ = torch.randint(n_templates, (len(picked),), generator=gen)
            pixels.append(data.pixels[rows])
            classes.append(labels + class_offset[tasks[t]])
            caption_idx.extend(first_caption[(t, int(c))] + int(k) for c, k in zip(labels, templ))
        pixel_batch = torch.cat(pixels)
        class_batch = torch.cat(classes)
        idx = torch.tensor(caption_idx)
        batch_tokens = {k: v[idx] for k, v in tokens.items()}

        img = _image_embeddings(model.vision_model, model.visual_projection, pixel_batch)
        txt = _text_embeddings(model, batch_tokens)
        scale = model.logit_scale.clamp(max=math.log(100.0)).exp()
        logits = scale * img @ txt.T
        positives = (class_batch[:, None] == class_batch[None, :]).float()
        targets = positives / positives.sum(dim=1, keepdim=True)
        loss = 0.5 * (
            torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()
            + torch.sum(-targets * F.log_softmax(logits.T, dim=1), dim=1).mean()
        )
        losses.append(_optimizer_step(loss, optim, sched, bar))
    bar.close()
    model.eval()
    return losses


def finetune_expert(
    vision: CLIPVisionModel,
    projection: nn.Linear,
    head: torch.Tensor,
    train: TaskData,
    recipe: FinetuneRecipe,
    seed: int,
    progress: bool | None = None,
    desc: str = "fine-tune",
    logit_scale: float = 100.0,
    preserve: PreserveData | None = None,
) -> list[float]:
    """Fine-tune ``vision`` in place on one task with the frozen ``head`` and ``projection``; returns losses.

    Logits are ``logit_scale * normalize(projection(pooler_output)) @ head.T`` (the task-vectors recipe, with
    the base model's scale, as for CLIP's zero-shot classifier). MLP tensors
    train at ``recipe.lr``, attention and layer norms at ``recipe.lr * recipe.other_lr_scale`` (frozen at 0),
    embeddings not at all when ``recipe.freeze_embeddings``. With ``preserve``, the feature-preservation term
    of ``recipe.preserve_weight`` is added (see :class:`FinetuneRecipe`).
    """
    projection.requires_grad_(False)
    mlp, other = [], []
    for name, param in vision.named_parameters():
        if is_mlp_key(name):
            param.requires_grad_(True)
            mlp.append(param)
        elif recipe.freeze_embeddings and name.startswith(("embeddings.", "pre_layrnorm.")):
            param.requires_grad_(False)
        elif recipe.other_lr_scale > 0:
            param.requires_grad_(True)
            other.append(param)
        else:
            param.requires_grad_(False)
    groups = [{"params": mlp, "lr": recipe.lr}]
    if other:
        groups.append({"params": other, "lr": recipe.lr * recipe.other_lr_scale})
    optim = torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: _schedule(s, recipe.steps, recipe.warmup))
    gen = torch.Generator().manual_seed(seed)
    n = len(train.labels)
    order = torch.randperm(n, generator=gen)
    cursor = 0
    losses: list[float] = []
    vision.train()
    bar = progress_bar(recipe.steps, desc, unit="step", show=progress)
    for _ in range(recipe.steps):
        if cursor + recipe.batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        rows = order[cursor : cursor + recipe.batch_size]
        cursor += recipe.batch_size
        logits = logit_scale * _image_embeddings(vision, projection, train.pixels[rows]) @ head.T
        loss = F.cross_entropy(logits, train.labels[rows])
        if preserve is not None and recipe.preserve_weight > 0:
            picked = torch.randint(len(preserve.pixels), (recipe.preserve_batch_size,), generator=gen)
            drift = _layer_states(vision, preserve.pixels[picked]) - preserve.targets[picked]
            loss = loss + recipe.preserve_weight * drift.pow(2).mean(dim=(0, 2, 3)).sum()
        losses.append(_optimizer_step(loss, optim, sched, bar))
    bar.close()
    vision.eval()
    vision.requires_grad_(True)
    return losses
