"""The routing plot: mean routing weight per layer and expert, for each task's data, and (after adaptation) how
each task's routing moved over the adaptation steps."""

from __future__ import annotations

from pathlib import Path

import torch


def plot_routing(
    routing: dict[str, torch.Tensor],
    expert_names: list[str],
    path: str | Path,
    layers: list[int] | None = None,
    trajectory: list[dict] | None = None,
) -> Path:
    """Write a PNG with one heatmap per task: rows are MoE layers, columns experts, colour the mean weight.

    `routing` maps task name -> (num_moe_layers, num_experts) mean routing weights on that task's data.
    `trajectory` (the adaptation monitor's records: `{"step", "tasks": {task: {"routing": [K weights], ...}}}`)
    adds one panel per task below the heatmaps: each expert's mean routing weight over the adaptation steps.
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
    heat_height = 0.3 * num_layers * rows + 1.8
    width = 0.5 * len(expert_names) * columns + 2.5
    moving = [t for t in tasks if trajectory and all(t in r["tasks"] for r in trajectory)]
    if moving:
        line_height = 2.2 * ((len(moving) + columns - 1) // columns) + 0.6
        root = plt.figure(figsize=(max(width, 3.2 * columns), heat_height + line_height), constrained_layout=True)
        top, bottom = root.subfigures(2, 1, height_ratios=[heat_height, line_height])
        _plot_trajectory(bottom, trajectory, moving, expert_names, columns)
    else:
        root = top = plt.figure(figsize=(width, heat_height), constrained_layout=True)
    figure = top
    axes = top.subplots(rows, columns, squeeze=False)
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
    root.savefig(path, dpi=110)
    plt.close(root)
    return path


def _plot_trajectory(figure, trajectory: list[dict], tasks: list[str], expert_names: list[str], columns: int) -> None:
    """One panel per task: every expert's routing weight (mean over MoE layers and probe images) against step."""
    import matplotlib.pyplot as plt

    steps = [record["step"] for record in trajectory]
    rows = (len(tasks) + columns - 1) // columns
    axes = figure.subplots(rows, columns, squeeze=False)
    colours = plt.get_cmap("tab10" if len(expert_names) <= 10 else "tab20")
    for index, axis in enumerate(axes.flat):
        if index >= len(tasks):
            axis.axis("off")
            continue
        task = tasks[index]
        for column, expert in enumerate(expert_names):
            weights = [record["tasks"][task]["routing"][column] for record in trajectory]
            own = expert == task
            axis.plot(
                steps, weights, color=colours(column % colours.N), lw=2.2 if own else 0.9, label=expert
            )
        axis.set_title(f"data: {task}", fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=7)
    axes.flat[0].set_ylabel("mean routing weight", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right center", fontsize=7)
    figure.suptitle("routing over the adaptation steps (the task's own expert drawn thick)", fontsize=10)


def plot_task_vector_analysis(analysis: dict, path: str | Path) -> Path:
    """Write a PNG of an `hf-wemoe analyze` result: one column per module (q_proj ... fc2), the relative size
    ‖τ‖/‖W0‖ (top) and the rank that keeps the analysed energy fraction (bottom) against the layer, one line per
    expert.

    `analysis` is `AnalyzeSummary.to_json()`: `{"experts": {name: ...}, "energy": e, "modules": [{"layer",
    "module", "shape", "relative_norm": {name: x}, "rank": {name: r}}, ...]}`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    records = analysis["modules"]
    experts = list(analysis["experts"])
    modules = list(dict.fromkeys(record["module"] for record in records))
    colours = plt.get_cmap("tab10" if len(experts) <= 10 else "tab20")
    figure, axes = plt.subplots(
        2, len(modules), figsize=(2.6 * len(modules) + 1.5, 5.2), squeeze=False, constrained_layout=True
    )
    for column, module in enumerate(modules):
        rows = [record for record in records if record["module"] == module]
        layers = [record["layer"] for record in rows]
        for index, expert in enumerate(experts):
            colour = colours(index % colours.N)
            axes[0, column].plot(layers, [r["relative_norm"][expert] for r in rows], color=colour, label=expert)
            axes[1, column].plot(layers, [r["rank"][expert] for r in rows], color=colour, label=expert)
        axes[1, column].plot(layers, [min(r["shape"]) for r in rows], color="grey", ls=":", lw=0.8, label="max")
        axes[0, column].set_title(module, fontsize=10)
        axes[1, column].set_xlabel("layer", fontsize=8)
        for axis in axes[:, column]:
            axis.tick_params(labelsize=7)
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.set_ylim(bottom=0)
    axes[0, 0].set_ylabel("‖τ‖ / ‖W0‖", fontsize=8)
    axes[1, 0].set_ylabel(f"rank keeping {100 * analysis['energy']:.4g}% of ‖τ‖²", fontsize=8)
    handles, labels = axes[1, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right center", fontsize=7)
    figure.suptitle("Task vectors per layer and module: size and rank", fontsize=10)
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_sparsity(
    sparsities: list[float],
    accuracy: list[float],
    saved_bytes: list[int],
    path: str | Path,
    dense: tuple[float, int] | None = None,
    task_arithmetic: float | None = None,
    title: str = "E-WEMoE against task-vector sparsity",
) -> Path:
    """Write a PNG with two panels against sparsity (one evenly spaced tick per point): E-WEMoE's average
    accuracy, and its saved size in MB; `dense` (WEMoE's accuracy and saved bytes) and `task_arithmetic` (its
    accuracy) are drawn as horizontal reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positions = list(range(len(sparsities)))
    labels = [f"{value:g}" for value in sparsities]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.6), constrained_layout=True)
    left.plot(positions, accuracy, marker="o", color="tab:blue", label="E-WEMoE (shared router)")
    if dense is not None:
        left.axhline(dense[0], color="tab:green", ls="--", label=f"WEMoE dense ({dense[0]:.1f})")
        right.axhline(dense[1] / 1e6, color="tab:green", ls="--", label="WEMoE dense")
    if task_arithmetic is not None:
        left.axhline(task_arithmetic, color="tab:gray", ls=":", label=f"task arithmetic ({task_arithmetic:.1f})")
    left.set_ylabel("average accuracy (%)")
    right.plot(positions, [value / 1e6 for value in saved_bytes], marker="o", color="tab:orange", label="E-WEMoE")
    right.set_ylabel("saved size (MB, safetensors)")
    right.set_ylim(bottom=0)
    for axis in (left, right):
        axis.set_xticks(positions, labels)
        axis.set_xlabel("sparsity (fraction of every MLP task vector removed)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
