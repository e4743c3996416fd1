"""hf-wemoe: weight-ensembling mixture-of-experts merging of CLIP vision models for the Hugging Face ecosystem.

Importing the package registers the WEMoE classes with transformers' Auto classes, so
`AutoModel.from_pretrained(folder_or_repo)` returns a `WEMoECLIPVisionModel` (or, for a full CLIP model with a
WEMoE vision tower, a `WEMoECLIPModel`) without `trust_remote_code`, and `pipeline("zero-shot-image-classification")`
accepts full WEMoE CLIP models.

The package itself imports neither torch nor transformers, so that `hf-wemoe --help` answers at once: the public
names below are loaded on first use, and the Auto classes are registered as soon as transformers is imported
(at once when it already is).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

from hf_wemoe.version import __version__

if TYPE_CHECKING:
    from hf_wemoe.hub.cards import model_card, write_card
    from hf_wemoe.hub.push import push_folder
    from hf_wemoe.io.saving import save_model
    from hf_wemoe.merging.wemoe import build_wemoe
    from hf_wemoe.models.configuration_wemoe import WEMoECLIPConfig, WEMoECLIPVisionConfig
    from hf_wemoe.models.modeling_wemoe import WEMoECLIPVisionModel, WEMoECLIPVisionModelWithProjection
    from hf_wemoe.models.modeling_wemoe_clip import WEMoECLIPModel

# Public name -> the module that defines it.
_PUBLIC = {
    "WEMoECLIPConfig": "hf_wemoe.models.configuration_wemoe",
    "WEMoECLIPVisionConfig": "hf_wemoe.models.configuration_wemoe",
    "WEMoECLIPVisionModel": "hf_wemoe.models.modeling_wemoe",
    "WEMoECLIPVisionModelWithProjection": "hf_wemoe.models.modeling_wemoe",
    "WEMoECLIPModel": "hf_wemoe.models.modeling_wemoe_clip",
    "build_wemoe": "hf_wemoe.merging.wemoe",
    "save_model": "hf_wemoe.io.saving",
    "model_card": "hf_wemoe.hub.cards",
    "write_card": "hf_wemoe.hub.cards",
    "push_folder": "hf_wemoe.hub.push",
}


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_wemoe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


def register_auto_classes() -> None:
    """Register the WEMoE config and model classes with transformers' Auto classes (safe to call again)."""
    from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification

    from hf_wemoe.models.configuration_wemoe import WEMoECLIPConfig, WEMoECLIPVisionConfig
    from hf_wemoe.models.modeling_wemoe import WEMoECLIPVisionModel
    from hf_wemoe.models.modeling_wemoe_clip import WEMoECLIPModel

    AutoConfig.register(WEMoECLIPVisionConfig.model_type, WEMoECLIPVisionConfig, exist_ok=True)
    AutoModel.register(WEMoECLIPVisionConfig, WEMoECLIPVisionModel, exist_ok=True)
    AutoConfig.register(WEMoECLIPConfig.model_type, WEMoECLIPConfig, exist_ok=True)
    AutoModel.register(WEMoECLIPConfig, WEMoECLIPModel, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(WEMoECLIPConfig, WEMoECLIPModel, exist_ok=True)


class _RegisterWhenTransformersLoads(importlib.abc.MetaPathFinder):
    """A one-shot import hook: right after `transformers` itself is imported, register the Auto classes."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            loader_exec(module)
            register_auto_classes()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if "transformers" in sys.modules:
    register_auto_classes()
elif not any(isinstance(finder, _RegisterWhenTransformersLoads) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTransformersLoads())

__all__ = [
    "WEMoECLIPConfig",
    "WEMoECLIPModel",
    "WEMoECLIPVisionConfig",
    "WEMoECLIPVisionModel",
    "WEMoECLIPVisionModelWithProjection",
    "__version__",
    "build_wemoe",
    "model_card",
    "push_folder",
    "register_auto_classes",
    "save_model",
    "write_card",
]
