"""Top-1 accuracy of a CLIP vision tower (WEMoE or plain) on zero-shot classification tasks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_wemoe.metrics import load_accuracy
from hf_wemoe.zeroshot.classifier import ClassificationTask, ZeroShotClassifier
from hf_wemoe.zeroshot.data import make_dataloader


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
    progress: bool = True,
) -> EvalResult:
    """Accuracy of `classifier` on every task's labelled split, computed with the package's `accuracy` metric."""
    device = torch.device(device) if device is not None else next(classifier.parameters()).device
    classifier.eval()
    result = EvalResult(accuracy={})
    for task in tasks:
        metric = load_accuracy()
        head = task.head.to(device)
        routing_sum, count = None, 0
        loader = make_dataloader(task.dataset, batch_size)
        for batch in tqdm(loader, desc=f"eval {task.name}", disable=not progress, leave=False):
            logits, routing = classifier(
                batch["pixel_values"].to(device), head, output_routing_weights=classifier.is_wemoe
            )
            metric.add_batch(predictions=logits.argmax(dim=-1).cpu(), references=batch["labels"])
            if routing:
                summed = torch.stack([r.float().sum(dim=0) for r in routing]).cpu()
                routing_sum = summed if routing_sum is None else routing_sum + summed
            count += len(batch["pixel_values"])
        result.accuracy[task.name] = 100.0 * metric.compute()["accuracy"]
        result.num_examples[task.name] = count
        if routing_sum is not None:
            result.routing[task.name] = routing_sum / count
    return result


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


def write_results(path: str | Path, payload: dict) -> None:
    """Write JSON results (creating the parent folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
