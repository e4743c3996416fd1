"""An independent per-sample reference implementation of WEMoE (plain CLIP modules, a loop over samples).

Task vectors are read straight from the state dict (dense; sparse entries scattered by hand; low-rank factors
multiplied per expert), every routed linear layer gets W0 + sum_k r_k tau_k for each sample, and the sample runs
through a plain transformers `CLIPAttention` / `CLIPMLP` with those weights.
"""

from __future__ import annotations

import copy

import torch
from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention

from hf_wemoe import WEMoECLIPVisionModel

ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def reference_task_vectors(
    model: WEMoECLIPVisionModel, layer_index: int, parent: str = "mlp"
) -> dict[str, torch.Tensor]:
    """Dense (K, *shape) task vectors (at least float32) of the routed layers of `encoder.layers.{i}.{parent}`, read straight
    from the state dict: dense as stored, sparse entries scattered by hand, low-rank as B_k @ A_k per expert."""
    state = model.state_dict()
    prefix = f"encoder.layers.{layer_index}.{parent}."
    modules = [m for m in model.config.moe_modules if (m in ATTENTION) == (parent == "self_attn")]
    out = {}
    for module in modules:
        for kind in ("weight", "bias"):
            name, shape = f"{module}_{kind}", state[f"{prefix}{module}.{kind}"].shape
            key = f"{prefix}task_vectors.{name}"
            if key in state:
                out[name] = _upcast(state[key])
            elif f"{key}_A" in state:
                a, b = _upcast(state[f"{key}_A"]), _upcast(state[f"{key}_B"])
                out[name] = torch.stack([b[k] @ a[k] for k in range(a.shape[0])])
            else:
                indices = stored_positions(state, key)
                values = state[f"{key}_values"].float()
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


def _layer_routing(model, tokens: torch.Tensor, owner: torch.nn.Module, force, position: int) -> torch.Tensor:
    """The routing applied to every sample of an MoE layer (B, K): forced, or from the router (the shared one,
    else the one `owner` holds) reading `tokens`; the batch mean in batch routing."""
    config = model.config
    if force is not None:
        forced = force if force.dim() == 1 else force[position]
        routing = forced.expand(tokens.shape[0], -1)
    else:
        router = model.encoder.router if config.shared_router else owner.router
        routing = torch.stack(
            [reference_routing(router, tokens[b], config.router_depth) for b in range(len(tokens))]
        )
    if config.routing == "batch":
        routing = routing.mean(dim=0, keepdim=True).expand(tokens.shape[0], -1)
    return routing


def _merged_weights(
    module: torch.nn.Module, task_vectors: dict[str, torch.Tensor], routing: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The module's own weights, routed ones replaced by W0 + sum_k r_k tau_k for one routing vector (K,)."""
    weights = dict(module.named_parameters())
    weights = {key: value for key, value in weights.items() if ".router." not in f".{key}"}
    for name, tau in task_vectors.items():
        linear, kind = name.rsplit("_", 1)
        weights[f"{linear}.{kind}"] = weights[f"{linear}.{kind}"] + torch.einsum("k,k...->...", routing, tau.to(routing.dtype))
    return weights


def reference_forward(model: WEMoECLIPVisionModel, pixel_values: torch.Tensor, force=None):
    """(pooler_output, last_hidden_state, applied routing per MoE layer) computed one sample at a time."""
    config = model.config
    # Plain transformers modules (with the model's attention implementation, e.g. sdpa, whose float32 rounding
    # differs from eager attention's): nothing of the model's own forward code runs.
    plain_config = copy.deepcopy(config)
    hidden = model.pre_layrnorm(model.embeddings(pixel_values))
    routing_per_layer = []
    moe_position = 0
    for index, layer in enumerate(model.encoder.layers):
        if not layer.is_moe:
            hidden = hidden + layer.self_attn(layer.layer_norm1(hidden))[0]
            hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
            continue
        routes_attention = any(name in ATTENTION for name in config.moe_modules)
        routes_mlp = any(name in ("fc1", "fc2") for name in config.moe_modules)

        normed = layer.layer_norm1(hidden)
        routing = None
        if routes_attention:
            routing = _layer_routing(model, normed, layer.self_attn, force, moe_position)
            task_vectors = reference_task_vectors(model, index, "self_attn")
            attention = CLIPAttention(plain_config)
            outputs = [
                torch.func.functional_call(
                    attention,
                    _merged_weights(layer.self_attn, task_vectors, routing[b]),
                    (normed[b : b + 1],),
                )[0]
                for b in range(normed.shape[0])
            ]
            hidden = hidden + torch.cat(outputs)
        else:
            hidden = hidden + layer.self_attn(normed)[0]
        normed = layer.layer_norm2(hidden)
        if routes_mlp:
            if routing is None:
                routing = _layer_routing(model, normed, layer.mlp, force, moe_position)
            task_vectors = reference_task_vectors(model, index, "mlp")
            mlp = CLIPMLP(plain_config)
            outputs = [
                torch.func.functional_call(
                    mlp, _merged_weights(layer.mlp, task_vectors, routing[b]), (normed[b : b + 1],)
                )
                for b in range(normed.shape[0])
            ]
            hidden = hidden + torch.cat(outputs)
        else:
            hidden = hidden + layer.mlp(normed)
        routing_per_layer.append(routing)
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
