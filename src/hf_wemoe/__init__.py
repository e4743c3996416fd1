"""hf-wemoe: weight-ensembling mixture-of-experts merging of CLIP vision models for the Hugging Face ecosystem.

Importing the package registers the WEMoE classes with transformers' Auto classes, so
`AutoModel.from_pretrained(folder_or_repo)` returns a `WEMoECLIPVisionModel` without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel

from .configuration_wemoe import WEMoECLIPVisionConfig
from .merging import build_wemoe
from .modeling_wemoe import WEMoECLIPVisionModel, WEMoECLIPVisionModelWithProjection

__version__ = "0.1.0"

AutoConfig.register(WEMoECLIPVisionConfig.model_type, WEMoECLIPVisionConfig, exist_ok=True)
AutoModel.register(WEMoECLIPVisionConfig, WEMoECLIPVisionModel, exist_ok=True)

__all__ = [
    "WEMoECLIPVisionConfig",
    "WEMoECLIPVisionModel",
    "WEMoECLIPVisionModelWithProjection",
    "build_wemoe",
    "__version__",
]
