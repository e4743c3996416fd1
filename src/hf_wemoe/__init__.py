"""hf-wemoe: weight-ensembling mixture-of-experts merging of CLIP vision models for the Hugging Face ecosystem.

Importing the package registers the WEMoE classes with transformers' Auto classes, so
`AutoModel.from_pretrained(folder_or_repo)` returns a `WEMoECLIPVisionModel` (or, for a full CLIP model with a
WEMoE vision tower, a `WEMoECLIPModel`) without `trust_remote_code`, and `pipeline("zero-shot-image-classification")`
accepts full WEMoE CLIP models.
"""

from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification

from .configuration_wemoe import WEMoECLIPConfig, WEMoECLIPVisionConfig
from .merging import build_wemoe
from .modeling_wemoe import WEMoECLIPVisionModel, WEMoECLIPVisionModelWithProjection
from .modeling_wemoe_clip import WEMoECLIPModel

__version__ = "0.1.0"

AutoConfig.register(WEMoECLIPVisionConfig.model_type, WEMoECLIPVisionConfig, exist_ok=True)
AutoModel.register(WEMoECLIPVisionConfig, WEMoECLIPVisionModel, exist_ok=True)
AutoConfig.register(WEMoECLIPConfig.model_type, WEMoECLIPConfig, exist_ok=True)
AutoModel.register(WEMoECLIPConfig, WEMoECLIPModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(WEMoECLIPConfig, WEMoECLIPModel, exist_ok=True)

__all__ = [
    "WEMoECLIPConfig",
    "WEMoECLIPModel",
    "WEMoECLIPVisionConfig",
    "WEMoECLIPVisionModel",
    "WEMoECLIPVisionModelWithProjection",
    "build_wemoe",
    "__version__",
]
