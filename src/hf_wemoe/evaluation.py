"""Top-1 accuracy of a CLIP vision tower (WEMoE or plain) on zero-shot classification tasks."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_wemoe.metrics import load_accuracy
from hf_wemoe.utils.progress import progress as report_progress
from hf_wemoe.zeroshot.classifier import ClassificationTask, ZeroShotClassifier
from hf_wemoe.zeroshot.data import make_dataloader
from hf_wemoe.zeroshot.heads import ZeroShotHead


@dataclass
class EvalResult:
    """Accuracy (percent) per task, and for WEMoE models the mean routing weights (num_moe_layers, K) per task."""

    accuracy: dict[str, float]
    routing: dict[str, torch.Tensor] = field(default_factory=dict)
    num_examples: dict[str, int] = field(default_factory=dict)

    @property
    def average(self) -> float:
        return sum(self.accuracy.values()) / len(self.accuracy) if self.accuracy else float("nan")

    def to_dict(self) -> dict:
        """A JSON-ready dict: accuracies in percent, the average, and example counts."""
        return {
            "accuracy": {task: round(value, 4) for task, value in self.accuracy.items()},
            "average": round(self.average, 4),
            "num_examples": dict(self.num_examples),
        }


@torch.no_grad()
def evaluate_tasks(
    classifier: ZeroShotClassifier,
    tasks: Sequence[ClassificationTask],
    batch_size: int = 128,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> EvalResult:
    """Accuracy of `classifier` on every task's labelled split, computed with the package's `accuracy` metric.

    `progress`: None follows the package's progress policy (`hf_wemoe.utils.progress`), False shows nothing.
    """
    device = torch.device(device) if device is not None else next(classifier.parameters()).device
    result = EvalResult(accuracy={})
    for task in tasks:
        loader = make_dataloader(task.dataset, batch_size)
        batches = report_progress(loader, f"eval {task.name}", unit="batch", show=progress)
        accuracy, routing, count = _evaluate(classifier, task.head, batches, device, classifier.is_wemoe)
        result.accuracy[task.name] = 100.0 * accuracy
        result.num_examples[task.name] = count
        if routing is not None:
            result.routing[task.name] = routing
    return result


class _MixedStream(torch.utils.data.Dataset):
    """Every task's labelled images as one dataset; items also carry their task's position."""

    def __init__(self, tasks: Sequence[ClassificationTask]) -> None:
        self.tasks = list(tasks)
        self.index = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task.dataset))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        task, index = self.index[position]
        return {**self.tasks[task].dataset[index], "task": torch.tensor(task)}


@torch.no_grad()
def evaluate_mixed_stream(
    classifier: ZeroShotClassifier,
    tasks: Sequence[ClassificationTask],
    batch_size: int = 128,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> EvalResult:
    """Accuracy per task when all tasks' images arrive as one shuffled stream: every batch mixes tasks (no task id
    reaches the model) and each image is scored with its own task's head.

    With per-sample routing the accuracies equal `evaluate_tasks`' (each image is routed on its own); batch
    routing averages the routing over images of different tasks, which is what this measures.
    """
    device = torch.device(device) if device is not None else next(classifier.parameters()).device
    classifier.eval()
    heads = [task.head.to(device) for task in tasks]
    metrics = [load_accuracy() for _ in tasks]
    counts = [0] * len(tasks)
    loader = make_dataloader(_MixedStream(tasks), batch_size, shuffle=True, seed=seed)
    for batch in report_progress(loader, "eval mixed stream", unit="batch", show=progress):
        embeds = classifier.embed(batch["pixel_values"].to(device)).float()
        for position in batch["task"].unique().tolist():
            rows = batch["task"] == position
            logits = heads[position](embeds[rows.to(device)])
            metrics[position].add_batch(
                predictions=logits.argmax(dim=-1).cpu(), references=batch["labels"][rows]
            )
            counts[position] += int(rows.sum())
    result = EvalResult(accuracy={})
    for task, metric, count in zip(tasks, metrics, counts):
        result.accuracy[task.name] = 100.0 * metric.compute()["accuracy"]
        result.num_examples[task.name] = count
    return result


@torch.no_grad()
def task_accuracy(
    classifier: ZeroShotClassifier,
    head: ZeroShotHead,
    batches: Iterable[Mapping[str, torch.Tensor]],
    device: str | torch.device | None = None,
) -> float:
    """Top-1 accuracy (a fraction) of `classifier` with `head` over labelled batches (`pixel_values`, `labels`),
    computed with the package's `accuracy` metric: the one measurement behind `evaluate_tasks` and the toy world's
    table."""
    device = torch.device(device) if device is not None else next(classifier.parameters()).device
    return _evaluate(classifier, head, batches, device, with_routing=False)[0]


def _evaluate(
    classifier: ZeroShotClassifier,
    head: ZeroShotHead,
    batches: Iterable[Mapping[str, torch.Tensor]],
    device: torch.device,
    with_routing: bool,
) -> tuple[float, torch.Tensor | None, int]:
    """(accuracy fraction, mean routing weights per MoE layer or None, number of examples) over `batches`."""
    classifier.eval()
    metric = load_accuracy()
    head = head.to(device)
    routing_sum, count = None, 0
    for batch in batches:
        logits, routing = classifier(batch["pixel_values"].to(device), head, output_routing_weights=with_routing)
        metric.add_batch(predictions=logits.argmax(dim=-1).cpu(), references=batch["labels"])
        if routing:
            summed = torch.stack([r.float().sum(dim=0) for r in routing]).cpu()
            routing_sum = summed if routing_sum is None else routing_sum + summed
        count += len(batch["pixel_values"])
    accuracy = metric.compute()["accuracy"]
    return accuracy, (routing_sum / count if routing_sum is not None else None), count


def markdown_table(rows: Sequence[tuple[str, dict[str, float]]], tasks: Sequence[str]) -> str:
    """A markdown table with one row per model (name, accuracy per task, average), accuracies in percent."""
    header = "| model | " + " | ".join(tasks) + " | average |"
    lines = [header, "|" + "---|" * (len(tasks) + 2)]
    for name, accuracy in rows:
        values = [accuracy.get(task) for task in tasks]
        known = [v for v in values if v is not None]
        average = sum(known) / len(known) if known else float("nan")
        cells = ["–" if v is None else f"{v:.1f}" for v in values]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {average:.1f} |")
    return "\n".join(lines)


def write_results(path: str | Path, payload: dict | list, markdown: str | None = None) -> None:
    """Write results as JSON to `path` (creating the parent folder) and, when given, their markdown table beside
    it (`path` with the suffix `.md`): what `eval`, `train` and the experiments write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    if markdown is not None:
        path.with_suffix(".md").write_text(markdown.rstrip("\n") + "\n")
