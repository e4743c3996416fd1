"""What `hf-wemoe train` and `hf-wemoe calibrate` share: evaluating with the earlier routers as a baseline, and
writing the folder of a model whose routers changed.

The folder is written atomically and holds the model, its image processor, eval_results.json (accuracy per task and
the model as it was before, as a baseline), routing.png, the merge recipe of a local model folder
(merge_config.yaml, carried over) and a model card.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from hf_wemoe.adaptation import load_router_state, router_state
from hf_wemoe.errors import WEMoEError
from hf_wemoe.evaluation import EvalResult, evaluate_tasks, write_results
from hf_wemoe.hub.cards import MERGE_CONFIG_NAME, write_card
from hf_wemoe.io.layout import EVAL_RESULTS_NAME, ROUTING_PLOT_NAME
from hf_wemoe.io.outputs import atomic_output_dir
from hf_wemoe.io.sources import parse_reference
from hf_wemoe.models.modeling_wemoe import WEMoECLIPVisionModel
from hf_wemoe.workflows.plots import plot_routing

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def routers_swapped(model: torch.nn.Module, routers: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Run with other router parameters in place, then put the current ones back."""
    current = router_state(model)
    load_router_state(model, routers)
    try:
        yield
    finally:
        load_router_state(model, current)


def evaluate_with_baseline(
    classifier: Any,
    tasks: list,
    routers_before: Mapping[str, torch.Tensor] | None,
    batch_size: int,
    progress: bool | None,
) -> tuple[EvalResult, EvalResult | None]:
    """Accuracy of the classifier as it is and, when `routers_before` is given, with those routers put back for
    the baseline (same data, same heads)."""
    result = evaluate_tasks(classifier, tasks, batch_size, progress=progress)
    if routers_before is None:
        return result, None
    with routers_swapped(classifier.vision_model, routers_before):
        return result, evaluate_tasks(classifier, tasks, batch_size, progress=progress)


def merge_recipe_file(model_ref: str | None) -> Path | None:
    """The merge_config.yaml of a local model folder, if it has one (Hub models: the card uses the recipe
    recorded in config.json)."""
    try:
        reference = parse_reference(str(model_ref))
    except WEMoEError:
        return None
    path = reference.path / MERGE_CONFIG_NAME if reference.is_local else None
    return path if path is not None and path.is_file() else None


def write_adapted_folder(
    output: Path,
    vision: WEMoECLIPVisionModel,
    processor: Any,
    *,
    model_ref: str | None,
    overwrite: bool,
    routing: str | None,
    datasets: Mapping[str, str],
    result: EvalResult | None,
    baseline: EvalResult | None,
    baseline_name: str,
    details: Mapping[str, Any] | None = None,
    trajectory: list[dict] | None = None,
) -> Path:
    """Write a model whose routers changed (its provenance already says how) into `output`, atomically.

    `datasets` maps the evaluated tasks to their dataset references; `baseline` (named `baseline_name` in
    eval_results.json and the card) is the model as it was before; `details` are further eval_results.json
    entries (e.g. `adaptation`: the objective and the monitor's trajectory), `trajectory` the monitor's records
    for the routing plot. A card that cannot be written is a warning: the model matters more than its card.
    """
    with atomic_output_dir(output, overwrite=overwrite) as staging:
        vision.save_pretrained(staging)
        processor.save_pretrained(staging)
        recipe = merge_recipe_file(model_ref)
        if recipe is not None:  # the card shows it and `hf-wemoe merge --config` rebuilds the merge from it
            shutil.copyfile(recipe, staging / MERGE_CONFIG_NAME)
        if result is not None:
            payload = {
                "model": str(output),
                "routing": routing,
                **result.to_dict(),
                "datasets": dict(datasets),
            }
            if baseline is not None:
                payload["baselines"] = [{"name": baseline_name, **baseline.to_dict()}]
            payload.update(details or {})
            write_results(staging / EVAL_RESULTS_NAME, payload)
            plot_routing(
                result.routing,
                list(vision.config.expert_names),
                staging / ROUTING_PLOT_NAME,
                layers=vision.config.moe_layer_indices,
                trajectory=trajectory,
            )
        try:
            write_card(staging, model_id=output.name)
        except WEMoEError as err:
            logger.warning("no model card written for %s: %s", output, err)
    return output


__all__ = ["evaluate_with_baseline", "merge_recipe_file", "routers_swapped", "write_adapted_folder"]
