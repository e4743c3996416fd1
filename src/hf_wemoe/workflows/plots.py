"""The routing plot: mean routing weight per layer and expert, for each task's data."""

from __future__ import annotations

from pathlib import Path

import torch


def plot_routing(
    routing: dict[str, torch.Tensor],
    expert_names: list[str],
    path: str | Path,
    layers: list[int] | None = None,
) -> Path:
    """Write a PNG with one heatmap per task: rows are MoE layers, columns experts, colour the mean weight.

    `routing` maps task name -> (num_moe_layers, num_experts) mean routing weights on that task's data.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(routing)
    columns = min(4, len(tasks))
    rows = (len(tasks) + columns - 1) // columns
    values = torch.stack([routing[t].float() for t in tasks])
    vmin, vmax = float(values.min()), float(values.max())
    num_layers = values.shape[1]
    layer_labels = [str(i) for i in (layers or range(num_layers))]
    figure, axes = plt.subplots(
        rows,
        columns,
        figsize=(0.5 * len(expert_names) * columns + 2.5, 0.3 * num_layers * rows + 1.8),
        squeeze=False,
        constrained_layout=True,
    )
    image = None
    for index, axis in enumerate(axes.flat):
        if index >= len(tasks):
            axis.axis("off")
            continue
        task = tasks[index]
        image = axis.imshow(values[index].numpy(), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        axis.set_title(f"data: {task}", fontsize=10)
        axis.set_xticks(range(len(expert_names)), expert_names, rotation=60, ha="right", fontsize=8)
        axis.set_yticks(range(num_layers), layer_labels, fontsize=7)
        axis.set_ylabel("layer", fontsize=8)
        # The expert of the task itself, when there is one, is outlined.
        if task in expert_names:
            column = expert_names.index(task)
            axis.add_patch(
                plt.Rectangle((column - 0.5, -0.5), 1, num_layers, fill=False, edgecolor="red", lw=1.5)
            )
    figure.colorbar(image, ax=axes, shrink=0.8, label="mean routing weight")
    figure.suptitle("WEMoE routing weights per layer and expert, by input task")
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
