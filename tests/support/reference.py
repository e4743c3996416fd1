"""An independent per-sample reference implementation of WEMoE (plain CLIP MLPs, a loop over samples)."""

from __future__ import annotations

import torch
from transformers.models.clip.modeling_clip import CLIPMLP

from hf_wemoe import WEMoECLIPVisionModel

MLP_NAMES = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


def reference_task_vectors(model: WEMoECLIPVisionModel, layer_index: int) -> dict[str, torch.Tensor]:
    """Dense (K, *shape) float32 task vectors read straight from the state dict (sparse entries scattered by hand)."""
    state = model.state_dict()
    prefix = f"encoder.layers.{layer_index}.mlp."
    shapes = {
        "fc1_weight": state[prefix + "fc1.weight"].shape,
        "fc1_bias": state[prefix + "fc1.bias"].shape,
        "fc2_weight": state[prefix + "fc2.weight"].shape,
        "fc2_bias": state[prefix + "fc2.bias"].shape,
    }
    out = {}
    for name, shape in shapes.items():
        if prefix + f"task_vectors.{name}" in state:
            out[name] = state[prefix + f"task_vectors.{name}"].float()
            continue
        indices = stored_positions(state, prefix + f"task_vectors.{name}")
        values = state[prefix + f"task_vectors.{name}_values"].float()
        dense = torch.zeros(indices.shape[0], int(torch.tensor(shape).prod()))
        for k in range(indices.shape[0]):
            for j in range(indices.shape[1]):
                dense[k, indices[k, j]] = values[k, j]
        out[name] = dense.view(indices.shape[0], *shape)
    return out


def stored_positions(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """The flat positions (K, nnz) of sparse task vectors `key`, decoded by hand from the state dict: entries
    are grouped in blocks of 65536 positions, `{key}_block_counts` counts them per block and `{key}_indices`
    holds each one's unsigned 16-bit offset inside its block, stored as int16."""
    offsets, counts = state[f"{key}_indices"], state[f"{key}_block_counts"]
    assert offsets.dtype == torch.int16 and counts.dtype == torch.int32
    positions = torch.empty(offsets.shape, dtype=torch.long)
    for k in range(offsets.shape[0]):
        j = 0
        for block, count in enumerate(counts[k].tolist()):
            for _ in range(count):
                positions[k, j] = block * 65536 + int(offsets[k, j]) % 65536
                j += 1
        assert j == offsets.shape[1]
    return positions


def reference_routing(router: torch.nn.Module, tokens: torch.Tensor, depth: int) -> torch.Tensor:
    """Router applied to every token, outputs averaged over tokens: (T, d) -> (K,)."""
    if depth == 0:
        return router.bias
    if depth == 2:
        hidden = torch.relu(tokens @ router.hidden.weight.T + router.hidden.bias)
    else:
        hidden = tokens
    per_token = hidden @ router.output.weight.T + router.output.bias
    return per_token.mean(dim=0)


def reference_forward(model: WEMoECLIPVisionModel, pixel_values: torch.Tensor, force=None):
    """(pooler_output, last_hidden_state, routing per MoE layer) computed one sample at a time."""
    config = model.config
    hidden = model.pre_layrnorm(model.embeddings(pixel_values))
    routing_per_layer = []
    moe_position = 0
    for index, layer in enumerate(model.encoder.layers):
        residual = hidden
        hidden = residual + layer.self_attn(layer.layer_norm1(hidden))[0]
        normed = layer.layer_norm2(hidden)
        if not layer.is_moe:
            hidden = hidden + layer.mlp(normed)
            continue
        router = model.encoder.router if config.shared_router else layer.mlp.router
        if force is not None:
            forced = force if force.dim() == 1 else force[moe_position]
            routing = forced.expand(normed.shape[0], -1)
        else:
            routing = torch.stack(
                [reference_routing(router, normed[b], config.router_depth) for b in range(len(normed))]
            )
        if config.routing == "batch":
            routing = routing.mean(dim=0, keepdim=True).expand(normed.shape[0], -1)
        routing_per_layer.append(routing)
        task_vectors = reference_task_vectors(model, index)
        outputs = []
        for b in range(normed.shape[0]):
            mlp = CLIPMLP(config)
            weights = {}
            for name in MLP_NAMES:
                module, kind = name.split("_")
                base = getattr(getattr(layer.mlp, module), kind)
                weights[f"{module}.{kind}"] = base + torch.einsum(
                    "k,k...->...", routing[b], task_vectors[name]
                )
            outputs.append(torch.func.functional_call(mlp, weights, (normed[b : b + 1],)))
        hidden = hidden + torch.cat(outputs)
        moe_position += 1
    pooled = model.post_layernorm(hidden[:, 0])
    return pooled, hidden, routing_per_layer


def saved_tensor_sizes(model: torch.nn.Module, pixel_values: torch.Tensor) -> list[int]:
    """The sizes (numel) of every tensor autograd saves for backward in one forward and backward pass."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(pixel_values).pooler_output.sum().backward()
    return saved
