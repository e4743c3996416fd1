"""Low-rank task vectors: the factorisation, the storage, the two-GEMM routed linear, the merge and saved folders."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel

from hf_wemoe import WEMoECLIPVisionConfig, WEMoECLIPVisionModel, build_wemoe
from hf_wemoe.errors import IncompatibleModelsError, WEMoEError
from hf_wemoe.merging.wemoe import load_upscaled_tensor, upscale_tensors, wemoe_config
from hf_wemoe.models.modeling_wemoe import WEMoETaskVectors
from hf_wemoe.models.wemoe_ops import low_rank_factors, low_rank_linear
from isolation import WITHOUT_PACKAGE
from reference import reference_forward, saved_tensor_sizes
from tiny_models import make_base_and_experts, randomize_routers

RANK = 4


@pytest.fixture(scope="module")
def tiny_zoo():
    return make_base_and_experts(num_experts=3, seed=0)


def random_rank(out_features: int, in_features: int, rank: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, rank, generator=generator) @ torch.randn(rank, in_features, generator=generator)


# ----------------------------------------------------------------------------------------------------------------
# low_rank_factors: the truncated SVD of one task vector.


@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (30, 30)], ids=["tall", "wide", "square"])
def test_factors_reproduce_a_matrix_of_that_rank(shape):
    delta = random_rank(*shape, rank=5, seed=1)
    for rank in (5, 7):
        a, b, energy = low_rank_factors(delta, rank)
        assert a.shape == (rank, shape[1]) and b.shape == (shape[0], rank) and a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(b @ a, delta, atol=1e-5, rtol=1e-5)
        assert energy == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("shape", [(48, 20), (20, 48)], ids=["tall", "wide"])
def test_factors_are_the_truncated_svd_and_b_carries_the_singular_values(shape):
    delta = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)
    a, b, energy = low_rank_factors(delta, 6)
    assert a.dtype == torch.float64
    # Eckart-Young: the best rank-6 approximation, whatever the singular vectors' signs.
    torch.testing.assert_close(b @ a, u[:, :6] @ torch.diag(sigma[:6]) @ vh[:6], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(a @ a.T, torch.eye(6, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(b.norm(dim=0), sigma[:6], atol=1e-10, rtol=1e-10)
    assert energy == pytest.approx(float(sigma[:6].square().sum() / sigma.square().sum()), abs=1e-12)
    residual = (delta - b @ a).square().sum() / delta.square().sum()
    assert energy == pytest.approx(1.0 - float(residual), abs=1e-12)


def test_factors_of_a_zero_tensor_and_of_low_precision_inputs():
    a, b, energy = low_rank_factors(torch.zeros(12, 9), 3)
    assert energy == 1.0 and torch.equal(b @ a, torch.zeros(12, 9))
    a, b, energy = low_rank_factors(torch.zeros(9, 12), 3)
    assert energy == 1.0 and torch.equal(b @ a, torch.zeros(9, 12))
    # A bf16 input is factorised like its float32 value (in float64), and gives float32 factors.
    delta = torch.randn(16, 24, generator=torch.Generator().manual_seed(3)).bfloat16()
    a, b, energy = low_rank_factors(delta, 2)
    a32, b32, energy32 = low_rank_factors(delta.float(), 2)
    assert a.dtype == b.dtype == torch.float32 and energy == energy32
    assert torch.equal(a, a32) and torch.equal(b, b32)


@pytest.mark.parametrize("rank", [0, -1, 13, 2.5, True])
def test_factors_refuse_bad_ranks(rank):
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 12\]"):
        low_rank_factors(torch.randn(12, 20), rank)


# ----------------------------------------------------------------------------------------------------------------
# Config: rank is one storage mode, bounded by every routed weight.


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(rank=2, sparsity=0.5), "rank and sparsity are two storage modes; use one"),
        (dict(rank=33), r"rank must be at most min\(out, in\) = 32 of routed module fc1 \(64, 32\), got 33"),
        (dict(rank=17, moe_modules=["q_proj"], hidden_size=16), "at most .* = 16 of routed module q_proj"),
        (dict(rank=0), "rank must be a positive integer or null"),
        (dict(rank=-3), "rank must be a positive integer or null"),
        (dict(rank="8"), "rank must be a positive integer or null"),
    ],
)
def test_bad_rank_is_refused_naming_the_field(options, message):
    fields = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, expert_names=["a"])
    with pytest.raises(ValueError, match=message):
        WEMoECLIPVisionConfig(**{**fields, **options})


def test_build_refuses_a_bad_rank_as_a_user_error(tiny_zoo):
    with pytest.raises(WEMoEError, match="rank and sparsity"):
        build_wemoe(*tiny_zoo, rank=4, sparsity=0.9)


# ----------------------------------------------------------------------------------------------------------------
# The routed linear over factors: two GEMMs, against a float64 loop over samples.


def test_low_rank_linear_matches_merged_weights_per_sample():
    generator = torch.Generator().manual_seed(5)
    batch, tokens, out_features, in_features, experts, rank = 5, 4, 13, 9, 3, 2
    x = torch.randn(batch, tokens, in_features, generator=generator, requires_grad=True)
    routing = torch.randn(batch, experts, generator=generator, requires_grad=True)
    weight, bias = torch.randn(out_features, in_features, generator=generator), torch.randn(out_features)
    a = torch.randn(experts, rank, in_features, generator=generator).bfloat16()
    b = torch.randn(experts, out_features, rank, generator=generator).bfloat16()
    bias_deltas = torch.randn(experts, out_features, generator=generator)
    output = low_rank_linear(x, routing, weight, bias, a, b, bias_deltas)

    x64, routing64 = x.detach().double().requires_grad_(True), routing.detach().double().requires_grad_(True)
    deltas = torch.bmm(b.double(), a.double())
    want = torch.stack(
        [
            x64[i] @ (weight.double() + torch.einsum("k,koi->oi", routing64[i], deltas)).T
            + bias.double()
            + routing64[i] @ bias_deltas.double()
            for i in range(batch)
        ]
    )
    # bf16 factors are used exactly (upcast to the activations' float32).
    torch.testing.assert_close(output, want.float(), atol=1e-5, rtol=1e-5)
    upstream = torch.randn(output.shape, generator=generator)
    got = torch.autograd.grad((output * upstream).sum(), [x, routing])
    expected = torch.autograd.grad((want * upstream.double()).sum(), [x64, routing64])
    for g, w in zip(got, expected):
        torch.testing.assert_close(g, w.float(), atol=1e-5, rtol=1e-5)

    # One routing vector (1, K) serves the whole batch.
    shared = low_rank_linear(x, routing[:1], weight, bias, a, b, bias_deltas)
    expanded = low_rank_linear(x, routing[:1].expand(batch, -1), weight, bias, a, b, bias_deltas)
    torch.testing.assert_close(shared, expanded, atol=1e-6, rtol=1e-6)


def test_low_rank_backward_keeps_no_per_sample_weights(tiny_zoo):
    model = build_wemoe(*tiny_zoo, rank=RANK)
    batch = 64
    saved = saved_tensor_sizes(model, torch.randn(batch, 3, 32, 32))
    assert max(saved) <= batch * 17 * 64  # the widest activation (batch, tokens, intermediate)
    assert batch * 17 * 64 < batch * 64 * 32  # which is below one merged weight per sample


# ----------------------------------------------------------------------------------------------------------------
# Storage: set factorises, set_factors stores exact factors, dense() is B @ A.


def _task_vectors(rank: int | None = 3) -> WEMoETaskVectors:
    config = WEMoECLIPVisionConfig(
        hidden_size=16, intermediate_size=24, num_attention_heads=4, expert_names=["a", "b"], rank=rank
    )
    return WEMoETaskVectors(config)


def test_set_factorises_every_expert_and_returns_kept_energies():
    module = _task_vectors()
    assert module.fc1_weight_A.shape == (2, 3, 16) and module.fc1_weight_B.shape == (2, 24, 3)
    assert not hasattr(module, "fc1_weight") and module.fc1_bias.shape == (2, 24)
    tau = torch.randn(2, 24, 16, generator=torch.Generator().manual_seed(6))
    energies = module.set("fc1_weight", tau)
    for k in range(2):
        a, b, energy = low_rank_factors(tau[k], 3)
        assert energies[k] == energy and 0 < energy < 1
        assert torch.equal(module.fc1_weight_A[k], a) and torch.equal(module.fc1_weight_B[k], b)
    torch.testing.assert_close(module.dense("fc1_weight"), torch.bmm(module.fc1_weight_B, module.fc1_weight_A))
    bias = torch.randn(2, 24)
    assert module.set("fc1_bias", bias) is None and torch.equal(module.dense("fc1_bias"), bias)
    assert _task_vectors(rank=None).set("fc1_weight", tau) is None


def test_set_factors_pads_smaller_ranks_and_refuses_larger_ones():
    module = _task_vectors()
    generator = torch.Generator().manual_seed(7)
    a, b = torch.randn(2, 2, 24, generator=generator), torch.randn(2, 16, 2, generator=generator)
    module.set_factors("fc2_weight", a, b)
    assert torch.equal(module.fc2_weight_A[:, :2], a) and not module.fc2_weight_A[:, 2:].any()
    assert torch.equal(module.fc2_weight_B[:, :, :2], b) and not module.fc2_weight_B[:, :, 2:].any()
    torch.testing.assert_close(module.dense("fc2_weight"), torch.bmm(b, a))
    with pytest.raises(ValueError, match=r"'task_vectors\.fc2_weight': factors of rank 4 do not fit the stored rank 3"):
        module.set_factors("fc2_weight", torch.zeros(2, 4, 24), torch.zeros(2, 16, 4))
    with pytest.raises(ValueError, match=r"must have shapes \(K, r, 24\) and \(K, 16, r\)"):
        module.set_factors("fc2_weight", torch.zeros(2, 2, 16), torch.zeros(2, 24, 2))
    with pytest.raises(ValueError, match="is not stored as low-rank factors"):
        _task_vectors(rank=None).set_factors("fc2_weight", a, b)
    with pytest.raises(ValueError, match="is not a stored task-vector tensor"):
        module.set("q_proj_weight", torch.zeros(2, 16, 16))


# ----------------------------------------------------------------------------------------------------------------
# The merge: factors per expert, an exact-factors hook, kept energies.


def test_upscale_yields_factors_and_energies(tiny_zoo):
    base, experts = tiny_zoo
    config = wemoe_config(base.config, list(experts), rank=RANK, moe_layers=[1])
    state = base.state_dict()
    getters = {name: expert.state_dict().__getitem__ for name, expert in experts.items()}
    energies: dict[str, list[float]] = {}
    out = dict(upscale_tensors(config, list(state), state.__getitem__, getters, energies=energies))
    prefix = "encoder.layers.1.mlp.task_vectors."
    assert out[prefix + "fc1_weight_A"].shape == (3, RANK, 32) and out[prefix + "fc1_weight_B"].shape == (3, 64, RANK)
    assert out[prefix + "fc2_bias"].shape == (3, 32) and prefix + "fc1_weight" not in out
    assert sorted(energies) == ["encoder.layers.1.mlp.fc1.weight", "encoder.layers.1.mlp.fc2.weight"]
    key = "encoder.layers.1.mlp.fc2.weight"
    for k, expert in enumerate(experts.values()):
        tau = expert.state_dict()[key] - state[key]
        approx = out[prefix + "fc2_weight_B"][k] @ out[prefix + "fc2_weight_A"][k]
        lost = float((tau - approx).square().sum() / tau.square().sum())
        assert energies[key][k] == pytest.approx(1.0 - lost, abs=1e-5) and 0 < energies[key][k] < 1


def test_expert_factors_are_stored_as_given(tiny_zoo):
    """A hook's exact factors replace both the SVD and the expert's tensor (which is never read)."""
    base, experts = tiny_zoo
    key = "encoder.layers.0.mlp.fc1.weight"
    generator = torch.Generator().manual_seed(8)
    lora_a, lora_b = torch.randn(2, 32, generator=generator), torch.randn(64, 2, generator=generator)
    state = base.state_dict()

    def getter(name):
        expert_state = experts[name].state_dict()

        def get(tensor_key):
            assert not (name == "task1" and tensor_key == key), "the hook's expert was read"
            return expert_state[tensor_key]

        return get

    getters = {name: getter(name) for name in experts}
    hooks = {"task1": lambda tensor_key: (lora_a, lora_b) if tensor_key == key else None}
    for rank in (RANK, None):
        config = wemoe_config(base.config, list(experts), rank=rank)
        model = WEMoECLIPVisionModel(config)
        energies: dict[str, list[float]] = {}
        for name, tensor in upscale_tensors(config, list(state), state.__getitem__, getters, hooks, energies):
            load_upscaled_tensor(model, name, tensor)
        task_vectors = model.encoder.layers[0].mlp.task_vectors
        if rank is not None:
            assert torch.equal(task_vectors.fc1_weight_A[1, :2], lora_a) and not task_vectors.fc1_weight_A[1, 2:].any()
            assert torch.equal(task_vectors.fc1_weight_B[1, :, :2], lora_b)
            assert energies[key][1] == 1.0 and energies[key][0] < 1.0
        else:
            assert not energies
        torch.testing.assert_close(task_vectors.dense("fc1_weight")[1], lora_b @ lora_a, atol=1e-5, rtol=1e-5)

    config = wemoe_config(base.config, list(experts), rank=1)
    with pytest.raises(WEMoEError, match=r"expert 'task1' tensor '.*fc1.weight': factors of rank 2 do not fit"):
        list(upscale_tensors(config, [key], state.__getitem__, getters, hooks))
    bad = {"task1": lambda tensor_key: (lora_b, lora_a)}
    with pytest.raises(IncompatibleModelsError, match=r"expert 'task1' gives factors of shapes \(64, 2\)"):
        list(upscale_tensors(config, [key], state.__getitem__, getters, bad))


# ----------------------------------------------------------------------------------------------------------------
# The model: collapse, saved folders, remote code, bf16 storage.


def test_collapse_of_a_low_rank_model(tiny_zoo):
    base, experts = tiny_zoo
    model = build_wemoe(base, experts, rank=RANK, moe_layers=[0, 2])
    randomize_routers(model)
    one_hot = torch.tensor([0.0, 1.0, 0.0])
    static = model.collapse(one_hot)
    static_state = static.state_dict()
    for index in (0, 2):
        for module in ("fc1", "fc2"):
            key = f"encoder.layers.{index}.mlp.{module}.weight"
            a, b = model.encoder.layers[index].mlp.task_vectors.factors(f"{module}_weight")
            torch.testing.assert_close(static_state[key], base.state_dict()[key] + b[1] @ a[1], atol=1e-6, rtol=0)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    routing = torch.randn(2, 3, generator=torch.Generator().manual_seed(10))
    forced = model(x, force_routing=routing).pooler_output
    torch.testing.assert_close(model.collapse(routing)(x).pooler_output, forced, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference_forward(model, x, force=routing)[0], forced, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_and_load_a_low_rank_folder(tiny_zoo, tmp_path, dtype):
    model = build_wemoe(*tiny_zoo, rank=RANK, task_vector_dtype=dtype, moe_modules=["v_proj", "fc1", "fc2"])
    randomize_routers(model)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        a = f.get_tensor("encoder.layers.0.self_attn.task_vectors.v_proj_weight_A")
        b = f.get_tensor("encoder.layers.2.mlp.task_vectors.fc2_weight_B")
        bias = f.get_tensor("encoder.layers.2.mlp.task_vectors.fc2_bias")
        keys = set(f.keys())
    assert a.shape == (3, RANK, 32) and b.shape == (3, 32, RANK) and bias.shape == (3, 32)
    assert a.dtype == b.dtype == bias.dtype == getattr(torch, dtype)
    assert not any(k.endswith(("fc1_weight", "v_proj_weight")) for k in keys)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert loaded.config.rank == RANK and loaded.config.moe_modules == ["v_proj", "fc1", "fc2"]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    want = model(x, output_routing_weights=True)
    got = loaded(x, output_routing_weights=True)
    assert torch.equal(got.pooler_output, want.pooler_output)
    # bf16 factors are used exactly as stored: the model agrees with the float32 reference on them.
    torch.testing.assert_close(got.pooler_output, reference_forward(loaded, x)[0], atol=1e-5, rtol=1e-5)
    # bf16 activations with factors kept in their storage dtype.
    half = loaded.to(torch.bfloat16)
    assert half.encoder.layers[0].self_attn.task_vectors.v_proj_weight_A.dtype == getattr(torch, dtype)
    torch.testing.assert_close(half(x.bfloat16()).pooler_output.float(), want.pooler_output, atol=0.1, rtol=0.05)


def test_remote_code_loads_a_low_rank_folder_without_the_package(tiny_zoo, tmp_path):
    model = build_wemoe(*tiny_zoo, rank=RANK, moe_modules=["q_proj", "fc2"], shared_router=True)
    randomize_routers(model)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save({"x": x, "y": model(x).pooler_output}, tmp_path / "io.pt")
    script = WITHOUT_PACKAGE + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModel

        torch.set_num_threads({torch.get_num_threads()})  # the same reductions as the parent process
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert model.config.rank == {RANK} and model.config.moe_modules == ["q_proj", "fc2"]
        io = torch.load({str(tmp_path / "io.pt")!r})
        assert torch.equal(model(io["x"]).pooler_output, io["y"]), "outputs differ"
        print("REMOTE-OK", type(model).__name__)
        """
    )
    env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE-OK WEMoECLIPVisionModel" in result.stdout
