"""What a built toy zoo is: its manifest (``zoo.json``), its recipe version and where the cache keeps it."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hf_wemoe.errors import WEMoEError

__all__ = ["BASE_NAME", "MANIFEST_FILE", "RECIPE_VERSION", "ZooManifest", "default_zoo_dir"]

#: Bumped whenever a change to the recipe changes the built files; cached zoos of older versions are rebuilt.
RECIPE_VERSION = "3"
#: Folder name of the base model; experts are ``<BASE_NAME>_<task>``.
BASE_NAME = "clip-vit-toy-p8"
MANIFEST_FILE = "zoo.json"


@dataclass
class ZooManifest:
    """What ``zoo.json`` records about a built zoo; paths are relative to ``root``.

    Attributes:
        recipe_version: :data:`RECIPE_VERSION` of the build.
        seed: Build seed.
        preset: Preset name (``"full"``, ``"small"`` or a custom preset's name).
        base_model: Folder name of the base model.
        tasks: Task names, in order.
        classnames: Class names per task (label order).
        templates: Prompt templates per task (``{c}`` stands for the class name).
        paths: ``{"base": ..., "experts": {task: ...}, "datasets": {task: ...}}`` relative to ``root``.
        num_examples: ``{task: {"train": n, "test": n}}``.
        settings: The preset (model sizes, data sizes, training recipes) and build threads.
        timings: Wall-clock seconds per build phase and in total.
        accuracies: The world table ``{row: {task: accuracy, "average": mean}}`` (fractions in [0, 1]).
        versions: Library versions used for the build.
        root: The zoo folder (not stored in the file).
    """

    recipe_version: str
    seed: int
    preset: str
    base_model: str
    tasks: list[str]
    classnames: dict[str, list[str]]
    templates: dict[str, list[str]]
    paths: dict
    num_examples: dict[str, dict[str, int]]
    settings: dict
    timings: dict[str, float] = field(default_factory=dict)
    accuracies: dict[str, dict[str, float]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    root: Path = field(default=Path("."), compare=False)

    @property
    def base_path(self) -> Path:
        """Folder of the base ``CLIPModel`` (with tokenizer and processor)."""
        return self.root / self.paths["base"]

    def expert_path(self, task: str) -> Path:
        """Folder of one task's expert ``CLIPVisionModel``."""
        return self.root / self.paths["experts"][task]

    def expert_paths(self) -> dict[str, Path]:
        """``{task: folder}`` of every expert, in task order."""
        return {t: self.expert_path(t) for t in self.tasks}

    def dataset_path(self, task: str) -> Path:
        """Folder of one task's ``DatasetDict`` (``datasets.load_from_disk``)."""
        return self.root / self.paths["datasets"][task]

    def to_json(self) -> str:
        """The manifest as JSON (without ``root``)."""
        data = asdict(self)
        data.pop("root")
        return json.dumps(data, indent=2, sort_keys=False) + "\n"

    def save(self) -> Path:
        """Write ``zoo.json`` into ``root``; returns its path."""
        path = self.root / MANIFEST_FILE
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, root: str | os.PathLike) -> ZooManifest:
        """Read ``<root>/zoo.json``; raises ``WEMoEError`` if there is no readable manifest."""
        root = Path(root)
        path = root / MANIFEST_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**data, root=root)
        except (OSError, ValueError, TypeError) as err:
            raise WEMoEError(
                f"{path} is not a toy zoo manifest ({err}); build one with `hf-wemoe toy-zoo --output {root}`"
            ) from err


def default_zoo_dir(preset: str = "full", seed: int = 0) -> Path:
    """Cache folder of a toy zoo: ``$HF_WEMOE_CACHE/toy-zoo/<recipe>-<preset>-<seed>``.

    Without ``HF_WEMOE_CACHE`` the cache is ``$XDG_CACHE_HOME/hf_wemoe`` (default ``~/.cache/hf_wemoe``).
    The recipe version is part of the name, so a recipe change builds a fresh zoo instead of reusing one.
    """
    cache = os.environ.get("HF_WEMOE_CACHE")
    if cache:
        base = Path(cache).expanduser()
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "hf_wemoe"
    return base / "toy-zoo" / f"{RECIPE_VERSION}-{preset}-{seed}"
