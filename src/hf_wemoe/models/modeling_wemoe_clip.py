"""PyTorch WEMoE CLIP model: the pretrained CLIP text tower and projections with a WEMoE vision tower.

With the text tower, the model scores images against any text, like [`CLIPModel`], so it serves
`pipeline("zero-shot-image-classification")` and the Hub's zero-shot widget. The vision tower is a
[`WEMoECLIPVisionModel`]; everything else (text tower, `text_projection`, `visual_projection`, `logit_scale`) is
the pretrained model's, unchanged.

This file is copied into every saved full-CLIP model folder and Hub repository, so it imports only the standard
library, torch, transformers and its siblings `modeling_wemoe.py` (with its `wemoe_ops.py`) and
`configuration_wemoe.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTextModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPOutput

from .configuration_wemoe import WEMoECLIPConfig
from .modeling_wemoe import WEMoECLIPPreTrainedModel, WEMoECLIPVisionModel, WEMoEModelOutputWithPooling


@dataclass
class WEMoECLIPOutput(CLIPOutput):
    """[`CLIPOutput`] plus `routing_weights`: one (image batch, num_experts) tensor per MoE layer."""

    routing_weights: tuple[torch.Tensor, ...] | None = None


def _contrastive_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy: text i matches image i."""
    targets = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    text_loss = nn.functional.cross_entropy(logits_per_text, targets)
    image_loss = nn.functional.cross_entropy(logits_per_text.t(), targets)
    return (text_loss + image_loss) / 2.0


class WEMoECLIPModel(WEMoECLIPPreTrainedModel):
    """CLIP with a WEMoE vision tower: `text_model` and the projections of the pretrained CLIP model,
    `vision_model` a [`WEMoECLIPVisionModel`].

    Takes the inputs of [`CLIPModel`] and returns its outputs (`logits_per_image`, `logits_per_text`,
    `image_embeds`, `text_embeds`, ...), plus `routing_weights` when called with `output_routing_weights=True`.
    Only the vision tower's router parameters require gradients (as for every [`WEMoECLIPPreTrainedModel`]).

    Example:

    ```python
    >>> from transformers import pipeline
    >>> classifier = pipeline("zero-shot-image-classification", model="org/wemoe-clip", trust_remote_code=True)
    >>> classifier(image, candidate_labels=["a cat", "a dog"])
    ```
    """

    config_class = WEMoECLIPConfig
    config: WEMoECLIPConfig
    base_model_prefix = "wemoe_clip"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    _no_split_modules = [
        "CLIPTextEmbeddings",
        "CLIPEncoderLayer",
        "CLIPVisionEmbeddings",
        "WEMoECLIPEncoderLayer",
    ]

    def __init__(self, config: WEMoECLIPConfig):
        super().__init__(config)
        self.projection_dim = config.projection_dim
        self.text_model = CLIPTextModel._from_config(config.text_config)
        self.vision_model = WEMoECLIPVisionModel._from_config(config.vision_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, self.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text_config.hidden_size, self.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The projections and `logit_scale` (the towers initialise themselves); as CLIP does."""
        if isinstance(module, WEMoECLIPModel):
            factor = self.config.initializer_factor
            init.normal_(
                module.text_projection.weight, std=self.config.text_config.hidden_size**-0.5 * factor
            )
            init.normal_(
                module.visual_projection.weight, std=self.config.vision_config.hidden_size**-0.5 * factor
            )
            init.constant_(module.logit_scale, float(self.config.logit_scale_init_value))

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save like any transformers model; `auto_map` also names the zero-shot image classification class."""
        # transformers writes one `auto_map` entry per registered class (AutoModel); the zero-shot pipeline loads
        # through AutoModelForZeroShotImageClassification, which needs its own entry for remote code.
        if self._auto_class is not None:
            module = type(self).__module__.rsplit(".", 1)[-1]
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map["AutoModelForZeroShotImageClassification"] = f"{module}.{type(self).__name__}"
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """The text tower's outputs with `pooler_output` projected by `text_projection` (as [`CLIPModel`])."""
        outputs = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, return_dict=True
        )
        outputs.pooler_output = self.text_projection(outputs.pooler_output)
        return outputs

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_routing_weights: bool | None = None,
        force_routing: torch.Tensor | None = None,
        routing: str | None = None,
        **kwargs,
    ) -> WEMoEModelOutputWithPooling:
        """The WEMoE vision tower's outputs with `pooler_output` projected by `visual_projection` (as
        [`CLIPModel`]); `routing_weights` as in [`WEMoECLIPVisionModel`]."""
        outputs = self.vision_model(
            pixel_values=pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_routing_weights=output_routing_weights,
            force_routing=force_routing,
            routing=routing,
            return_dict=True,
        )
        outputs.pooler_output = self.visual_projection(outputs.pooler_output)
        return outputs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        output_routing_weights: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        force_routing: torch.Tensor | None = None,
        routing: str | None = None,
        **kwargs,
    ) -> WEMoECLIPOutput | tuple:
        r"""
        return_loss (`bool`, *optional*):
            Return CLIP's contrastive loss (text i matches image i).
        output_routing_weights (`bool`, *optional*):
            Return the routing weights of every MoE layer, each of shape (image batch, num_experts).
        force_routing (`torch.Tensor`, *optional*):
            Use these routing weights instead of the routers' (see [`WEMoECLIPVisionModel`]).
        routing (`str`, *optional*):
            The routing mode for this call, `"sample"` or `"batch"` (see `set_routing`); defaults to the vision
            config's `routing`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        vision_outputs = self.get_image_features(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_routing_weights=output_routing_weights,
            force_routing=force_routing,
            routing=routing,
        )
        text_outputs = self.get_text_features(
            input_ids, attention_mask=attention_mask, position_ids=position_ids
        )
        image_embeds = vision_outputs.pooler_output
        text_embeds = text_outputs.pooler_output
        image_embeds = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(p=2, dim=-1, keepdim=True)
        logits_per_text = text_embeds @ image_embeds.t().to(text_embeds.device)
        logits_per_text = logits_per_text * self.logit_scale.exp().to(text_embeds.device)
        logits_per_image = logits_per_text.t()
        output = WEMoECLIPOutput(
            loss=_contrastive_loss(logits_per_text) if return_loss else None,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
            routing_weights=vision_outputs.routing_weights,
        )
        return output if return_dict else output.to_tuple()

    @torch.no_grad()
    def collapse(self, routing: torch.Tensor | list) -> CLIPModel:
        """A plain `CLIPModel` whose vision MLPs are W0 + sum_k r_k tau_k for fixed routing weights.

        `routing` is one (K,) vector for every MoE layer or a (num_moe_layers, K) table, as for
        [`WEMoECLIPVisionModel.collapse`]; the text tower and projections are copied unchanged.
        """
        vision = self.vision_model.collapse(routing)
        config = CLIPConfig(
            text_config=self.config.text_config.to_dict(),
            vision_config=vision.config.to_dict(),
            projection_dim=self.config.projection_dim,
            logit_scale_init_value=self.config.logit_scale_init_value,
        )
        static = CLIPModel(config).to(device=self.device)
        static.vision_model.load_state_dict(vision.state_dict())
        static.text_model.load_state_dict(self.text_model.state_dict())
        static.visual_projection.load_state_dict(self.visual_projection.state_dict())
        static.text_projection.load_state_dict(self.text_projection.state_dict())
        static.logit_scale.copy_(self.logit_scale)
        return static.to(self.dtype)


WEMoECLIPConfig.register_for_auto_class()
WEMoECLIPModel.register_for_auto_class("AutoModel")

__all__ = ["WEMoECLIPModel", "WEMoECLIPOutput"]
