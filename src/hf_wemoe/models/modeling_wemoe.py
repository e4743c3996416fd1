"""PyTorch WEMoE CLIP vision model: a CLIP vision tower whose MLPs are weight-ensembling mixtures of experts.

Every MoE MLP holds the pretrained MLP (W0), the task vectors of K fine-tuned experts (tau_k = theta_k - theta_0, for
fc1/fc2 weights and biases) and a router. For each input the router reads the MLP's input tokens, averages its
outputs over the tokens and gives K routing weights r; the MLP then runs with W = W0 + sum_k r_k tau_k.

Which linear layers are routed is the config's `moe_modules` (by default the MLP's `fc1` and `fc2`; the attention
projections `q_proj`, `k_proj`, `v_proj`, `out_proj` can be routed too). Each MoE layer computes one routing vector
per input, shared by all its routed modules: when an attention projection is routed, the router reads the states
entering attention (after `layer_norm1`) and lives in the attention module (`self_attn.router`), otherwise it reads
the MLP's input and lives in the MLP (`mlp.router`); a shared router (`encoder.router`) is fed the same states.
Task vectors are stored densely, sparsely (`sparsity`) or as low-rank factors (`rank`, applied without merging
weights per input).

This file is copied into every saved model folder and Hub repository, so it imports only the standard library,
torch, transformers and its siblings `configuration_wemoe.py` and `wemoe_ops.py` (the sparse storage codec, the
low-rank factorisation and the autograd kernels that merge weights per sample).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip.modeling_clip import (
    CLIPMLP,
    CLIPAttention,
    CLIPVisionEmbeddings,
    eager_attention_forward,
)
from transformers.utils import ModelOutput

from .configuration_wemoe import (
    ATTENTION_MODULES,
    MLP_MODULES,
    WEMoECLIPVisionConfig,
    check_routing,
    linear_shapes,
)
from .wemoe_ops import (
    MergedWeight,
    PerSampleLinear,
    decode_sparse_indices,
    encode_sparse_indices,
    low_rank_factors,
    low_rank_linear,
    num_kept_entries,
    pad_factors,
    sparsify_task_vector,
)


@dataclass
class WEMoEModelOutputWithPooling(BaseModelOutputWithPooling):
    """[`BaseModelOutputWithPooling`] plus `routing_weights`: one (batch, num_experts) tensor per MoE layer."""

    routing_weights: tuple[torch.Tensor, ...] | None = None


@dataclass
class WEMoEVisionModelOutput(ModelOutput):
    """Image embeddings (`visual_projection` of the pooled output) and the vision model's outputs."""

    image_embeds: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    routing_weights: tuple[torch.Tensor, ...] | None = None


def is_router_parameter(name: str) -> bool:
    """Whether the parameter or state-dict key `name` belongs to a router (a module named `router` on its path).

    Routers are what router adaptation trains; every other WEMoE weight is frozen. Works for the names of any
    model that holds a WEMoE vision tower (`encoder.router.hidden.weight`,
    `vision_model.encoder.layers.0.mlp.router.output.bias`, ...).
    """
    return ".router." in f".{name}"


def _routing_for_layer(force_routing: torch.Tensor, position: int) -> torch.Tensor:
    """The forced routing weights of the `position`-th MoE layer: a (K,) vector or one row of an (L, K) table."""
    return force_routing if force_routing.dim() == 1 else force_routing[position]


def _static_config(config: WEMoECLIPVisionConfig) -> CLIPVisionConfig:
    """The plain CLIP vision config of a WEMoE config (its architecture fields only)."""
    fields = CLIPVisionConfig().to_dict()
    values = {key: value for key, value in config.to_dict().items() if key in fields and key != "model_type"}
    values.pop("transformers_version", None)
    values.pop("architectures", None)
    return CLIPVisionConfig(**values)


class WEMoERouter(nn.Module):
    """Maps the token states entering an MoE layer's routed modules to K routing weights per sample.

    Depth 2: `W2 ReLU(W1 h + b1) + b2`; depth 1: `W h + b`; depth 0: a learned vector `b` that ignores the
    input. Outputs are averaged over the tokens of each sample and used raw (no softmax).
    """

    def __init__(self, config: WEMoECLIPVisionConfig):
        super().__init__()
        self.depth = config.router_depth
        self.num_experts = config.num_experts
        if self.depth == 2:
            self.hidden = nn.Linear(config.hidden_size, config.router_hidden_size)
            self.hidden._router_role = "hidden"
        if self.depth >= 1:
            in_features = config.router_hidden_size if self.depth == 2 else config.hidden_size
            self.output = nn.Linear(in_features, config.num_experts)
            self.output._router_role = "output"
        else:
            self.bias = nn.Parameter(torch.empty(config.num_experts))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`hidden_states` (B, T, hidden) -> routing weights (B, K) in the router's dtype."""
        if self.depth == 0:
            return self.bias.unsqueeze(0).expand(hidden_states.shape[0], -1)
        features = hidden_states.to(self.output.weight.dtype)
        if self.depth == 2:
            features = nn.functional.relu(self.hidden(features))
        # The output layer is affine, so averaging its input over tokens equals averaging its output.
        return self.output(features.mean(dim=1))


def _version(tensor: torch.Tensor) -> int:
    """The in-place version counter of a tensor (inference tensors have none and cannot change)."""
    return 0 if tensor.is_inference() else tensor._version


class WEMoETaskVectors(nn.Module):
    """The K task vectors of the routed linear layers of one module (an MLP or an attention), stored densely,
    sparsely or as low-rank factors.

    Tensors are named `{module}_weight` and `{module}_bias` for every routed module (`fc1_weight`, `q_proj_bias`,
    ...). Dense: one buffer `{name}` (K, *shape) per tensor. Low-rank (`rank` R set): every weight is stored as
    `{name}_A` (K, R, in) and `{name}_B` (K, out, R) with tau_k ~ B_k @ A_k (B carries the singular values, A's
    rows are orthonormal or zero); biases stay dense. Sparse (`sparsity > 0`), with nnz =
    `num_kept_entries(numel, sparsity)` kept entries per expert at increasing flat positions p (row-major over
    `shape`), and blocks of `SPARSE_BLOCK_SIZE` = 65536 positions:

    - `{name}_values` (K, nnz), storage dtype: the kept values, in position order;
    - `{name}_indices` (K, nnz) int16: `p % 65536`, the unsigned 16-bit offset stored in int16 (values of
      32768 and above read as negative; decode with `& 0xFFFF`);
    - `{name}_block_counts` (K, ceil(numel / 65536)) int32: how many kept entries lie in each block
      `p // 65536` (a CSR row pointer in count form; every row sums to nnz).

    Decoding: `block = repeat_interleave(arange(blocks), counts)`, `p = block * 65536 + offset`. Positions cost
    2 bytes per kept entry plus 4 bytes per block, and every shape depends only on the config, so plain
    `from_pretrained` loads the layout. The dense tensors are expanded once and cached (`dense`).
    """

    def __init__(self, config: WEMoECLIPVisionConfig, modules: Sequence[str] = MLP_MODULES):
        super().__init__()
        linears = linear_shapes(config)
        # The routed linear layers, and the shape of every tensor (name -> shape) whose task vectors are stored.
        self.module_names = tuple(modules)
        self.shapes = {}
        for module in self.module_names:
            self.shapes[f"{module}_weight"] = linears[module]
            self.shapes[f"{module}_bias"] = linears[module][:1]
        self.sparsity = float(config.sparsity)
        self.rank = config.rank
        # The state-dict prefix of this module, set by the model, to name tensors in errors.
        self.key_prefix = "task_vectors."
        dtype = getattr(torch, config.task_vector_dtype)
        num_experts = config.num_experts
        for name, shape in self.shapes.items():
            if self.is_low_rank and len(shape) == 2:
                out_features, in_features = shape
                self.register_buffer(f"{name}_A", torch.zeros(num_experts, self.rank, in_features, dtype=dtype))
                self.register_buffer(f"{name}_B", torch.zeros(num_experts, out_features, self.rank, dtype=dtype))
            elif self.is_sparse:
                numel = math.prod(shape)
                kept = num_kept_entries(numel, self.sparsity)
                # A valid placeholder until a checkpoint or `set` fills it: the first `kept` positions, all zero.
                offsets, counts = encode_sparse_indices(torch.arange(kept), numel)
                self.register_buffer(f"{name}_indices", offsets.expand(num_experts, -1).clone())
                self.register_buffer(f"{name}_block_counts", counts.expand(num_experts, -1).clone())
                self.register_buffer(f"{name}_values", torch.zeros(num_experts, kept, dtype=dtype))
            else:
                self.register_buffer(name, torch.zeros(num_experts, *shape, dtype=dtype))
        self._dense_cache: dict[str, tuple[tuple, torch.Tensor]] = {}
        # Storage keys (see `_storage_key`) whose positions were checked, by tensor name.
        self._checked: dict[str, tuple] = {}

    def _apply(self, fn, recurse=True):
        # Task vectors (and the integer position buffers) keep their storage dtypes when the model changes
        # dtype (`model.half()`, `model.to(torch.bfloat16)`); they only follow device moves. `fn` is probed on
        # an empty tensor to learn the target device without converting (and copying) the stored values.
        for name, buffer in self._buffers.items():
            if buffer is not None:
                device = fn(torch.empty(0, dtype=buffer.dtype, device=buffer.device)).device
                self._buffers[name] = buffer.to(device=device)
        self._dense_cache.clear()
        return self

    @property
    def is_sparse(self) -> bool:
        """True when the task vectors are stored as indices and values."""
        return self.sparsity > 0

    @property
    def is_low_rank(self) -> bool:
        """True when the task-vector weights are stored as low-rank factors (biases stay dense)."""
        return self.rank is not None

    def is_factorised(self, name: str) -> bool:
        """Whether tensor `name` is stored as low-rank factors `{name}_A`, `{name}_B`."""
        return self.is_low_rank and len(self.shapes[name]) == 2

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored factors `(A (K, R, in), B (K, out, R))` of weight `name` (low-rank storage only)."""
        return getattr(self, f"{name}_A"), getattr(self, f"{name}_B")

    def dense(self, name: str) -> torch.Tensor:
        """The task vectors of tensor `name` as a dense (K, *shape) tensor in the storage dtype.

        Low-rank weights are the products B_k @ A_k, computed (not cached) in at least float32 and returned in
        that dtype: rounding them to a 16-bit storage dtype would add an error the stored factors do not have.

        Sparse storage is expanded once and cached until the stored positions or values change (a load, a move
        to another device). Stored positions are checked once: when a checkpoint is loaded (`check_positions`),
        or before tensors stored otherwise are first expanded. Compiled code (`torch.compile`) expands inside
        the graph on its first call and reads the cache afterwards, without graph breaks.

        Raises:
            ValueError: the stored positions are corrupted (block counts that do not sum to the number of kept
                entries, or positions that are not increasing inside the tensor); names the tensor.
        """
        if self.is_factorised(name):
            a, b = self.factors(name)
            dtype = torch.promote_types(a.dtype, torch.float32)
            return torch.bmm(b.to(dtype), a.to(dtype))
        if not self.is_sparse:
            return getattr(self, name)
        cached = self._dense_cache.get(name)
        # Storage pointers and version counters cannot be traced, so compiled code trusts the cache; whatever
        # changes the stored tensors through the module (a load, `set`, a device move) drops it.
        if cached is not None and (torch.compiler.is_compiling() or cached[0] == self._storage_key(name)):
            return cached[1]
        if torch.compiler.is_compiling():
            # Traced: expand in the graph (the positions were checked when they were loaded) and cache the
            # result, so that the next call compiles to a graph that reads it. The missing key makes eager code
            # build its own entry.
            with torch.inference_mode(False), torch.no_grad():
                dense = self._scatter(name, self._positions(name, check=False))
            self._dense_cache[name] = (None, dense)
            return dense
        return self._expand(name)

    def check_positions(self) -> None:
        """Check the stored positions of every sparse tensor once (a model runs it when it loads a checkpoint).

        Raises:
            ValueError: the stored positions are corrupted; names the tensor.
        """
        for name in self.shapes if self.is_sparse else ():
            key = self._storage_key(name)
            if key[-1].type != "meta" and self._checked.get(name) != key:
                self._positions(name, check=True)
                self._checked[name] = key

    def _sparse_buffers(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(getattr(self, f"{name}_{part}") for part in ("indices", "block_counts", "values"))

    def _storage_key(self, name: str) -> tuple:
        """Identifies the stored tensors of `name` and their contents: pointers, version counters and device."""
        buffers = self._sparse_buffers(name)
        return (*((b.data_ptr(), _version(b)) for b in buffers), buffers[-1].device)

    def _expand(self, name: str) -> torch.Tensor:
        """Expand the sparse task vectors of `name` into the cache, checking positions not checked before."""
        key = self._storage_key(name)
        positions = self._positions(name, check=self._checked.get(name) != key)
        self._checked[name] = key
        # Built outside inference mode so that a cache first filled during evaluation still serves training.
        with torch.inference_mode(False), torch.no_grad():
            dense = self._scatter(name, positions)
        self._dense_cache[name] = (key, dense)
        return dense

    def _scatter(self, name: str, positions: torch.Tensor) -> torch.Tensor:
        values = self._sparse_buffers(name)[-1]
        dense = torch.zeros(
            values.shape[0], math.prod(self.shapes[name]), dtype=values.dtype, device=values.device
        )
        return dense.scatter_(1, positions, values).view(values.shape[0], *self.shapes[name])

    def _positions(self, name: str, check: bool) -> torch.Tensor:
        """Decode the flat positions (K, nnz) of tensor `name`, first checking them when `check` is set."""
        offsets, counts, _ = self._sparse_buffers(name)
        stored, kept, numel = f"{self.key_prefix}{name}", offsets.shape[-1], math.prod(self.shapes[name])
        if check:
            totals = counts.sum(dim=-1)
            if bool((counts < 0).any()) or bool((totals != kept).any()):
                raise ValueError(
                    f"corrupted sparse task vectors: every row of '{stored}_block_counts' must be non-negative "
                    f"and sum to {kept} kept entries (row sums {totals.tolist()}); the checkpoint is damaged, "
                    "re-create it"
                )
        positions = decode_sparse_indices(offsets, counts)
        if check and (
            bool((positions[:, 1:] <= positions[:, :-1]).any()) or bool((positions[:, -1] >= numel).any())
        ):
            raise ValueError(
                f"corrupted sparse task vectors: '{stored}_indices' with '{stored}_block_counts' do not decode "
                f"to increasing positions below {numel} (the tensor's size); the checkpoint is damaged, re-create it"
            )
        return positions

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # `load_state_dict` copies into the buffers in place: the cache goes, and the new positions are checked.
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._dense_cache.clear()
        self.check_positions()

    def set(self, name: str, task_vectors: torch.Tensor) -> list[float] | None:
        """Store the stacked (K, *shape) task vectors of tensor `name`, sparsifying or factorising them when
        configured.

        Returns, for a low-rank weight, the kept energy of every expert's factors (see `low_rank_factors`), else
        None.

        Raises:
            ValueError: `name` is not one of the stored tensors (names them).
        """
        self._check_name(name)
        energies = None
        with torch.no_grad():
            if self.is_factorised(name):
                a_stack, b_stack = self.factors(name)
                energies = []
                for k, tensor in enumerate(task_vectors):
                    a, b, energy = low_rank_factors(tensor, self.rank)
                    a_stack[k].copy_(a)
                    b_stack[k].copy_(b)
                    energies.append(energy)
            elif self.is_sparse:
                for k, tensor in enumerate(task_vectors):
                    indices, values = sparsify_task_vector(tensor, self.sparsity)
                    offsets, counts = encode_sparse_indices(indices, tensor.numel())
                    getattr(self, f"{name}_indices")[k].copy_(offsets)
                    getattr(self, f"{name}_block_counts")[k].copy_(counts)
                    getattr(self, f"{name}_values")[k].copy_(values)
            else:
                getattr(self, name).copy_(task_vectors)
        self._dense_cache.pop(name, None)
        return energies

    def set_factors(self, name: str, a_stack: torch.Tensor, b_stack: torch.Tensor) -> None:
        """Store exact factors of weight `name`: `a_stack` (K, r, in) and `b_stack` (K, out, r), tau_k = B_k @ A_k.

        Factors of a rank r below the stored rank R are zero-padded (the padding adds nothing).

        Raises:
            ValueError: the storage is not low-rank, `name` is not a stored weight, the shapes do not match, or
                r > R (each names the tensor).
        """
        self._check_name(name)
        stored = f"{self.key_prefix}{name}"
        if not self.is_factorised(name):
            raise ValueError(
                f"'{stored}' is not stored as low-rank factors (the model has no rank, or it is a bias); "
                "store the dense task vectors B @ A with set()"
            )
        out_features, in_features = self.shapes[name]
        num_experts, rank = a_stack.shape[0], a_stack.shape[-2]
        expected = ((num_experts, rank, in_features), (num_experts, out_features, rank))
        if num_experts != self.factors(name)[0].shape[0] or (tuple(a_stack.shape), tuple(b_stack.shape)) != expected:
            raise ValueError(
                f"factors for '{stored}' must have shapes (K, r, {in_features}) and (K, {out_features}, r) with "
                f"K = {self.factors(name)[0].shape[0]} experts, got {tuple(a_stack.shape)} and {tuple(b_stack.shape)}"
            )
        try:
            a_stack, b_stack = pad_factors(a_stack, b_stack, self.rank)
        except ValueError as err:
            raise ValueError(f"'{stored}': {err}") from err
        with torch.no_grad():
            for stored_tensor, tensor in zip(self.factors(name), (a_stack, b_stack)):
                stored_tensor.copy_(tensor)

    def _check_name(self, name: str) -> None:
        if name not in self.shapes:
            raise ValueError(
                f"'{self.key_prefix}{name}' is not a stored task-vector tensor; this module stores {list(self.shapes)}"
            )


class WEMoERoutedLinears:
    """What every module with routed linear layers shares ([`WEMoEMLP`], [`WEMoEAttention`]): routing weights
    from a router or forced, one routed-linear code path for every storage mode, and merging for `collapse`.

    A mixin for `nn.Module`s that hold the pretrained linear layers as attributes named after the modules, their
    `task_vectors` ([`WEMoETaskVectors`]), `routed` (the routed module names) and `router` (or None).
    """

    config: WEMoECLIPVisionConfig
    routed: tuple[str, ...]
    task_vectors: WEMoETaskVectors
    router: WEMoERouter | None

    def route(
        self,
        hidden_states: torch.Tensor,
        router: WEMoERouter | None = None,
        routing_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Routing weights (B, K) in at least float32: forced ((K,) or (B, K)), or from `router` (the shared
        one) or this module's router, reading `hidden_states`."""
        batch_size = hidden_states.shape[0]
        if routing_weights is None:
            routing_weights = (router or self.router)(hidden_states)
        else:
            routing_weights = routing_weights.to(device=hidden_states.device)
            routing_weights = (
                routing_weights.expand(batch_size, -1) if routing_weights.dim() == 1 else routing_weights
            )
        # Routing and accumulation run in at least float32, whatever the activation and storage dtypes.
        return routing_weights.to(torch.promote_types(routing_weights.dtype, torch.float32))

    def linear(
        self,
        name: str,
        hidden_states: torch.Tensor,
        routing_weights: torch.Tensor,
        routing: str,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The linear layer `name` on `activation(hidden_states)` (or `hidden_states`): per-sample merged weights
        W0 + sum_k r_k tau_k when it is routed, its own weights otherwise.

        Dense and sparse task vectors run through `PerSampleLinear` (merged weights built block by block);
        low-rank ones through `low_rank_linear` (two GEMMs, no merged weights). `routing` `"batch"` routes every
        sample with the batch mean.
        """
        layer = getattr(self, name)
        if name not in self.routed:
            return layer(hidden_states if activation is None else activation(hidden_states))
        tokens = hidden_states.reshape(hidden_states.shape[0], -1, hidden_states.shape[-1])
        if routing == "batch":
            # One merged layer for the whole batch: every token of the batch is one "sample" routed by the mean.
            routing_weights = routing_weights.mean(dim=0, keepdim=True)
            tokens = tokens.reshape(1, -1, tokens.shape[-1])
        bias_deltas = self.task_vectors.dense(f"{name}_bias")
        if self.task_vectors.is_low_rank:
            a, b = self.task_vectors.factors(f"{name}_weight")
            output = low_rank_linear(tokens, routing_weights, layer.weight, layer.bias, a, b, bias_deltas, activation)
        else:
            deltas = self.task_vectors.dense(f"{name}_weight")
            output = PerSampleLinear.apply(
                tokens, routing_weights, layer.weight, layer.bias, deltas, bias_deltas, activation
            )
        return output.view(*hidden_states.shape[:-1], output.shape[-1])

    def merged_state(self, routing: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weights and biases of the routed layers merged with routing weights (K,): W0 + sum_k r_k tau_k, keyed
        like the module's state dict (`fc1.weight`, ...)."""
        state = {}
        for name in self.routed:
            layer = getattr(self, name)
            acc_routing = routing.reshape(1, -1).to(device=layer.weight.device, dtype=torch.float32)
            for suffix in ("weight", "bias"):
                base = getattr(layer, suffix)
                merged = MergedWeight.apply(acc_routing, base, self.task_vectors.dense(f"{name}_{suffix}"))
                state[f"{name}.{suffix}"] = merged.to(base.dtype)
        return state


class WEMoEMLP(WEMoERoutedLinears, nn.Module):
    """A CLIP MLP whose routed layers (`fc1`, `fc2`, or one of them) are mixed per input from the pretrained
    weights and K expert task vectors; an unrouted layer holds task-arithmetic weights."""

    def __init__(
        self, config: WEMoECLIPVisionConfig, with_router: bool = True, routed: Sequence[str] | None = None
    ):
        super().__init__()
        self.config = config
        self.routed = tuple(routed) if routed is not None else MLP_MODULES
        self.activation_fn = ACT2FN[config.hidden_act]
        # The pretrained MLP (W0), not the task-arithmetic one.
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.task_vectors = WEMoETaskVectors(config, self.routed)
        self.router = WEMoERouter(config) if with_router else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        router: WEMoERouter | None = None,
        routing_weights: torch.Tensor | None = None,
        routing: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the MLP; returns `(output, routing_weights)` with routing weights of shape (B, K).

        `router` is the shared router (when the model has one); `routing_weights` forces the routing:
        a (K,) vector or a (B, K) table (the routed attention of the layer passes its own). `routing` is the
        routing mode (`"sample"` or `"batch"`, see [`WEMoECLIPVisionConfig`]); defaults to the config's.
        """
        routing_weights = self.route(hidden_states, router, routing_weights)
        routing = routing or self.config.routing
        hidden_states = self.linear("fc1", hidden_states, routing_weights, routing)
        # The activation runs inside the second layer, which (when routed with full-rank task vectors) recomputes
        # it in backward instead of saving it.
        hidden_states = self.linear("fc2", hidden_states, routing_weights, routing, activation=self.activation_fn)
        return hidden_states, routing_weights


class WEMoEAttention(WEMoERoutedLinears, CLIPAttention):
    """CLIP attention whose routed projections (some of `q_proj`, `k_proj`, `v_proj`, `out_proj`) are mixed per
    input from the pretrained weights and K expert task vectors; unrouted projections hold task-arithmetic weights.

    Attention itself runs through transformers' attention interface (eager, sdpa, ...), as in [`CLIPAttention`].
    When the layer's router is not shared, it lives here and reads the states entering attention.
    """

    def __init__(
        self, config: WEMoECLIPVisionConfig, with_router: bool = True, routed: Sequence[str] | None = None
    ):
        super().__init__(config)
        self.routed = tuple(routed) if routed is not None else ATTENTION_MODULES
        self.task_vectors = WEMoETaskVectors(config, self.routed)
        self.router = WEMoERouter(config) if with_router else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        router: WEMoERouter | None = None,
        routing_weights: torch.Tensor | None = None,
        routing: str | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Input shape: Batch x Time x Channel. Returns `(output, attention_weights, routing_weights)`; `router`,
        `routing_weights` and `routing` as for [`WEMoEMLP`]."""
        routing_weights = self.route(hidden_states, router, routing_weights)
        routing = routing or self.config.routing
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        queries = self.linear("q_proj", hidden_states, routing_weights, routing)
        keys = self.linear("k_proj", hidden_states, routing_weights, routing)
        values = self.linear("v_proj", hidden_states, routing_weights, routing)

        queries = queries.view(hidden_shape).transpose(1, 2)
        keys = keys.view(hidden_shape).transpose(1, 2)
        values = values.view(hidden_shape).transpose(1, 2)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            queries,
            keys,
            values,
            attention_mask,
            scaling=self.scale,
            dropout=0.0 if not self.training else self.dropout,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.linear("out_proj", attn_output, routing_weights, routing)
        return attn_output, attn_weights, routing_weights


class WEMoECLIPEncoderLayer(GradientCheckpointingLayer):
    """A CLIP encoder layer (attention, MLP) whose routed modules (`moe_modules`) are WEMoE modules when the layer
    is an MoE layer: the attention a [`WEMoEAttention`] when a projection is routed, the MLP a [`WEMoEMLP`] when
    `fc1` or `fc2` is. The layer's router (unless shared) lives in the first of them, and its routing vector
    serves both.

    With gradient checkpointing on (`model.gradient_checkpointing_enable()`), training keeps only each layer's
    input and recomputes the layer in backward.
    """

    def __init__(self, config: WEMoECLIPVisionConfig, is_moe: bool):
        super().__init__()
        self.is_moe = is_moe
        routed = config.moe_modules if is_moe else []
        attention = [name for name in routed if name in ATTENTION_MODULES]
        mlp = [name for name in routed if name in MLP_MODULES]
        own_router = not config.shared_router
        if attention:
            self.self_attn = WEMoEAttention(config, with_router=own_router, routed=attention)
        else:
            self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if mlp:
            self.mlp = WEMoEMLP(config, with_router=own_router and not attention, routed=mlp)
        else:
            self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @property
    def routed_modules(self) -> list[WEMoERoutedLinears]:
        """The layer's WEMoE modules (attention and/or MLP), in data-flow order; empty for a static layer."""
        return [module for module in (self.self_attn, self.mlp) if isinstance(module, WEMoERoutedLinears)]

    def forward(
        self,
        hidden_states: torch.Tensor,
        router: WEMoERouter | None = None,
        routing_weights: torch.Tensor | None = None,
        routing: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns `(hidden_states, attention_weights, routing_weights)`; the last is None for a static layer."""
        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        if isinstance(self.self_attn, WEMoEAttention):
            hidden_states, attention_weights, routing_weights = self.self_attn(
                hidden_states, router=router, routing_weights=routing_weights, routing=routing
            )
        else:
            hidden_states, attention_weights = self.self_attn(hidden_states=hidden_states, attention_mask=None)
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.layer_norm2(hidden_states)
        if isinstance(self.mlp, WEMoEMLP):
            # After a routed attention, `routing_weights` holds its routing: the MLP uses the same vector.
            hidden_states, routing_weights = self.mlp(
                hidden_states, router=router, routing_weights=routing_weights, routing=routing
            )
        else:
            hidden_states = self.mlp(hidden_states)
        return residual + hidden_states, attention_weights, routing_weights if self.is_moe else None


class WEMoECLIPEncoder(nn.Module):
    """The stack of encoder layers, plus the router shared by every MoE layer when `shared_router` is set."""

    def __init__(self, config: WEMoECLIPVisionConfig):
        super().__init__()
        self.config = config
        moe_layers = set(config.moe_layer_indices)
        self.layers = nn.ModuleList(
            [WEMoECLIPEncoderLayer(config, is_moe=i in moe_layers) for i in range(config.num_hidden_layers)]
        )
        self.router = WEMoERouter(config) if config.shared_router else None
        self.gradient_checkpointing = False

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        force_routing: torch.Tensor | None = None,
        routing: str | None = None,
    ) -> tuple[torch.Tensor, tuple | None, tuple | None, tuple[torch.Tensor, ...]]:
        """Returns `(last_hidden_state, hidden_states, attentions, routing_weights)`."""
        hidden_states = inputs_embeds
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing and not hidden_states.requires_grad:
            # Reentrant checkpointing only back-propagates through a layer whose input requires gradients, and the
            # frozen embeddings' output does not: without this the routers would get no gradients.
            hidden_states = hidden_states.detach().requires_grad_(True)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        all_routing = ()
        for layer in self.layers:
            forced = None
            if force_routing is not None and layer.is_moe:
                forced = _routing_for_layer(force_routing, len(all_routing))
            hidden_states, attentions, layer_routing = layer(
                hidden_states, router=self.router, routing_weights=forced, routing=routing
            )
            if layer_routing is not None:
                all_routing += (layer_routing,)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attentions,)
        return hidden_states, all_hidden_states, all_attentions, all_routing


class WEMoECLIPPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading conventions shared by the WEMoE CLIP models.

    Only router parameters (see [`is_router_parameter`]) require gradients, after `__init__` and after
    `from_pretrained`; `router_parameters()` lists them.
    """

    config_class = WEMoECLIPVisionConfig
    config: WEMoECLIPVisionConfig
    base_model_prefix = "wemoe"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["WEMoECLIPEncoderLayer", "CLIPVisionEmbeddings"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Routers start at `scaling` for every expert; CLIP modules use CLIP's initialisation."""
        # Router layers are recognised by their role: transformers initialises leaf modules on their own.
        role = getattr(module, "_router_role", None)
        if role is not None:
            init.normal_(module.weight, std=0.01)
            init.constant_(module.bias, self.config.scaling if role == "output" else 0.0)
        elif isinstance(module, WEMoERouter) and module.depth == 0:
            init.constant_(module.bias, self.config.scaling)
        elif isinstance(module, CLIPVisionEmbeddings):
            factor = self.config.initializer_factor
            init.normal_(module.class_embedding, std=module.embed_dim**-0.5 * factor)
            init.normal_(module.patch_embedding.weight, std=self.config.initializer_range * factor)
            init.normal_(module.position_embedding.weight, std=self.config.initializer_range * factor)
            init.copy_(module.position_ids, torch.arange(module.num_positions).expand((1, -1)))
        elif isinstance(module, nn.Linear):
            # Pretrained and expert weights always come from a checkpoint; these values only fill fresh models.
            init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def post_init(self) -> None:
        """Initialise weights, then make only router parameters trainable."""
        super().post_init()
        self.freeze_non_router_parameters()
        for name, module in self.named_modules():
            if isinstance(module, WEMoETaskVectors):
                module.key_prefix = f"{name}."

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Load like any transformers model; only router parameters require gradients afterwards.

        Raises:
            ValueError: sparse task vectors with corrupted positions (names the tensor).
        """
        loaded = super().from_pretrained(*args, **kwargs)
        # With `output_loading_info=True` transformers returns (model, info).
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.freeze_non_router_parameters()
        # A damaged checkpoint fails here, once, rather than in (and on every trace of) the forward.
        for module in model.modules():
            if isinstance(module, WEMoETaskVectors):
                module.check_positions()
        return loaded

    def set_routing(self, routing: str) -> None:
        """Switch the routing mode of the WEMoE vision tower: `"sample"` (every input gets its own merged MLP,
        the paper's method) or `"batch"` (the routing weights are averaged over the batch and one merged MLP
        serves it). The mode is the config's `routing` field, so saved copies keep it; the forward's `routing`
        argument overrides it for one call.

        Raises:
            ValueError: `routing` is not one of the routing modes (names them).
        """
        check_routing(routing)
        # The full CLIP model keeps the vision tower's config (shared with the tower's modules) as `vision_config`.
        getattr(self.config, "vision_config", self.config).routing = routing

    def freeze_non_router_parameters(self) -> None:
        """Only routers train: every other parameter gets `requires_grad=False`."""
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(is_router_parameter(name))

    def router_parameters(self) -> list[nn.Parameter]:
        """The parameters of every router (what router adaptation trains)."""
        return [p for name, p in self.named_parameters() if is_router_parameter(name)]


class WEMoECLIPVisionModel(WEMoECLIPPreTrainedModel):
    """A CLIP vision tower whose MLPs are weight-ensembling mixtures of experts.

    Takes the inputs of [`CLIPVisionModel`] and returns its outputs, plus `routing_weights` (one (batch, K)
    tensor per MoE layer) when called with `output_routing_weights=True`.

    Example:

    ```python
    >>> from transformers import AutoModel
    >>> model = AutoModel.from_pretrained("org/wemoe-clip-vit-base-patch32", trust_remote_code=True)
    >>> outputs = model(pixel_values, output_routing_weights=True)
    >>> outputs.pooler_output.shape, len(outputs.routing_weights)
    ```
    """

    def __init__(self, config: WEMoECLIPVisionConfig):
        super().__init__(config)
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = WEMoECLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embedding

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_routing_weights: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        force_routing: torch.Tensor | None = None,
        routing: str | None = None,
        **kwargs,
    ) -> WEMoEModelOutputWithPooling | tuple:
        r"""
        output_routing_weights (`bool`, *optional*):
            Return the routing weights of every MoE layer, each of shape (batch, num_experts).
        force_routing (`torch.Tensor`, *optional*):
            Use these routing weights instead of the routers': shape (num_experts,) for every MoE layer, or
            (num_moe_layers, num_experts) for one vector per MoE layer.
        routing (`str`, *optional*):
            The routing mode for this call, `"sample"` or `"batch"` (see `set_routing`); defaults to the
            config's `routing`.
        """
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        output_attentions = (
            output_attentions if output_attentions is not None else self.config.output_attentions
        )
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if force_routing is not None:
            force_routing = self._check_force_routing(force_routing)
        if routing is None:
            routing = self.config.routing
        else:
            check_routing(routing)

        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        hidden_states = self.pre_layrnorm(hidden_states)
        last_hidden_state, hidden_states, attentions, routing = self.encoder(
            hidden_states,
            output_attentions=bool(output_attentions),
            output_hidden_states=bool(output_hidden_states),
            force_routing=force_routing,
            routing=routing,
        )
        pooled_output = self.post_layernorm(last_hidden_state[:, 0, :])
        routing_weights = routing if output_routing_weights else None

        if not return_dict:
            outputs = (last_hidden_state, pooled_output, hidden_states, attentions, routing_weights)
            return tuple(value for value in outputs if value is not None)
        return WEMoEModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=pooled_output,
            hidden_states=hidden_states,
            attentions=attentions,
            routing_weights=routing_weights,
        )

    @property
    def moe_layers(self) -> list[WEMoEMLP]:
        """The WEMoE MLP modules, in layer order (none when no MLP layer is routed; see `routed_modules`)."""
        return [layer.mlp for layer in self.encoder.layers if isinstance(layer.mlp, WEMoEMLP)]

    @property
    def routed_modules(self) -> list[WEMoERoutedLinears]:
        """Every WEMoE module (routed attention and MLP, each with its `task_vectors`), in data-flow order."""
        return [module for layer in self.encoder.layers for module in layer.routed_modules]

    def _check_force_routing(self, routing: torch.Tensor) -> torch.Tensor:
        routing = torch.as_tensor(routing, dtype=torch.float32)
        num_layers, num_experts = len(self.config.moe_layer_indices), self.config.num_experts
        if routing.shape not in ((num_experts,), (num_layers, num_experts)):
            raise ValueError(
                f"routing weights must have shape ({num_experts},) or ({num_layers}, {num_experts}), "
                f"got {tuple(routing.shape)}"
            )
        return routing

    @torch.no_grad()
    def collapse(self, routing: torch.Tensor | list) -> CLIPVisionModel:
        """A plain `CLIPVisionModel` whose routed layers are W0 + sum_k r_k tau_k for fixed routing weights.

        `routing` is one (K,) vector for every MoE layer, or a (num_moe_layers, K) table. The result is a
        task-specific static model with no routing overhead; it computes what this model computes with the
        same routing forced (`force_routing=routing`).
        """
        routing = self._check_force_routing(routing)
        static = CLIPVisionModel(_static_config(self.config)).to(self.device)
        # Routers (per layer or the shared one) and task vectors have no place in a static model; the routed
        # layers' pretrained weights are replaced by their merged ones below.
        state = {
            name: tensor
            for name, tensor in self.state_dict().items()
            if not is_router_parameter(name) and ".task_vectors." not in name
        }
        for position, index in enumerate(self.config.moe_layer_indices):
            layer = self.encoder.layers[index]
            for module in layer.routed_modules:
                prefix = f"encoder.layers.{index}.{'self_attn' if module is layer.self_attn else 'mlp'}."
                merged = module.merged_state(_routing_for_layer(routing, position))
                state.update({prefix + key: value for key, value in merged.items()})
        static.load_state_dict(state, strict=True)
        return static.to(self.dtype)


class WEMoECLIPVisionModelWithProjection(WEMoECLIPPreTrainedModel):
    """[`WEMoECLIPVisionModel`] with the base CLIP model's `visual_projection`, returning `image_embeds`.

    For CLIP zero-shot classification: compare the L2-normalised `image_embeds` with text embeddings of class
    prompts from the base model's text tower.
    """

    base_model_prefix = "vision_model"

    def __init__(self, config: WEMoECLIPVisionConfig):
        super().__init__(config)
        self.vision_model = WEMoECLIPVisionModel(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.embeddings.patch_embedding

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_routing_weights: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        force_routing: torch.Tensor | None = None,
        routing: str | None = None,
        **kwargs,
    ) -> WEMoEVisionModelOutput | tuple:
        """Same inputs as [`WEMoECLIPVisionModel`]; adds `image_embeds` to its outputs."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.vision_model(
            pixel_values=pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_routing_weights=output_routing_weights,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=True,
            force_routing=force_routing,
            routing=routing,
        )
        image_embeds = self.visual_projection(outputs.pooler_output)
        result = WEMoEVisionModelOutput(
            image_embeds=image_embeds,
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=outputs.pooler_output,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            routing_weights=outputs.routing_weights,
        )
        return result if return_dict else result.to_tuple()

    @torch.no_grad()
    def collapse(self, routing: torch.Tensor | list) -> CLIPVisionModelWithProjection:
        """A plain `CLIPVisionModelWithProjection` for fixed routing weights (see `WEMoECLIPVisionModel.collapse`)."""
        vision = self.vision_model.collapse(routing)
        static = CLIPVisionModelWithProjection(vision.config).to(device=self.device, dtype=self.dtype)
        static.vision_model.load_state_dict(vision.state_dict())
        static.visual_projection.load_state_dict(self.visual_projection.state_dict())
        return static


WEMoECLIPVisionConfig.register_for_auto_class()
WEMoECLIPVisionModel.register_for_auto_class("AutoModel")

__all__ = [
    "WEMoECLIPPreTrainedModel",
    "WEMoECLIPVisionModel",
    "WEMoECLIPVisionModelWithProjection",
    "WEMoEAttention",
    "WEMoEMLP",
    "WEMoERoutedLinears",
    "WEMoERouter",
    "WEMoETaskVectors",
    "decode_sparse_indices",
    "encode_sparse_indices",
    "is_router_parameter",
    "num_kept_entries",
    "sparsify_task_vector",
]
