"""Measure the toy world: zero-shot, experts, static merges and the oracle-routing bound of WEMoE.

Run ``python -m hf_wemoe.toy.evaluate_world [ZOO_DIR]`` to print the table of a built zoo. Every number is
top-1 accuracy on a task's test split with the zero-shot head built from the base model's text tower and the
task's own templates (``TASKS[task].templates``); image embeddings use the base model's
``visual_projection`` (experts never change it). Merges and accuracy are the package's own: task arithmetic
from :func:`hf_wemoe.merging.static.task_arithmetic`, accuracy from :func:`hf_wemoe.evaluation.task_accuracy`
(the zero-shot classifier and the packaged accuracy metric that ``hf-wemoe eval`` uses).

Rows:
- ``zero_shot``: the pretrained base vision tower.
- ``expert``: each task's expert on its own task.
- ``simple_average``: the mean of the experts' vision towers.
- ``task_arithmetic``: theta0 + lambda * sum_k tau_k over every tensor (lambda = 0.3).
- ``oracle_routing``: tensors outside the MLPs from task arithmetic, MLP tensors (fc1/fc2 weights and biases
  of every encoder layer) from the task's own expert. A WEMoE model routes only the MLPs, so with perfect
  routing it reaches this number at best.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from hf_wemoe.evaluation import task_accuracy
from hf_wemoe.io.layout import SAFETENSORS_NAME
from hf_wemoe.merging.static import task_arithmetic
from hf_wemoe.toy.manifest import ZooManifest, default_zoo_dir
from hf_wemoe.toy.models import to_pixel_values
from hf_wemoe.toy.training import TaskData, deterministic_torch, is_mlp_key, zero_shot_head
from hf_wemoe.utils.progress import progress as report_progress
from hf_wemoe.utils.progress import quiet_libraries
from hf_wemoe.zeroshot.classifier import ZeroShotClassifier
from hf_wemoe.zeroshot.heads import ZeroShotHead

__all__ = ["ROWS", "evaluate_world", "format_table", "main", "merge_state_dicts"]

# Images per forward pass when measuring accuracy.
EVAL_BATCH_SIZE = 512

#: Row keys of the world table, in display order, with their labels.
ROWS: dict[str, str] = {
    "zero_shot": "pretrained (zero-shot)",
    "expert": "individual experts",
    "simple_average": "simple averaging",
    "task_arithmetic": "task arithmetic (lambda=0.3)",
    "oracle_routing": "oracle routing bound (MLPs)",
}

StateDict = dict[str, torch.Tensor]


def merge_state_dicts(
    base: Mapping[str, torch.Tensor],
    experts: Sequence[Mapping[str, torch.Tensor]],
    scale: float,
) -> StateDict:
    """``base + scale * sum_k (expert_k - base)`` for every tensor (task arithmetic; 1/K gives averaging), in
    each tensor's dtype."""
    return {
        key: task_arithmetic(value, [expert[key] for expert in experts], scale).to(value.dtype)
        for key, value in base.items()
    }


def _load_test(path: Path) -> TaskData:
    from datasets import load_from_disk

    test = load_from_disk(str(path))["test"]
    arrays = np.stack([np.asarray(img.convert("RGB")) for img in test["image"]])
    return TaskData(to_pixel_values(arrays), torch.tensor(test["label"], dtype=torch.long))


def evaluate_world(zoo, lam: float = 0.3, progress: bool | None = False) -> dict[str, dict[str, float]]:
    """Evaluate a built toy zoo; returns ``{row: {task: accuracy, ..., "average": mean}}`` (fractions).

    ``zoo`` is a zoo folder (with ``zoo.json``) or a :class:`~hf_wemoe.toy.manifest.ZooManifest`.
    """
    from transformers import AutoTokenizer, CLIPModel

    manifest = zoo if isinstance(zoo, ZooManifest) else ZooManifest.load(zoo)
    tasks = list(manifest.tasks)
    with quiet_libraries(), deterministic_torch():
        base = CLIPModel.from_pretrained(manifest.base_path)
        tokenizer = AutoTokenizer.from_pretrained(manifest.base_path)
        # The toy heads score with plain cosine similarities: logit scale exp(0) = 1 leaves them unchanged.
        heads = {t: ZeroShotHead(zero_shot_head(base, tokenizer, t), 0.0) for t in tasks}
        test = {t: _load_test(manifest.dataset_path(t)) for t in tasks}
        vision = base.vision_model
        classifier = ZeroShotClassifier(vision, base.visual_projection)
        theta0 = {k: v.clone() for k, v in vision.state_dict().items()}
        experts = {t: load_file(str(manifest.expert_path(t) / SAFETENSORS_NAME)) for t in tasks}

        def score(state: Mapping[str, torch.Tensor], task: str) -> float:
            vision.load_state_dict(state)
            return task_accuracy(classifier, heads[task], _batches(test[task]))

        table: dict[str, dict[str, float]] = {row: {} for row in ROWS}
        ta = merge_state_dicts(theta0, list(experts.values()), lam)
        avg = merge_state_dicts(theta0, list(experts.values()), 1.0 / len(tasks))
        for task in report_progress(tasks, "evaluate toy world", unit="task", show=progress):
            oracle = {k: (experts[task][k] if is_mlp_key(k) else v) for k, v in ta.items()}
            table["zero_shot"][task] = score(theta0, task)
            table["expert"][task] = score(experts[task], task)
            table["simple_average"][task] = score(avg, task)
            table["task_arithmetic"][task] = score(ta, task)
            table["oracle_routing"][task] = score(oracle, task)
    for row in table.values():
        row["average"] = float(np.mean([row[t] for t in tasks]))
    return table


def _batches(data: TaskData) -> list[dict[str, torch.Tensor]]:
    return [
        {"pixel_values": data.pixels[i : i + EVAL_BATCH_SIZE], "labels": data.labels[i : i + EVAL_BATCH_SIZE]}
        for i in range(0, len(data.labels), EVAL_BATCH_SIZE)
    ]


def format_table(table: Mapping[str, Mapping[str, float]]) -> str:
    """The world table as Markdown, accuracies in percent, one column per task plus the average."""
    tasks = [t for t in next(iter(table.values())) if t != "average"]
    lines = [
        "| method | " + " | ".join(tasks) + " | avg |",
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    for key, row in table.items():
        label = ROWS.get(key, key)
        cells = [f"{100 * row[t]:.1f}" for t in tasks] + [f"**{100 * row['average']:.1f}**"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the world table of a built zoo (default: the full preset in the cache folder)."""
    parser = argparse.ArgumentParser(
        prog="python -m hf_wemoe.toy.evaluate_world", description=__doc__.split("\n")[0]
    )
    parser.add_argument("zoo", nargs="?", help="zoo folder (default: the cached full preset, seed 0)")
    parser.add_argument("--lam", type=float, default=0.3, help="task-arithmetic scale (default 0.3)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    args = parser.parse_args(argv)
    zoo = Path(args.zoo) if args.zoo else default_zoo_dir()
    if not (zoo / "zoo.json").is_file():
        print(
            f"error: no toy zoo at {zoo}; build one with `hf-wemoe toy-zoo --output {zoo}`", file=sys.stderr
        )
        return 2
    table = evaluate_world(zoo, lam=args.lam, progress=None)
    print(json.dumps(table, indent=2) if args.json else format_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
