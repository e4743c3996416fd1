"""Every fast path of the WEMoE kernels against a plain per-sample reference.

The kernels build per-sample merged weights in blocks of output rows and groups of samples, merge either straight
from the stored tensors or through a staged copy, convert low-precision task vectors block by block and
recompute blocks in backward. Each of these paths is checked here (outputs and gradients for every input)
against a float64 loop over samples.
"""

from __future__ import annotations

import pytest
import torch

import hf_wemoe.models.wemoe_ops as ops
from hf_wemoe import build_wemoe
from hf_wemoe.models.wemoe_ops import MergeBlocks, MergedWeight, PerSampleLinear
from reference import reference_forward, saved_tensor_sizes
from tiny_models import make_base_and_experts, randomize_routers

NUM_EXPERTS = 3
TOKENS = 4


def reference_linear(x, routing, weight, bias, deltas, bias_deltas):
    """float64: one merged linear layer per sample, W0 + sum_k r_k tau_k, in a Python loop."""
    outputs = []
    for b in range(x.shape[0]):
        r = routing[b].double()
        merged = weight.double() + torch.einsum("k,koi->oi", r, deltas.double())
        merged_bias = bias.double() + r @ bias_deltas.double()
        outputs.append(x[b].double() @ merged.T + merged_bias)
    return torch.stack(outputs)


def make_inputs(batch, out_features, in_features, seed=0, delta_dtype=torch.float32, x_dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=generator)

    return dict(
        x=randn(batch, TOKENS, in_features).to(x_dtype),
        routing=randn(batch, NUM_EXPERTS),
        weight=randn(out_features, in_features, scale=0.3).to(x_dtype),
        bias=randn(out_features, scale=0.3).to(x_dtype),
        deltas=randn(NUM_EXPERTS, out_features, in_features, scale=0.1).to(delta_dtype),
        bias_deltas=randn(NUM_EXPERTS, out_features, scale=0.1).to(delta_dtype),
    )


ORDER = ("x", "routing", "weight", "bias", "deltas", "bias_deltas")


def run_kernel(inputs):
    return PerSampleLinear.apply(*(inputs[name] for name in ORDER))


# Block layouts: (MERGE_BLOCK_ELEMENTS, MIN_BLOCK_ROWS) chosen for batch 5 and 37 x 11 / 11 x 37 layers.
BLOCKINGS = {
    "one-block": (1 << 30, 1),
    # 8 rows of every sample per block: blocks of uneven size, one sample group.
    "row-blocks": (5 * 11 * 8, 1),
    # Also groups of 2, 2, 1 samples.
    "row-and-sample-blocks": (2 * 11 * 8, 8),
    "single-row-blocks": (1, 1),
}


@pytest.fixture(params=list(BLOCKINGS))
def blocking(request, monkeypatch):
    budget, min_rows = BLOCKINGS[request.param]
    monkeypatch.setattr(ops, "MERGE_BLOCK_ELEMENTS", budget)
    monkeypatch.setattr(ops, "MIN_BLOCK_ROWS", min_rows)
    return request.param


@pytest.mark.parametrize("shape", [(37, 11), (11, 37)], ids=["wide-out", "wide-in"])
@pytest.mark.parametrize("batch", [1, 5, 40])
def test_per_sample_linear_matches_reference(blocking, shape, batch):
    out_features, in_features = shape
    inputs = make_inputs(batch, out_features, in_features)
    torch.testing.assert_close(run_kernel(inputs), reference_linear(**inputs).float(), atol=1e-5, rtol=1e-5)


def test_block_plans_cover_uneven_splits_and_both_merge_paths(monkeypatch):
    """The layouts above really exercise uneven row blocks, uneven sample groups and both merge paths."""
    monkeypatch.setattr(ops, "MERGE_BLOCK_ELEMENTS", 2 * 11 * 8)
    monkeypatch.setattr(ops, "MIN_BLOCK_ROWS", 8)
    x = torch.zeros(5, TOKENS, 11)
    blocks = MergeBlocks(
        x, torch.zeros(5, NUM_EXPERTS), torch.zeros(37, 11), torch.zeros(NUM_EXPERTS, 37, 11)
    )
    rows = [stop - start for start, stop in blocks.row_ranges()]
    groups = [last - first for first, last in blocks.sample_ranges()]
    assert rows == [8, 8, 8, 8, 5] and groups == [2, 2, 1] and not blocks.direct
    monkeypatch.setattr(ops, "MERGE_BLOCK_ELEMENTS", 1 << 30)
    blocks = MergeBlocks(
        x, torch.zeros(5, NUM_EXPERTS), torch.zeros(37, 11), torch.zeros(NUM_EXPERTS, 37, 11)
    )
    assert blocks.direct and blocks.rows == 37 and blocks.group == 5
    # Low-precision storage always goes through the (converting) staged copy.
    blocks = MergeBlocks(
        x, torch.zeros(5, NUM_EXPERTS), torch.zeros(37, 11), torch.zeros(NUM_EXPERTS, 37, 11).bfloat16()
    )
    assert not blocks.direct


@pytest.mark.parametrize("batch", [1, 5, 40])
def test_per_sample_linear_gradients_for_every_input(blocking, batch):
    inputs = make_inputs(batch, 37, 11, seed=1)
    leaves = {name: tensor.clone().requires_grad_(True) for name, tensor in inputs.items()}
    reference = {name: tensor.double().clone().requires_grad_(True) for name, tensor in inputs.items()}
    upstream = torch.randn(batch, TOKENS, 37, generator=torch.Generator().manual_seed(2))

    got = torch.autograd.grad((run_kernel(leaves) * upstream).sum(), [leaves[n] for n in ORDER])
    want = torch.autograd.grad(
        (reference_linear(**reference) * upstream.double()).sum(), [reference[n] for n in ORDER]
    )
    for name, g, w in zip(ORDER, got, want):
        assert g.dtype == inputs[name].dtype, name
        torch.testing.assert_close(g, w.float(), atol=1e-4, rtol=1e-5, msg=name)


def test_gradients_only_for_what_requires_them(blocking):
    """Router training: only x and routing need gradients; frozen tensors get none."""
    inputs = make_inputs(5, 37, 11, seed=3)
    x = inputs["x"].clone().requires_grad_(True)
    routing = inputs["routing"].clone().requires_grad_(True)
    output = PerSampleLinear.apply(x, routing, *(inputs[n] for n in ORDER[2:]))
    output.sum().backward()
    reference = {name: tensor.double() for name, tensor in inputs.items()}
    reference["x"] = reference["x"].requires_grad_(True)
    reference["routing"] = reference["routing"].requires_grad_(True)
    reference_linear(**reference).sum().backward()
    torch.testing.assert_close(x.grad, reference["x"].grad.float(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(routing.grad, reference["routing"].grad.float(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("delta_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_task_vectors_merge_in_float32(blocking, delta_dtype):
    inputs = make_inputs(5, 37, 11, seed=4, delta_dtype=delta_dtype)
    # The reference uses exactly the stored (rounded) values, upcast: results agree to float32 precision,
    # which they would not if merging or routing ran in the storage dtype.
    torch.testing.assert_close(run_kernel(inputs), reference_linear(**inputs).float(), atol=1e-5, rtol=1e-5)
    routing = inputs["routing"].clone().requires_grad_(True)
    output = PerSampleLinear.apply(inputs["x"], routing, *(inputs[n] for n in ORDER[2:]))
    (grad,) = torch.autograd.grad(output.sum(), routing)
    assert grad.dtype == torch.float32
    reference = {name: tensor.double() for name, tensor in inputs.items()}
    reference["routing"].requires_grad_(True)
    (want,) = torch.autograd.grad(reference_linear(**reference).sum(), reference["routing"])
    torch.testing.assert_close(grad, want.float(), atol=1e-4, rtol=1e-5)


def test_activation_inside_the_layer_is_recomputed_in_backward(blocking):
    """`activation=` computes the layer on activation(x), saves only x, and chains gradients through it."""
    activation = torch.nn.GELU()
    inputs = make_inputs(5, 11, 37, seed=14)
    leaves = {name: tensor.clone().requires_grad_(True) for name, tensor in inputs.items()}
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = PerSampleLinear.apply(*(leaves[n] for n in ORDER), activation)
    # Only the inputs themselves are saved: no activation output, no merged weights.
    assert saved and all(any(t is leaf for leaf in leaves.values()) for t in saved)
    reference = {name: tensor.double().clone().requires_grad_(True) for name, tensor in inputs.items()}
    want_output = reference_linear(activation(reference["x"]), *(reference[n] for n in ORDER[1:]))
    torch.testing.assert_close(output, want_output.float(), atol=1e-5, rtol=1e-5)
    upstream = torch.randn(output.shape, generator=torch.Generator().manual_seed(15))
    got = torch.autograd.grad((output * upstream).sum(), [leaves[n] for n in ORDER])
    want = torch.autograd.grad((want_output * upstream.double()).sum(), [reference[n] for n in ORDER])
    for name, g, w in zip(ORDER, got, want):
        torch.testing.assert_close(g, w.float(), atol=1e-4, rtol=1e-5, msg=name)


def test_low_precision_activations(blocking):
    """A bfloat16 model: merged weights are accumulated in float32, then used in bfloat16."""
    inputs = make_inputs(5, 37, 11, seed=5, x_dtype=torch.bfloat16, delta_dtype=torch.bfloat16)
    output = run_kernel(inputs)
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), reference_linear(**inputs).float(), atol=0.05, rtol=0.02)


def test_non_contiguous_inputs(blocking):
    inputs = make_inputs(6, 37, 11, seed=6)
    wide = torch.randn(TOKENS, 12, 22, generator=torch.Generator().manual_seed(7))
    inputs["x"] = wide.transpose(0, 1)[::2, :, ::2]  # (6, TOKENS, 11), no unit stride anywhere
    inputs["routing"] = torch.randn(NUM_EXPERTS, 6, generator=torch.Generator().manual_seed(8)).t()
    assert not inputs["x"].is_contiguous() and not inputs["routing"].is_contiguous()
    torch.testing.assert_close(run_kernel(inputs), reference_linear(**inputs).float(), atol=1e-5, rtol=1e-5)
    x = inputs["x"].clone().requires_grad_(True)
    upstream = torch.randn(12, TOKENS, 37).transpose(0, 1)[:, ::2].transpose(0, 1)  # non-contiguous grad
    (grad,) = torch.autograd.grad(
        (PerSampleLinear.apply(x, *(inputs[n] for n in ORDER[1:])) * upstream).sum(), x
    )
    reference = {name: tensor.double() for name, tensor in inputs.items()}
    reference["x"] = reference["x"].requires_grad_(True)
    (want,) = torch.autograd.grad((reference_linear(**reference) * upstream.double()).sum(), reference["x"])
    torch.testing.assert_close(grad, want.float(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("delta_dtype", [torch.float32, torch.bfloat16])
def test_merged_weight_of_one_routing_vector(monkeypatch, delta_dtype):
    """The merge behind `merged_mlp_state` and `collapse`, with block-wise conversion of low-precision storage."""
    monkeypatch.setattr(ops, "MERGE_BLOCK_ELEMENTS", 3 * 11)  # 3 rows per conversion block
    inputs = make_inputs(1, 37, 11, seed=9, delta_dtype=delta_dtype)
    routing = inputs["routing"].clone().requires_grad_(True)
    weight = inputs["weight"].clone().requires_grad_(True)
    deltas = inputs["deltas"].clone().requires_grad_(True)
    merged = MergedWeight.apply(routing, weight, deltas)
    ref_routing, ref_weight, ref_deltas = (
        t.double().detach().requires_grad_(True) for t in (routing, weight, deltas)
    )
    reference = ref_weight + torch.einsum("k,koi->oi", ref_routing[0], ref_deltas)
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, reference.float(), atol=1e-6, rtol=1e-6)
    upstream = torch.randn(37, 11, generator=torch.Generator().manual_seed(10))
    got = torch.autograd.grad((merged * upstream).sum(), [routing, weight, deltas])
    want = torch.autograd.grad((reference * upstream.double()).sum(), [ref_routing, ref_weight, ref_deltas])
    for g, w, t in zip(got, want, (routing, weight, deltas)):
        assert g.dtype == t.dtype
        torch.testing.assert_close(
            g.float(), w.float(), atol=1e-4 if g.dtype == torch.float32 else 2e-2, rtol=1e-3
        )


def test_batch_routing_keeps_no_float32_copy_of_low_precision_task_vectors():
    """With bfloat16 storage, nothing of the task vectors' size is saved for backward in float32."""
    base, experts = make_base_and_experts(num_experts=NUM_EXPERTS, seed=0)
    model = build_wemoe(base, experts, routing="batch", task_vector_dtype="bfloat16")
    task_vector_numel = NUM_EXPERTS * 64 * 32
    saved = []

    def pack(tensor):
        saved.append((tensor.numel(), tensor.dtype))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(2, 3, 32, 32)).pooler_output.sum().backward()
    assert not [s for s in saved if s[0] >= task_vector_numel and s[1] == torch.float32]
    assert any(s[0] >= task_vector_numel and s[1] == torch.bfloat16 for s in saved)


@pytest.fixture(scope="module")
def tiny_zoo():
    return make_base_and_experts(num_experts=NUM_EXPERTS, seed=0)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(dict(), id="dense"),
        pytest.param(dict(sparsity=0.6, shared_router=True), id="sparse"),
        pytest.param(dict(task_vector_dtype="bfloat16"), id="bf16-storage"),
        pytest.param(dict(routing="batch", task_vector_dtype="float16"), id="batch-fp16-storage"),
    ],
)
def test_whole_model_with_small_blocks_matches_reference(tiny_zoo, blocking, options):
    """The full model, with blocks that split its layers unevenly, against the per-sample model reference."""
    model = build_wemoe(*tiny_zoo, **options)
    randomize_routers(model)
    pixel_values = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    outputs = model(pixel_values)
    ref_pooled, _, _ = reference_forward(model, pixel_values)
    torch.testing.assert_close(outputs.pooler_output, ref_pooled, atol=1e-5, rtol=1e-5)
    upstream = torch.randn(ref_pooled.shape, generator=torch.Generator().manual_seed(12))
    routers = model.router_parameters()
    got = torch.autograd.grad((outputs.pooler_output * upstream).sum(), routers)
    want = torch.autograd.grad((ref_pooled * upstream).sum(), routers)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_large_batch_model_matches_reference(tiny_zoo):
    """A batch large enough for the staged merge and several sample groups at the default block budget."""
    model = build_wemoe(*tiny_zoo)
    randomize_routers(model)
    pixel_values = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(13))
    ref_pooled, _, _ = reference_forward(model, pixel_values)
    torch.testing.assert_close(model(pixel_values).pooler_output, ref_pooled, atol=1e-5, rtol=1e-5)


def test_sparse_cache_filled_in_inference_mode_serves_training(tiny_zoo):
    model = build_wemoe(*tiny_zoo, sparsity=0.5)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        evaluated = model(pixel_values).pooler_output
    trained = model(pixel_values).pooler_output
    trained.sum().backward()
    torch.testing.assert_close(trained.detach(), evaluated, atol=0, rtol=0)
    assert all(p.grad is not None for p in model.router_parameters())


def test_backward_saves_no_merged_weights_with_many_blocks(tiny_zoo, monkeypatch):
    """Per-sample router training with many small blocks keeps nothing of size batch x weight."""
    monkeypatch.setattr(ops, "MERGE_BLOCK_ELEMENTS", 2048)
    monkeypatch.setattr(ops, "MIN_BLOCK_ROWS", 1)
    model = build_wemoe(*tiny_zoo)
    batch = 32
    saved = saved_tensor_sizes(model, torch.randn(batch, 3, 32, 32))
    assert max(saved) <= batch * 17 * 64 < batch * 64 * 32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tiny_zoo):
    model = build_wemoe(*tiny_zoo, task_vector_dtype="bfloat16")
    randomize_routers(model)
    pixel_values = torch.randn(6, 3, 32, 32)
    want = model(pixel_values).pooler_output
    got = model.to("cuda")(pixel_values.to("cuda")).pooler_output
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
