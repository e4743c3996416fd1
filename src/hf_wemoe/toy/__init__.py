"""The offline toy zoo: small multi-task image data, a tiny pretrained CLIP and one expert per task.

It reproduces the WEMoE story without downloads: fine-tuned experts are strong, static merges (task
arithmetic) interfere, and routing the MLP task vectors per input can recover the experts' accuracy.

Typical use::

    from hf_wemoe.toy import get_toy_zoo
    zoo = get_toy_zoo("small")            # built once into the cache folder, then reused
    zoo.base_path, zoo.expert_paths(), zoo.dataset_path("digits"), zoo.accuracies

or from the command line: ``hf-wemoe toy-zoo --preset small``.
"""

from hf_wemoe.toy.build import PRESETS, ToyZooPreset, build_toy_zoo, custom_preset, get_toy_zoo
from hf_wemoe.toy.manifest import BASE_NAME, RECIPE_VERSION, ZooManifest, default_zoo_dir
from hf_wemoe.toy.tasks import TASKS, ToyTask, task_names

__all__ = [
    "BASE_NAME",
    "PRESETS",
    "RECIPE_VERSION",
    "TASKS",
    "ToyTask",
    "ToyZooPreset",
    "ZooManifest",
    "build_toy_zoo",
    "custom_preset",
    "default_zoo_dir",
    "get_toy_zoo",
    "task_names",
]
