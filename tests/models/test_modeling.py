"""WEMoE model semantics against an independent per-sample reference, save/load and collapse."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModel, CLIPVisionModel

import hf_wemoe
from hf_wemoe import (
    WEMoECLIPVisionConfig,
    WEMoECLIPVisionModelWithProjection,
    build_wemoe,
)
from hf_wemoe.errors import IncompatibleModelsError, WEMoEError
from hf_wemoe.models.modeling_wemoe import is_router_parameter
from hf_wemoe.models.wemoe_ops import num_kept_entries
from isolation import WITHOUT_PACKAGE
from reference import reference_forward, saved_tensor_sizes, stored_positions
from tiny_models import make_base_and_experts, randomize_routers

# The reference (tests/support/reference.py): a Python loop over samples that builds W0 + sum_k r_k tau_k and runs
# a plain CLIPMLP.


VARIANTS = [
    pytest.param(dict(router_depth=2), id="depth2"),
    pytest.param(dict(router_depth=1), id="depth1"),
    pytest.param(dict(router_depth=0), id="depth0"),
    pytest.param(dict(shared_router=True), id="shared"),
    pytest.param(dict(sparsity=0.7), id="sparse"),
    pytest.param(dict(shared_router=True, sparsity=0.9), id="e-wemoe"),
    pytest.param(dict(routing="batch"), id="batch"),
    pytest.param(dict(routing="batch", sparsity=0.5, router_depth=1), id="batch-sparse"),
    pytest.param(dict(moe_layers=[0, 2]), id="moe-layers"),
]


@pytest.fixture(scope="module")
def tiny_zoo():
    return make_base_and_experts(num_experts=3, seed=0)


@pytest.mark.parametrize("options", VARIANTS)
def test_forward_and_router_gradients_match_reference(tiny_zoo, options):
    base, experts = tiny_zoo
    model = build_wemoe(base, experts, **options)
    randomize_routers(model)
    pixel_values = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))

    outputs = model(pixel_values, output_routing_weights=True)
    ref_pooled, ref_hidden, ref_routing = reference_forward(model, pixel_values)
    torch.testing.assert_close(outputs.pooler_output, ref_pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs.last_hidden_state, ref_hidden, atol=1e-5, rtol=1e-5)
    assert len(outputs.routing_weights) == len(model.moe_layers)
    for got, want in zip(outputs.routing_weights, ref_routing):
        assert got.shape == (5, 3)
        if options.get("routing") != "batch":
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    # Router gradients of an arbitrary scalar function of the outputs.
    weights = torch.randn(ref_pooled.shape, generator=torch.Generator().manual_seed(4))
    routers = model.router_parameters()
    assert routers and all(p.requires_grad for p in routers)
    got = torch.autograd.grad((outputs.pooler_output * weights).sum(), routers)
    want = torch.autograd.grad((ref_pooled * weights).sum(), routers)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
        assert g.abs().sum() > 0


def test_only_router_parameters_require_gradients(tiny_zoo, tmp_path):
    model = build_wemoe(*tiny_zoo)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_router_parameter(name) for name in trainable)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert {name for name, p in loaded.named_parameters() if p.requires_grad} == trainable


def test_fresh_routers_route_every_expert_with_lambda(tiny_zoo):
    model = build_wemoe(*tiny_zoo, scaling=0.3)
    out = model(torch.randn(2, 3, 32, 32), output_routing_weights=True)
    for routing in out.routing_weights:
        torch.testing.assert_close(routing, torch.full_like(routing, 0.3), atol=0.02, rtol=0)


def test_non_mlp_weights_are_task_arithmetic_and_mlps_keep_pretrained(tiny_zoo):
    base, experts = tiny_zoo
    model = build_wemoe(base, experts, scaling=0.25, moe_layers=[1])
    state, base_state = model.state_dict(), base.state_dict()
    for key, theta0 in base_state.items():
        expected_ta = theta0 + 0.25 * sum(e.state_dict()[key] - theta0 for e in experts.values())
        if key.startswith("encoder.layers.1.mlp."):
            torch.testing.assert_close(state[key], theta0, atol=0, rtol=0)
        else:  # attention, norms, embeddings and the MLPs of the static layers 0 and 2
            torch.testing.assert_close(state[key], expected_ta, atol=1e-6, rtol=1e-6)
    tv = state["encoder.layers.1.mlp.task_vectors.fc2_weight"]
    for k, expert in enumerate(experts.values()):
        torch.testing.assert_close(
            tv[k],
            expert.state_dict()["encoder.layers.1.mlp.fc2.weight"]
            - base_state["encoder.layers.1.mlp.fc2.weight"],
        )


def test_sparse_task_vectors_keep_top_magnitudes_and_are_stored_sparsely(tiny_zoo, tmp_path):
    base, experts = tiny_zoo
    model = build_wemoe(base, experts, sparsity=0.9, task_vector_dtype="bfloat16")
    state = model.state_dict()
    indices = stored_positions(state, "encoder.layers.0.mlp.task_vectors.fc1_weight")
    values = state["encoder.layers.0.mlp.task_vectors.fc1_weight_values"]
    numel = 64 * 32
    assert indices.shape == values.shape == (3, num_kept_entries(numel, 0.9)) == (3, 205)
    assert values.dtype == torch.bfloat16 and "encoder.layers.0.mlp.task_vectors.fc1_weight" not in state
    assert state["encoder.layers.0.mlp.task_vectors.fc1_weight_block_counts"].shape == (3, 1)
    tau = (
        experts["task1"].state_dict()["encoder.layers.0.mlp.fc1.weight"]
        - base.state_dict()["encoder.layers.0.mlp.fc1.weight"]
    ).flatten()
    threshold = tau.abs().sort(descending=True).values[204]
    kept = set(indices[1].tolist())
    assert kept == {i for i in range(numel) if tau[i].abs() >= threshold}
    torch.testing.assert_close(values[1].float(), tau[indices[1].long()].bfloat16().float())
    # Plain from_pretrained loads the sparse layout (shapes fixed by the config).
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x).pooler_output, model(x).pooler_output, atol=0, rtol=0)


def test_num_kept_entries_rounds_up_without_float_noise():
    assert num_kept_entries(10, 0.7) == 3
    assert num_kept_entries(1000, 0.9) == 100
    assert num_kept_entries(7, 0.5) == 4
    assert num_kept_entries(3, 0.99) == 1


@pytest.mark.parametrize("shared_router", [False, True], ids=["own-routers", "shared-router"])
@pytest.mark.parametrize("routing", [[0.0, 1.0, 0.0], "per-layer"])
def test_collapse_matches_forced_routing(tiny_zoo, routing, shared_router):
    # The shared router is E-WEMoE's: its oracle bound is a collapse of a shared-router, sparse model.
    base, experts = tiny_zoo
    model = build_wemoe(base, experts, sparsity=0.5, shared_router=shared_router)
    if routing == "per-layer":
        routing = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    else:
        routing = torch.tensor(routing)
    static = model.collapse(routing)
    assert type(static) is CLIPVisionModel
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(
        static(x).pooler_output, model(x, force_routing=routing).pooler_output, atol=1e-5, rtol=1e-5
    )
    ref_pooled, _, _ = reference_forward(model, x, force=routing)
    torch.testing.assert_close(static(x).pooler_output, ref_pooled, atol=1e-5, rtol=1e-5)


def test_collapse_one_hot_reproduces_expert_mlp(tiny_zoo):
    base, experts = tiny_zoo
    model = build_wemoe(base, experts)
    static = model.collapse(torch.tensor([0.0, 0.0, 1.0]))
    expert_state, static_state = experts["task2"].state_dict(), static.state_dict()
    for key, value in static_state.items():
        if ".mlp." in key:
            torch.testing.assert_close(value, expert_state[key], atol=1e-6, rtol=0)


def test_force_routing_shape_is_checked(tiny_zoo):
    model = build_wemoe(*tiny_zoo)
    with pytest.raises(ValueError, match=r"shape \(3,\) or \(3, 3\)"):
        model(torch.randn(1, 3, 32, 32), force_routing=torch.ones(2))


def test_outputs_match_clip_vision_model_interface(tiny_zoo):
    base, experts = tiny_zoo
    model = build_wemoe(base, experts)
    x = torch.randn(2, 3, 32, 32)
    out = model(x, output_hidden_states=True)
    ref = base(x, output_hidden_states=True)
    assert out.last_hidden_state.shape == ref.last_hidden_state.shape
    assert out.pooler_output.shape == ref.pooler_output.shape
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    assert out.routing_weights is None
    as_tuple = model(x, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.last_hidden_state)


def test_with_projection_adds_image_embeds(tiny_zoo):
    base, experts = tiny_zoo
    wemoe = build_wemoe(base, experts)
    model = WEMoECLIPVisionModelWithProjection(wemoe.config)
    model.vision_model.load_state_dict(wemoe.state_dict())
    x = torch.randn(2, 3, 32, 32)
    out = model(x, output_routing_weights=True)
    assert out.image_embeds.shape == (2, 16)
    torch.testing.assert_close(out.image_embeds, model.visual_projection(wemoe(x).pooler_output))
    static = model.collapse(torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(
        static(x).image_embeds,
        model(x, force_routing=torch.tensor([1.0, 0.0, 0.0])).image_embeds,
        atol=1e-5,
        rtol=1e-5,
    )


def test_per_sample_backward_keeps_no_per_sample_merged_weights(tiny_zoo):
    """No tensor saved for backward is as large as one merged MLP weight per sample of the batch."""
    model = build_wemoe(*tiny_zoo)
    batch = 64
    saved = saved_tensor_sizes(model, torch.randn(batch, 3, 32, 32))
    per_sample_weights = batch * 64 * 32  # one merged fc1 (or fc2) weight for every sample
    activations = batch * 17 * 64  # the widest activation: (batch, tokens, intermediate)
    assert activations < per_sample_weights
    assert max(saved) <= activations


def test_invalid_config_values_name_the_field():
    for field, value, allowed in [
        ("router_depth", 3, r"\(0, 1, 2\)"),
        ("routing", "token", "sample"),
        ("sparsity", 1.0, "0 <= s < 1"),
        ("task_vector_dtype", "int8", "bfloat16"),
        ("moe_layers", [12], "layer indices"),
    ]:
        with pytest.raises(ValueError, match=f"{field}.*{allowed}"):
            WEMoECLIPVisionConfig(num_hidden_layers=2, expert_names=["a"], **{field: value})
    with pytest.raises(ValueError, match="expert_names must be unique"):
        WEMoECLIPVisionConfig(expert_names=["a", "a"])


def test_build_rejects_bad_inputs(tiny_zoo):
    base, experts = tiny_zoo
    with pytest.raises(WEMoEError, match="no experts"):
        build_wemoe(base, {})
    odd, _ = make_base_and_experts(num_experts=0, intermediate_size=48)
    with pytest.raises(IncompatibleModelsError, match=r"encoder\.layers\.0\.mlp\.fc1\.weight"):
        build_wemoe(base, {**experts, "odd": odd})
    with pytest.raises(WEMoEError, match="unknown WEMoE option"):
        build_wemoe(base, experts, router_width=3)
    with pytest.raises(WEMoEError, match="router_depth"):
        build_wemoe(base, experts, router_depth=5)


def test_build_is_deterministic(tiny_zoo):
    a = build_wemoe(*tiny_zoo, seed=7).state_dict()
    b = build_wemoe(*tiny_zoo, seed=7).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_save_pretrained_layout_and_auto_model(tiny_zoo, tmp_path):
    model = build_wemoe(*tiny_zoo, shared_router=True)
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    model_files = {"modeling_wemoe.py", "configuration_wemoe.py", "wemoe_ops.py"}
    assert {"config.json", "model.safetensors", *model_files} <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "wemoe_clip_vision_model"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_wemoe.WEMoECLIPVisionConfig",
        "AutoModel": "modeling_wemoe.WEMoECLIPVisionModel",
    }
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert not any(k.startswith("vision_model.") for k in keys)
    assert "encoder.router.hidden.weight" in keys and "encoder.layers.0.mlp.task_vectors.fc1_weight" in keys
    # The copied model files import nothing of the package.
    for name in model_files:
        assert "hf_wemoe" not in (tmp_path / name).read_text()
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, hf_wemoe.WEMoECLIPVisionModel)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded(x).pooler_output, model(x).pooler_output, atol=0, rtol=0)


def test_remote_code_loads_without_the_package(tiny_zoo, tmp_path):
    """In a fresh process where hf_wemoe cannot be imported, trust_remote_code gives bit-identical outputs."""
    model = build_wemoe(*tiny_zoo, sparsity=0.8)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save({"x": x, "y": model(x).pooler_output}, tmp_path / "io.pt")
    script = WITHOUT_PACKAGE + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModel

        try:
            import hf_wemoe  # noqa: F401
            raise SystemExit("hf_wemoe should not be importable here")
        except ImportError:
            pass
        torch.set_num_threads({torch.get_num_threads()})  # the same reductions as the parent process
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
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
