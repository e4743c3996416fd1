"""PyTorch WEMoE CLIP vision model: a CLIP vision tower whose MLPs are weight-ensembling mixtures of experts.

Every MoE MLP holds the pretrained MLP (W0), the task vectors of K fine-tuned experts (tau_k = theta_k - theta_0, for
fc1/fc2 weights and biases) and a router. For each input the router reads the MLP's input tokens, averages its
outputs over the tokens and gives K routing weights r; the MLP then runs with W = W0 + sum_k r_k tau_k.

This file is copied into every saved model folder and Hub repository, so it imports only the standard library,
torch, transformers and its sibling `configuration_wemoe.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention, CLIPVisionEmbeddings
from transformers.utils import ModelOutput

from .configuration_wemoe import WEMoECLIPVisionConfig

# Names of the four MLP tensors that carry task vectors, and the nn.Linear they belong to.
MLP_TENSORS = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")

# Per-sample merged weights are built one block (samples x output rows x in) at a time, so that nothing of size
# batch x weight is ever alive and a block is consumed while still in cache. On CPU, 2^19 to 2^22 elements per
# block cost the same CPU time at ViT-B/32 (2^23 and up cost more); the largest of them means the fewest
# operations, which matters when other processes compete for the cores (every operation is a parallel region).
MERGE_BLOCK_ELEMENTS = 1 << 22
# ...but no fewer output rows than this: narrow blocks make the per-sample GEMMs inefficient.
MIN_BLOCK_ROWS = 64
# On accelerators the block only bounds memory; large blocks mean few kernel launches.
ACCELERATOR_MERGE_BLOCK_ELEMENTS = 1 << 24

# Sparse task vectors store a kept entry's flat position as a 16-bit offset inside a block of this many entries,
# plus the number of kept entries in every block (see `WEMoETaskVectors`).
SPARSE_BLOCK_SIZE = 1 << 16


def num_kept_entries(numel: int, sparsity: float) -> int:
    """Entries a task-vector tensor of `numel` elements keeps at `sparsity`: ceil((1 - sparsity) * numel), at least 1."""
    # Rounding first keeps e.g. (1 - 0.7) * 10 = 3.0000000000000004 from becoming 4.
    return max(1, math.ceil(round((1.0 - sparsity) * numel, 6)))


def sparsify_task_vector(tensor: torch.Tensor, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the largest-magnitude entries of one task-vector tensor.

    Returns `(indices, values)`: int32 flat indices in increasing order and the kept values (same dtype as
    `tensor`). Selection uses top-k on float32 magnitudes, which works for every dtype and size.
    """
    flat = tensor.reshape(-1)
    keep = num_kept_entries(flat.numel(), sparsity)
    # A mask + nonzero gives the kept indices in increasing order, several times faster than sorting them.
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[torch.topk(flat.float().abs(), keep, sorted=False).indices] = True
    indices = mask.nonzero().squeeze(1)
    return indices.to(torch.int32), flat[indices]


def num_index_blocks(numel: int) -> int:
    """How many `SPARSE_BLOCK_SIZE`-entry blocks a flattened tensor of `numel` elements spans."""
    return -(-numel // SPARSE_BLOCK_SIZE)


def encode_sparse_indices(indices: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split flat indices (..., nnz), increasing along the last axis, into 16-bit offsets and per-block counts.

    Returns `(offsets, block_counts)`: `offsets` (..., nnz) int16 holds `index % 65536` (the unsigned 16-bit
    value reinterpreted as signed: 40000 is stored as -25536), `block_counts` (..., ceil(numel / 65536)) int32
    how many indices fall in each block `index // 65536`. Works on any device, including `meta`.
    """
    indices = indices.long()
    # Offsets keep the low 16 bits; XOR and subtract sign-extend them to the int16 range without an overflowing
    # cast (offset 40000 becomes -25536).
    offsets = (((indices & (SPARSE_BLOCK_SIZE - 1)) ^ 0x8000) - 0x8000).to(torch.int16)
    # The indices are sorted, so the entries before each block boundary give the counts.
    boundaries = torch.arange(num_index_blocks(numel) + 1, device=indices.device) * SPARSE_BLOCK_SIZE
    boundaries = boundaries.expand(*indices.shape[:-1], -1).contiguous()
    counts = torch.searchsorted(indices, boundaries).diff(dim=-1).to(torch.int32)
    return offsets, counts


def decode_sparse_indices(offsets: torch.Tensor, block_counts: torch.Tensor) -> torch.Tensor:
    """The int64 flat indices (K, nnz) stored as `offsets` (K, nnz) and `block_counts` (K, blocks).

    Inverse of `encode_sparse_indices`; expects every row of `block_counts` to be non-negative and sum to nnz.
    """
    rows, nnz = offsets.shape
    block_numbers = torch.arange(block_counts.shape[-1], device=offsets.device).repeat(rows)
    blocks = torch.repeat_interleave(block_numbers, block_counts.reshape(-1), output_size=rows * nnz)
    return blocks.view(rows, nnz) * SPARSE_BLOCK_SIZE + (offsets.long() & (SPARSE_BLOCK_SIZE - 1))


def _routing_for_layer(force_routing: torch.Tensor, position: int) -> torch.Tensor:
    """The forced routing weights of the `position`-th MoE layer: a (K,) vector or one row of an (L, K) table."""
    return force_routing if force_routing.dim() == 1 else force_routing[position]


class _PerSampleLinear(torch.autograd.Function):
    """`y[b] = x[b] @ (W0 + sum_k r[b, k] tau[k]).T + (b0 + sum_k r[b, k] beta[k])` for every sample b.

    The merged weights are never materialised for the whole batch: they are built one block (a group of samples
    times a block of output rows) at a time by a single GEMM over the expert axis, used at once by a batched GEMM
    and overwritten by the next block. Backward rebuilds the blocks instead of keeping merged weights alive:
    dx[b] = dy[b] @ W[b], and with G[b] = dy[b].T @ x[b] (summed over tokens), dr[b, k] = <tau[k], G[b]> and
    d[W0; tau] = [1, r].T @ G. All merging and routing arithmetic runs in the routing dtype (at least float32).

    With `activation`, the layer computes on `activation(x)` and keeps only `x` for backward, recomputing the
    activation there: an MLP's second layer then saves one (batch, tokens, intermediate) tensor instead of three.
    """

    @staticmethod
    def forward(ctx, x, routing, weight, bias, weight_deltas, bias_deltas, activation=None):  # noqa: D102
        ctx.save_for_backward(x, routing, weight, bias, weight_deltas, bias_deltas)
        ctx.activation = activation
        if activation is not None:
            x = activation(x)
        batch, tokens, in_features = x.shape
        out_features = weight.shape[0]
        bias_rows = torch.addmm(bias.to(routing.dtype).unsqueeze(0), routing, bias_deltas.to(routing.dtype))
        bias_rows = bias_rows.to(x.dtype).unsqueeze(1)
        blocks = _MergeBlocks(x, routing, weight, weight_deltas)
        if blocks.rows == out_features:
            # One block of rows: every sample group writes its own slice of the output.
            output = x.new_empty(batch, tokens, out_features)
            for _ in blocks.row_ranges():
                for first, last in blocks.sample_ranges():
                    torch.bmm(
                        x[first:last], blocks.merged(first, last).transpose(1, 2), out=output[first:last]
                    )
        else:
            # Row blocks are strided slices of the output, and a strided `out=` makes bmm run one GEMM per sample:
            # each block goes to a contiguous staging slab, and one concatenation assembles the output.
            staging = x.new_empty(batch * tokens * out_features)
            parts, offset = [], 0
            for start, stop in blocks.row_ranges():
                part = staging[offset : offset + batch * tokens * (stop - start)].view(
                    batch, tokens, stop - start
                )
                offset += part.numel()
                parts.append(part)
                for first, last in blocks.sample_ranges():
                    merged = blocks.merged(first, last).transpose(1, 2)
                    torch.bmm(x[first:last], merged, out=part[first:last])
            output = torch.cat(parts, dim=-1)
        # One pass for the biases of every block (few large operations keep per-operation overhead low).
        return output.add_(bias_rows)

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        x, need_x = ctx.saved_tensors[0], ctx.needs_input_grad[0]
        if ctx.activation is None:
            grads = _PerSampleLinear._backward(ctx, grad_output, x, need_x)
            return *grads, None
        # Recompute the activation (with its graph when x needs a gradient) and chain through it.
        with torch.enable_grad():
            pre_activation = x.detach().requires_grad_(need_x)
            activated = ctx.activation(pre_activation)
        grad_activated, *grads = _PerSampleLinear._backward(ctx, grad_output, activated.detach(), need_x)
        grad_x = torch.autograd.grad(activated, pre_activation, grad_activated)[0] if need_x else None
        return grad_x, *grads, None

    @staticmethod
    def _backward(ctx, grad_output, x, need_x):
        """Gradients for (x, routing, weight, bias, weight_deltas, bias_deltas) of the layer applied to `x`."""
        _, routing, weight, bias, weight_deltas, bias_deltas = ctx.saved_tensors
        need_routing, need_weight, need_bias, need_deltas, need_bias_deltas = ctx.needs_input_grad[1:6]
        acc = routing.dtype
        grad_x = grad_routing = grad_weight = grad_bias = grad_deltas = grad_bias_deltas = None

        # Bias terms: every token of sample b adds b0 + sum_k r[b, k] beta[k].
        token_sums = grad_output.sum(dim=1, dtype=acc)  # (B, out)
        if need_routing:
            grad_routing = token_sums @ bias_deltas.to(acc).t()
        if need_bias:
            grad_bias = token_sums.sum(dim=0).to(bias.dtype)
        if need_bias_deltas:
            grad_bias_deltas = (routing.t() @ token_sums).to(bias_deltas.dtype)

        need_outer = need_routing or need_weight or need_deltas
        if not (need_x or need_outer):
            return grad_x, grad_routing, grad_weight, grad_bias, grad_deltas, grad_bias_deltas
        blocks = _MergeBlocks(x, routing, weight, weight_deltas)
        if need_x:
            grad_x = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
        if need_weight or need_deltas:
            # Gradients of the frozen tensors are only built when someone unfroze them.
            grad_stack = torch.zeros(weight_deltas.shape[0] + 1, weight.numel(), dtype=acc, device=x.device)
        outer = torch.empty(blocks.group * blocks.rows * x.shape[2], dtype=acc, device=x.device)
        for start, stop in blocks.row_ranges():
            for first, last in blocks.sample_ranges():
                grad_block = grad_output[first:last, :, start:stop]
                if need_x:
                    grad_x[first:last].baddbmm_(grad_block, blocks.merged(first, last))
                if need_outer:
                    # G for this block: sum over tokens of dy_t x_t^T, flattened to (samples, rows * in).
                    size = (last - first) * blocks.block_numel
                    block_outer = outer[:size].view(last - first, -1)
                    products = block_outer.view(last - first, stop - start, -1)
                    if x.dtype == acc:
                        torch.bmm(grad_block.transpose(1, 2), x[first:last], out=products)
                    else:
                        products.copy_(torch.bmm(grad_block.transpose(1, 2), x[first:last]))
                    base, deltas = blocks.experts()
                    if need_routing:
                        grad_routing[first:last].addmm_(block_outer, deltas.t())
                    if need_weight or need_deltas:
                        columns = slice(start * x.shape[2], stop * x.shape[2])
                        coefficients = blocks.coefficients[first:last]
                        grad_stack[:, columns].addmm_(coefficients.t(), block_outer)
        if need_weight:
            grad_weight = grad_stack[0].view(weight.shape).to(weight.dtype)
        if need_deltas:
            grad_deltas = grad_stack[1:].view(weight_deltas.shape).to(weight_deltas.dtype)
        return grad_x, grad_routing, grad_weight, grad_bias, grad_deltas, grad_bias_deltas


class _MergedWeight(torch.autograd.Function):
    """`W0 + sum_k r[k] tau[k]` for one routing vector r of shape (1, K), merged in r's dtype.

    Task vectors stored in another dtype are converted a block of rows at a time, in forward and in backward,
    so no full-precision copy of them is created or kept for backward.
    """

    @staticmethod
    def forward(ctx, routing, weight, deltas):  # noqa: D102
        ctx.save_for_backward(routing, weight, deltas)
        acc, num_experts = routing.dtype, deltas.shape[0]
        if weight.dtype == acc and deltas.dtype == acc:
            merged = torch.addmm(weight.reshape(1, -1), routing, deltas.reshape(num_experts, -1))
            return merged.view(weight.shape)
        merged = torch.empty(weight.shape, dtype=acc, device=weight.device)
        for start, stop in _conversion_blocks(weight):
            torch.addmm(
                weight[start:stop].reshape(1, -1).to(acc),
                routing,
                deltas[:, start:stop].reshape(num_experts, -1).to(acc),
                out=merged[start:stop].view(1, -1),
            )
        return merged

    @staticmethod
    def backward(ctx, grad_merged):  # noqa: D102
        routing, weight, deltas = ctx.saved_tensors
        acc, num_experts = routing.dtype, deltas.shape[0]
        grad_routing = grad_weight = grad_deltas = None
        if ctx.needs_input_grad[0]:
            grad_routing = routing.new_zeros(routing.shape)
            for start, stop in _conversion_blocks(weight):
                block = deltas[:, start:stop].reshape(num_experts, -1).to(acc)
                grad_routing.addmm_(grad_merged[start:stop].reshape(1, -1).to(acc), block.t())
        if ctx.needs_input_grad[1]:
            grad_weight = grad_merged.to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_deltas = (routing.t() @ grad_merged.reshape(1, -1).to(acc)).view(deltas.shape)
            grad_deltas = grad_deltas.to(deltas.dtype)
        return grad_routing, grad_weight, grad_deltas


def _conversion_blocks(weight: torch.Tensor) -> list[tuple[int, int]]:
    """Blocks of leading-dimension rows holding about MERGE_BLOCK_ELEMENTS elements each."""
    rows = max(1, MERGE_BLOCK_ELEMENTS // max(1, weight[0].numel() if weight.dim() > 1 else 1))
    return [(start, min(start + rows, weight.shape[0])) for start in range(0, weight.shape[0], rows)]


def _block_plan(batch: int, out_features: int, in_features: int, device: torch.device) -> tuple[int, int]:
    """`(rows, samples)` of one merged-weight block: balanced splits within the device's block budget."""
    budget = MERGE_BLOCK_ELEMENTS if device.type == "cpu" else ACCELERATOR_MERGE_BLOCK_ELEMENTS
    rows = min(out_features, max(MIN_BLOCK_ROWS, budget // max(1, batch * in_features)))
    rows = math.ceil(out_features / math.ceil(out_features / rows))
    group = max(1, min(batch, budget // (rows * in_features)))
    group = math.ceil(batch / math.ceil(batch / group))
    return rows, group


class _MergeBlocks:
    """Builds blocks of per-sample merged weights W0 + sum_k r[b, k] tau[k] in reusable workspaces.

    Iterate `row_ranges()` (which loads W0 and tau rows, converted to the routing dtype) and, inside,
    `sample_ranges()`; `merged(first, last)` is then the (samples, rows, in) block in the input's dtype, valid
    until the next call. Small single-group batches merge straight from the stored tensors (one broadcast copy
    of W0 per sample); larger ones first stage the K + 1 expert rows once and combine them with one GEMM whose
    leading coefficient 1 selects W0.
    """

    def __init__(self, x: torch.Tensor, routing: torch.Tensor, weight: torch.Tensor, deltas: torch.Tensor):
        batch, _, in_features = x.shape
        self.acc, self.dtype = routing.dtype, x.dtype
        self.routing, self.weight, self.deltas = routing, weight, deltas
        self.batch, self.in_features, self.out_features = batch, in_features, weight.shape[0]
        self.rows, self.group = _block_plan(batch, self.out_features, in_features, x.device)
        num_experts = deltas.shape[0]
        stored_in_acc = weight.dtype == self.acc and deltas.dtype == self.acc
        self.direct = stored_in_acc and self.group == batch and batch <= 2 * (num_experts + 1)
        self.coefficients = torch.cat([routing.new_ones(batch, 1), routing], dim=1)
        self.block_numel = self.rows * in_features
        self.stack = None
        if not self.direct:
            self.stack = torch.empty(num_experts + 1, self.block_numel, dtype=self.acc, device=x.device)
        size = self.group * self.block_numel
        self.workspace = torch.empty(size, dtype=self.acc, device=x.device)
        self.cast = None if self.dtype == self.acc else torch.empty(size, dtype=self.dtype, device=x.device)
        self.start = self.stop = 0

    def row_ranges(self):
        for start in range(0, self.out_features, self.rows):
            self.start, self.stop = start, min(start + self.rows, self.out_features)
            self.block_numel = (self.stop - self.start) * self.in_features
            base = self.weight[self.start : self.stop].reshape(1, -1)
            deltas = self.deltas[:, self.start : self.stop].reshape(self.deltas.shape[0], -1)
            if self.stack is None:
                self._base, self._deltas = base, deltas
            else:
                staged = self.stack[:, : self.block_numel]
                torch.cat([base, deltas], out=staged)
                self._base, self._deltas = staged[:1], staged[1:]
            yield self.start, self.stop

    def sample_ranges(self):
        for first in range(0, self.batch, self.group):
            yield first, min(first + self.group, self.batch)

    def experts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W0 rows (1, rows * in) and tau rows (K, rows * in) of the current block, in the routing dtype."""
        return self._base, self._deltas

    def merged(self, first: int, last: int) -> torch.Tensor:
        size = (last - first) * self.block_numel
        merged = self.workspace[:size].view(last - first, self.block_numel)
        if self.direct:
            torch.addmm(self._base, self.routing[first:last], self._deltas, out=merged)
        else:
            torch.mm(self.coefficients[first:last], self.stack[:, : self.block_numel], out=merged)
        if self.cast is not None:
            merged = self.cast[:size].view_as(merged).copy_(merged)
        return merged.view(last - first, self.stop - self.start, self.in_features)


def _version(tensor: torch.Tensor) -> int:
    """The in-place version counter of a tensor (inference tensors have none and cannot change)."""
    return 0 if tensor.is_inference() else tensor._version


class WEMoERouter(nn.Module):
    """Maps the token states entering an MLP to K routing weights per sample.

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


class WEMoETaskVectors(nn.Module):
    """The K task vectors of one MLP, stored densely or sparsely.

    Dense: one buffer `{name}` (K, *shape) per tensor. Sparse (`task_vector_sparsity > 0`), with nnz =
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

    def __init__(self, config: WEMoECLIPVisionConfig):
        super().__init__()
        self.shapes = {
            "fc1_weight": (config.intermediate_size, config.hidden_size),
            "fc1_bias": (config.intermediate_size,),
            "fc2_weight": (config.hidden_size, config.intermediate_size),
            "fc2_bias": (config.hidden_size,),
        }
        self.sparsity = float(config.task_vector_sparsity)
        # The state-dict prefix of this module, set by the model, to name tensors in errors.
        self.key_prefix = "task_vectors."
        dtype = getattr(torch, config.task_vector_dtype)
        num_experts = config.num_experts
        for name, shape in self.shapes.items():
            if self.is_sparse:
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

    def dense(self, name: str) -> torch.Tensor:
        """The task vectors of tensor `name` as a dense (K, *shape) tensor in the storage dtype.

        Sparse storage is expanded once and cached until the stored positions or values change (a load, a move
        to another device).

        Raises:
            ValueError: the stored positions are corrupted (block counts that do not sum to the number of kept
                entries, or positions that are not increasing inside the tensor); names the tensor.
        """
        if not self.is_sparse:
            return getattr(self, name)
        buffers = [getattr(self, f"{name}_{part}") for part in ("indices", "block_counts", "values")]
        key = (*((b.data_ptr(), _version(b)) for b in buffers), buffers[-1].device)
        cached = self._dense_cache.get(name)
        if cached is None or cached[0] != key:
            offsets, counts, values = buffers
            shape = self.shapes[name]
            positions = self._positions(name, offsets, counts, math.prod(shape))
            # Built outside inference mode so that a cache first filled during evaluation still serves training.
            with torch.inference_mode(False), torch.no_grad():
                dense = torch.zeros(
                    values.shape[0], math.prod(shape), dtype=values.dtype, device=values.device
                )
                dense.scatter_(1, positions, values)
            cached = (key, dense.view(values.shape[0], *shape))
            self._dense_cache[name] = cached
        return cached[1]

    def _positions(self, name: str, offsets: torch.Tensor, counts: torch.Tensor, numel: int) -> torch.Tensor:
        """Decode and check the flat positions (K, nnz) of tensor `name`."""
        stored = f"{self.key_prefix}{name}"
        kept = offsets.shape[-1]
        totals = counts.sum(dim=-1)
        if bool((counts < 0).any()) or bool((totals != kept).any()):
            raise ValueError(
                f"corrupted sparse task vectors: every row of '{stored}_block_counts' must be non-negative and "
                f"sum to {kept} kept entries (row sums {totals.tolist()}); the checkpoint is damaged, re-create it"
            )
        positions = decode_sparse_indices(offsets, counts)
        if bool((positions[:, 1:] <= positions[:, :-1]).any()) or bool((positions[:, -1] >= numel).any()):
            raise ValueError(
                f"corrupted sparse task vectors: '{stored}_indices' with '{stored}_block_counts' do not decode "
                f"to increasing positions below {numel} (the tensor's size); the checkpoint is damaged, re-create it"
            )
        return positions

    def set(self, name: str, task_vectors: torch.Tensor) -> None:
        """Store the stacked (K, *shape) task vectors of tensor `name`, sparsifying them when configured."""
        with torch.no_grad():
            if self.is_sparse:
                for k, tensor in enumerate(task_vectors):
                    indices, values = sparsify_task_vector(tensor, self.sparsity)
                    offsets, counts = encode_sparse_indices(indices, tensor.numel())
                    getattr(self, f"{name}_indices")[k].copy_(offsets)
                    getattr(self, f"{name}_block_counts")[k].copy_(counts)
                    getattr(self, f"{name}_values")[k].copy_(values)
            else:
                getattr(self, name).copy_(task_vectors)
        self._dense_cache.pop(name, None)


class WEMoEMLP(nn.Module):
    """A CLIP MLP whose weights are mixed per input from the pretrained MLP and K expert task vectors."""

    def __init__(self, config: WEMoECLIPVisionConfig, with_router: bool = True):
        super().__init__()
        self.config = config
        self.activation_fn = ACT2FN[config.hidden_act]
        # The pretrained MLP (W0), not the task-arithmetic one.
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.task_vectors = WEMoETaskVectors(config)
        self.router = WEMoERouter(config) if with_router else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        router: WEMoERouter | None = None,
        routing_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the MLP; returns `(output, routing_weights)` with routing weights of shape (B, K).

        `router` is the shared router (when the model has one); `routing_weights` forces the routing:
        a (K,) vector or a (B, K) table.
        """
        batch_size = hidden_states.shape[0]
        if routing_weights is None:
            routing_weights = (router or self.router)(hidden_states)
        else:
            routing_weights = routing_weights.to(device=hidden_states.device)
            routing_weights = (
                routing_weights.expand(batch_size, -1) if routing_weights.dim() == 1 else routing_weights
            )
        # Routing and accumulation run in at least float32, whatever the activation and storage dtypes.
        routing_weights = routing_weights.to(torch.promote_types(routing_weights.dtype, torch.float32))

        if self.config.routing == "batch":
            # One merged MLP for the whole batch: the same kernel, with every token of the batch as one "sample"
            # routed by the batch mean (one merge per layer per forward, one large GEMM per layer).
            mean = routing_weights.mean(dim=0, keepdim=True)
            tokens = hidden_states.reshape(1, -1, hidden_states.shape[-1])
            tokens = self._per_sample_linear("fc1", tokens, mean)
            tokens = self._per_sample_linear("fc2", tokens, mean, activation=self.activation_fn)
            hidden_states = tokens.view(*hidden_states.shape[:-1], tokens.shape[-1])
        else:
            hidden_states = self._per_sample_linear("fc1", hidden_states, routing_weights)
            # The activation runs inside the second layer, which recomputes it in backward instead of saving it.
            hidden_states = self._per_sample_linear(
                "fc2", hidden_states, routing_weights, activation=self.activation_fn
            )
        return hidden_states, routing_weights

    def _merged_linear(
        self, name: str, routing: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One merged (weight, bias) for routing weights of shape (1, K)."""
        linear = getattr(self, name)
        return tuple(
            _MergedWeight.apply(routing, base, self.task_vectors.dense(f"{name}_{suffix}")).to(dtype)
            for base, suffix in ((linear.weight, "weight"), (linear.bias, "bias"))
        )

    def _per_sample_linear(
        self, name: str, hidden_states: torch.Tensor, routing: torch.Tensor, activation=None
    ) -> torch.Tensor:
        """The named layer with per-sample merged weights, on `activation(hidden_states)` when given."""
        linear = getattr(self, name)
        tokens = hidden_states.reshape(hidden_states.shape[0], -1, hidden_states.shape[-1])
        output = _PerSampleLinear.apply(
            tokens,
            routing,
            linear.weight,
            linear.bias,
            self.task_vectors.dense(f"{name}_weight"),
            self.task_vectors.dense(f"{name}_bias"),
            activation,
        )
        return output.view(*hidden_states.shape[:-1], output.shape[-1])

    def merged_mlp_state(self, routing: torch.Tensor) -> dict[str, torch.Tensor]:
        """fc1/fc2 weights and biases of the MLP merged with routing weights (K,): W0 + sum_k r_k tau_k."""
        routing = routing.reshape(1, -1).to(device=self.fc1.weight.device, dtype=torch.float32)
        state = {}
        for name in ("fc1", "fc2"):
            weight, bias = self._merged_linear(name, routing, getattr(self, name).weight.dtype)
            state[f"{name}.weight"], state[f"{name}.bias"] = weight, bias
        return state


class WEMoECLIPEncoderLayer(nn.Module):
    """A CLIP encoder layer (attention, MLP) whose MLP is a [`WEMoEMLP`] when the layer is an MoE layer."""

    def __init__(self, config: WEMoECLIPVisionConfig, is_moe: bool):
        super().__init__()
        self.is_moe = is_moe
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if is_moe:
            self.mlp = WEMoEMLP(config, with_router=not config.shared_router)
        else:
            self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        router: WEMoERouter | None = None,
        routing_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns `(hidden_states, attention_weights, routing_weights)`; the last is None for a static MLP."""
        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        hidden_states, attention_weights = self.self_attn(hidden_states=hidden_states, attention_mask=None)
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.layer_norm2(hidden_states)
        if self.is_moe:
            hidden_states, routing_weights = self.mlp(
                hidden_states, router=router, routing_weights=routing_weights
            )
        else:
            hidden_states, routing_weights = self.mlp(hidden_states), None
        return residual + hidden_states, attention_weights, routing_weights


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

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        force_routing: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple | None, tuple | None, tuple[torch.Tensor, ...]]:
        """Returns `(last_hidden_state, hidden_states, attentions, routing_weights)`."""
        hidden_states = inputs_embeds
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        all_routing = ()
        for layer in self.layers:
            forced = None
            if force_routing is not None and layer.is_moe:
                forced = _routing_for_layer(force_routing, len(all_routing))
            hidden_states, attentions, routing = layer(
                hidden_states, router=self.router, routing_weights=forced
            )
            if routing is not None:
                all_routing += (routing,)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attentions,)
        return hidden_states, all_hidden_states, all_attentions, all_routing


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


class WEMoECLIPPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading conventions shared by the WEMoE CLIP models."""

    config_class = WEMoECLIPVisionConfig
    config: WEMoECLIPVisionConfig
    base_model_prefix = "wemoe"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["WEMoECLIPEncoderLayer", "CLIPVisionEmbeddings"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Routers start at `init_lambda` for every expert; CLIP modules use CLIP's initialisation."""
        # Router layers are recognised by their role: transformers initialises leaf modules on their own.
        role = getattr(module, "_router_role", None)
        if role is not None:
            init.normal_(module.weight, std=0.01)
            init.constant_(module.bias, self.config.init_lambda if role == "output" else 0.0)
        elif isinstance(module, WEMoERouter) and module.depth == 0:
            init.constant_(module.bias, self.config.init_lambda)
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
        """Load like any transformers model; only router parameters require gradients afterwards."""
        loaded = super().from_pretrained(*args, **kwargs)
        # With `output_loading_info=True` transformers returns (model, info).
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.freeze_non_router_parameters()
        return loaded

    def freeze_non_router_parameters(self) -> None:
        """Only routers train: every other parameter gets `requires_grad=False`."""
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(_is_router_parameter(name))

    def router_parameters(self) -> list[nn.Parameter]:
        """The parameters of every router (what router adaptation trains)."""
        return [p for name, p in self.named_parameters() if _is_router_parameter(name)]


def _is_router_parameter(name: str) -> bool:
    return ".router." in f".{name}"


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
        **kwargs,
    ) -> WEMoEModelOutputWithPooling | tuple:
        r"""
        output_routing_weights (`bool`, *optional*):
            Return the routing weights of every MoE layer, each of shape (batch, num_experts).
        force_routing (`torch.Tensor`, *optional*):
            Use these routing weights instead of the routers': shape (num_experts,) for every MoE layer, or
            (num_moe_layers, num_experts) for one vector per MoE layer.
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

        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        hidden_states = self.pre_layrnorm(hidden_states)
        last_hidden_state, hidden_states, attentions, routing = self.encoder(
            hidden_states,
            output_attentions=bool(output_attentions),
            output_hidden_states=bool(output_hidden_states),
            force_routing=force_routing,
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
        """The WEMoE MLP modules, in layer order."""
        return [layer.mlp for layer in self.encoder.layers if layer.is_moe]

    def _check_force_routing(self, routing: torch.Tensor) -> torch.Tensor:
        routing = torch.as_tensor(routing, dtype=torch.float32)
        num_layers, num_experts = len(self.moe_layers), self.config.num_experts
        if routing.shape not in ((num_experts,), (num_layers, num_experts)):
            raise ValueError(
                f"routing weights must have shape ({num_experts},) or ({num_layers}, {num_experts}), "
                f"got {tuple(routing.shape)}"
            )
        return routing

    @torch.no_grad()
    def collapse(self, routing: torch.Tensor | list) -> CLIPVisionModel:
        """A plain `CLIPVisionModel` whose MLPs are W0 + sum_k r_k tau_k for fixed routing weights.

        `routing` is one (K,) vector for every MoE layer, or a (num_moe_layers, K) table. The result is a
        task-specific static model with no routing overhead; it computes what this model computes with the
        same routing forced (`force_routing=routing`).
        """
        routing = self._check_force_routing(routing)
        static = CLIPVisionModel(_static_config(self.config)).to(self.device)
        state = {}
        position = 0
        for name, tensor in self.state_dict().items():
            if ".mlp." not in name or not _is_layer_moe(self, name):
                state[name] = tensor
        for index, layer in enumerate(self.encoder.layers):
            if layer.is_moe:
                merged = layer.mlp.merged_mlp_state(_routing_for_layer(routing, position))
                state.update({f"encoder.layers.{index}.mlp.{key}": value for key, value in merged.items()})
                position += 1
        static.load_state_dict(state, strict=True)
        return static.to(self.dtype)


def _is_layer_moe(model: WEMoECLIPVisionModel, key: str) -> bool:
    index = int(key.split(".")[2])
    return model.encoder.layers[index].is_moe


def _static_config(config: WEMoECLIPVisionConfig) -> CLIPVisionConfig:
    """The plain CLIP vision config of a WEMoE config (its architecture fields only)."""
    fields = CLIPVisionConfig().to_dict()
    values = {key: value for key, value in config.to_dict().items() if key in fields and key != "model_type"}
    values.pop("transformers_version", None)
    values.pop("architectures", None)
    return CLIPVisionConfig(**values)


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
    "WEMoEMLP",
    "WEMoERouter",
    "WEMoETaskVectors",
    "decode_sparse_indices",
    "encode_sparse_indices",
    "num_kept_entries",
    "sparsify_task_vector",
]
