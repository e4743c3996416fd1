"""The peer implementation: FusionBench's WeightEnsemblingMoE (PyPI `fusion-bench`) built from the same weights
as an hf-wemoe model, or, where fusion-bench cannot be imported, a re-implementation of its per-sample loop."""

from __future__ import annotations

import sys

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.modeling_clip import CLIPMLP

from benchmarks.settings import LAMBDA, NUM_EXPERTS
from benchmarks.variants import base_config_of
from hf_wemoe import WEMoECLIPVisionModel


def fusionbench_class() -> tuple[type[nn.Module], bool]:
    """FusionBench's WeightEnsemblingMoE and True, or (when fusion-bench cannot be imported) the
    re-implementation and False."""
    try:
        from fusion_bench.models.we_moe import WeightEnsemblingMoE
    except Exception as err:  # noqa: BLE001 - any import failure means: use the stand-in
        print(
            f"fusion-bench unavailable ({type(err).__name__}: {err}); using the re-implementation",
            file=sys.stderr,
        )
        return ReimplementedWeightEnsemblingMoE, False
    return WeightEnsemblingMoE, True


class ReimplementedWeightEnsemblingMoE(nn.Module):
    """Stand-in for FusionBench's WeightEnsemblingMoE, only used when fusion-bench cannot be imported.

    Same computation: a depth-2 gate averaged over tokens, then for every sample a full merged MLP state dict
    (base + sum_k r_k tau_k) and a functional call of the base MLP, in a Python loop over samples.
    """

    def __init__(
        self,
        hidden_size: int,
        base_model: nn.Module,
        expert_models: list[nn.Module],
        init_lambda: float,
        batch_first: bool,
        router_hidden_layers: int,
        batch_reduce: bool,
    ):
        super().__init__()
        assert batch_first and router_hidden_layers == 2 and not batch_reduce
        self.gate = nn.Module()
        self.gate.fc1 = nn.Linear(hidden_size, hidden_size)
        self.gate.fc2 = nn.Linear(hidden_size, len(expert_models))
        self.base_model = base_model.requires_grad_(False)
        base = dict(base_model.named_parameters())
        self.task_vectors = [
            {n: (p - base[n]).detach() for n, p in expert.named_parameters()} for expert in expert_models
        ]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Route every sample, merge its MLP and apply it, one sample at a time."""
        gate = self.gate.fc2(torch.relu(self.gate.fc1(hidden_states))).mean(dim=1)
        outputs = []
        for index, weights in enumerate(gate):
            state = dict(self.base_model.named_parameters())
            for weight, task_vector in zip(weights, self.task_vectors):
                state = {n: state[n] + weight * task_vector[n] for n in state}
            outputs.append(
                torch.func.functional_call(self.base_model, state, hidden_states[index : index + 1])
            )
        return torch.cat(outputs)


def make_fusionbench(wemoe: WEMoECLIPVisionModel) -> tuple[CLIPVisionModel, bool]:
    """A CLIPVisionModel whose MLPs are FusionBench WeightEnsemblingMoE modules with the same weights as `wemoe`,
    and whether they are FusionBench's own (False: the re-implementation).

    Non-MLP weights are the WEMoE model's (task arithmetic); each MoE module gets the pretrained MLP, one expert MLP
    per task (W0 + tau_k) and a gate holding the WEMoE router's weights.
    """
    moe_class, genuine = fusionbench_class()
    config = base_config_of(wemoe)
    model = CLIPVisionModel(config).eval()
    state = {k: v for k, v in wemoe.state_dict().items() if ".mlp." not in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(".mlp." in k or "position_ids" in k for k in missing), (missing, unexpected)
    for index, layer in enumerate(wemoe.encoder.layers):
        mlp = layer.mlp
        base = _clip_mlp(config, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
        tvs = {name: mlp.task_vectors.dense(name).float() for name in mlp.task_vectors.shapes}
        experts = [
            _clip_mlp(
                config,
                mlp.fc1.weight + tvs["fc1_weight"][k],
                mlp.fc1.bias + tvs["fc1_bias"][k],
                mlp.fc2.weight + tvs["fc2_weight"][k],
                mlp.fc2.bias + tvs["fc2_bias"][k],
            )
            for k in range(NUM_EXPERTS)
        ]
        moe = moe_class(
            hidden_size=config.hidden_size,
            base_model=base,
            expert_models=experts,
            init_lambda=LAMBDA,
            batch_first=True,
            router_hidden_layers=2,
            batch_reduce=False,
        )
        router = mlp.router if mlp.router is not None else wemoe.encoder.router
        with torch.no_grad():
            moe.gate.fc1.weight.copy_(router.hidden.weight)
            moe.gate.fc1.bias.copy_(router.hidden.bias)
            moe.gate.fc2.weight.copy_(router.output.weight)
            moe.gate.fc2.bias.copy_(router.output.bias)
        model.encoder.layers[index].mlp = moe
    model.requires_grad_(False)
    for layer in model.encoder.layers:
        layer.mlp.gate.requires_grad_(True)
    return model.eval(), genuine


def _clip_mlp(
    config: CLIPVisionConfig,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
) -> CLIPMLP:
    """A CLIP MLP holding copies of the given weights."""
    mlp = CLIPMLP(config)
    with torch.no_grad():
        mlp.fc1.weight.copy_(fc1_weight)
        mlp.fc1.bias.copy_(fc1_bias)
        mlp.fc2.weight.copy_(fc2_weight)
        mlp.fc2.bias.copy_(fc2_bias)
    return mlp
