"""Routed modules chosen by `moe_modules` (attention projections and/or MLP layers), in every storage mode, against
the independent per-sample reference (tests/support/reference.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig

from hf_wemoe import WEMoECLIPConfig, WEMoECLIPModel, WEMoECLIPVisionConfig, build_wemoe
from hf_wemoe.errors import WEMoEError
from hf_wemoe.merging.wemoe import routed_tensor
from hf_wemoe.models.modeling_wemoe import WEMoEAttention, WEMoEMLP, is_router_parameter
from reference import reference_forward
from tiny_models import make_base_and_experts, randomize_routers

MODULES = {
    "mlp": ["fc1", "fc2"],
    "fc1": ["fc1"],
    "q-v": ["q_proj", "v_proj"],
    "attention+mlp": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "out+fc2": ["out_proj", "fc2"],
}
STORAGE = {"dense": {}, "low-rank": {"rank": 3}, "sparse": {"sparsity": 0.7}}
ROUTERS = {
    "depth2": {},
    "depth1": {"router_depth": 1},
    "depth0": {"router_depth": 0},
    "shared": {"shared_router": True},
    "batch": {"routing": "batch"},
}
CASES = [
    pytest.param(modules, storage, router, id=f"{modules}-{storage}-{router}")
    for modules in MODULES
    for storage in STORAGE
    for router in ROUTERS
    # Sparse storage routes like dense storage (its own tests cover the codec): one router setting suffices.
    if storage != "sparse" or router == "depth2"
]


@pytest.fixture(scope="module")
def tiny_zoo():
    return make_base_and_experts(num_experts=3, seed=0)


def build(tiny_zoo, modules: str, storage: str = "dense", router: str = "depth2", **extra):
    options = {**STORAGE[storage], **ROUTERS[router], **extra}
    model = build_wemoe(*tiny_zoo, moe_modules=MODULES[modules], **options)
    randomize_routers(model)
    return model


@pytest.mark.parametrize(("modules", "storage", "router"), CASES)
def test_forward_and_router_gradients_match_reference(tiny_zoo, modules, storage, router):
    model = build(tiny_zoo, modules, storage, router)
    pixel_values = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    outputs = model(pixel_values, output_routing_weights=True)
    ref_pooled, ref_hidden, ref_routing = reference_forward(model, pixel_values)
    torch.testing.assert_close(outputs.pooler_output, ref_pooled, atol=1e-5, rtol=1e-5)
    # The residual stream grows to ~30 with these random routers: float32 rounding is relative to that scale
    # (the float64 test below shows that nothing else differs).
    scale = float(ref_hidden.detach().abs().max())
    torch.testing.assert_close(outputs.last_hidden_state, ref_hidden, atol=1e-5 * scale, rtol=1e-5)
    assert len(outputs.routing_weights) == 3
    if router != "batch":
        for got, want in zip(outputs.routing_weights, ref_routing):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    weights = torch.randn(ref_pooled.shape, generator=torch.Generator().manual_seed(4))
    routers = model.router_parameters()
    got = torch.autograd.grad((outputs.pooler_output * weights).sum(), routers)
    want = torch.autograd.grad((ref_pooled * weights).sum(), routers)
    for g, w in zip(got, want):
        # Relative to the gradient's scale, like the hidden states above.
        torch.testing.assert_close(g, w, atol=1e-5 * max(1.0, float(w.abs().max())), rtol=1e-4)
        assert g.abs().sum() > 0


def as_float64(model):
    """The model in float64, task vectors included (`model.double()` keeps them in their storage dtype)."""
    model = model.double()
    for module in model.routed_modules:
        buffers = module.task_vectors._buffers
        for name, buffer in buffers.items():
            if buffer.is_floating_point():
                buffers[name] = buffer.double()
    return model


@pytest.mark.parametrize("modules", list(MODULES))
@pytest.mark.parametrize("storage", list(STORAGE))
@pytest.mark.parametrize("router", ["depth2", "shared", "batch"])
def test_float64_forward_equals_reference_to_rounding(tiny_zoo, modules, storage, router):
    model = as_float64(build(tiny_zoo, modules, storage, router))
    pixel_values = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3)).double()
    outputs = model(pixel_values)
    ref_pooled, ref_hidden, _ = reference_forward(model, pixel_values)
    torch.testing.assert_close(outputs.last_hidden_state, ref_hidden, atol=1e-11, rtol=1e-11)
    routers = model.router_parameters()
    got = torch.autograd.grad(outputs.pooler_output.square().sum(), routers)
    want = torch.autograd.grad(ref_pooled.square().sum(), routers)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("modules", ["q-v", "fc1", "attention+mlp", "out+fc2"])
@pytest.mark.parametrize("storage", ["dense", "low-rank"])
def test_collapse_one_hot_is_the_expert_in_routed_modules_and_task_arithmetic_elsewhere(
    tiny_zoo, modules, storage
):
    base, experts = tiny_zoo
    model = build(tiny_zoo, modules, storage, scaling=0.25, moe_layers=[0, 2])
    static = model.collapse(torch.tensor([0.0, 0.0, 1.0]))
    routed_keys = set()
    base_state, static_state = base.state_dict(), static.state_dict()
    assert set(static_state) == set(base_state)
    for key, theta0 in base_state.items():
        taus = [expert.state_dict()[key] - theta0 for expert in experts.values()]
        routed = routed_tensor(key, MODULES[modules])
        if routed is not None and routed[0] in (0, 2):
            routed_keys.add(key)
            tau = taus[2]
            if storage == "low-rank" and key.endswith("weight"):
                a, b = getattr(model.encoder.layers[routed[0]], routed[1]).task_vectors.factors(routed[2])
                tau = b[2] @ a[2]
            torch.testing.assert_close(static_state[key], theta0 + tau, atol=1e-6, rtol=0, msg=key)
        else:
            torch.testing.assert_close(static_state[key], theta0 + 0.25 * sum(taus), atol=1e-6, rtol=1e-6, msg=key)
    assert len(routed_keys) == 2 * 2 * len(MODULES[modules])
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    routing = torch.randn(2, 3, generator=torch.Generator().manual_seed(6))
    forced = model(x, force_routing=routing).pooler_output
    torch.testing.assert_close(model.collapse(routing)(x).pooler_output, forced, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference_forward(model, x, force=routing)[0], forced, atol=1e-5, rtol=1e-5)


def test_router_lives_where_it_reads(tiny_zoo):
    model = build(tiny_zoo, "attention+mlp")
    layer = model.encoder.layers[1]
    assert isinstance(layer.self_attn, WEMoEAttention) and isinstance(layer.mlp, WEMoEMLP)
    assert layer.self_attn.router is not None and layer.mlp.router is None
    keys = set(model.state_dict())
    assert "encoder.layers.1.self_attn.router.output.weight" in keys
    assert "encoder.layers.1.self_attn.task_vectors.k_proj_weight" in keys
    assert "encoder.layers.1.mlp.task_vectors.fc2_bias" in keys
    assert not any(key.startswith("encoder.layers.1.mlp.router") for key in keys)
    assert [type(m).__name__ for m in model.routed_modules] == ["WEMoEAttention", "WEMoEMLP"] * 3
    # Only routers train, and `router_parameters` lists them all.
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.named_parameters() if is_router_parameter(name)}
    assert len(model.router_parameters()) == len(trainable) == 3 * 4

    # An MLP-only layer keeps today's layout; with only attention routed, the MLP is a plain CLIPMLP.
    assert "encoder.layers.0.mlp.router.hidden.weight" in build(tiny_zoo, "fc1").state_dict()
    attention_only = build(tiny_zoo, "q-v", router="shared")
    assert type(attention_only.encoder.layers[0].mlp).__name__ == "CLIPMLP"
    assert attention_only.moe_layers == [] and attention_only.encoder.layers[0].self_attn.router is None


def test_fresh_routers_route_every_expert_with_scaling(tiny_zoo):
    for options in ({}, {"router_depth": 0}, {"shared_router": True}):
        model = build_wemoe(*tiny_zoo, moe_modules=["k_proj"], rank=2, scaling=0.3, **options)
        out = model(torch.randn(2, 3, 32, 32), output_routing_weights=True)
        for routing in out.routing_weights:
            torch.testing.assert_close(routing, torch.full_like(routing, 0.3), atol=0.02, rtol=0)


def test_routing_modes_switch_attention_routing(tiny_zoo):
    # One MoE layer: its routing depends on the input only, so batch routing is forcing the batch mean.
    model = build(tiny_zoo, "q-v", "low-rank", moe_layers=[0]).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        per_sample = model(x, output_routing_weights=True)
        batch = model(x, routing="batch").pooler_output
        model.set_routing("batch")
        assert torch.equal(model(x).pooler_output, batch)
        means = per_sample.routing_weights[0].mean(dim=0)
        forced = model(x, force_routing=means, routing="sample").pooler_output
    assert not torch.allclose(batch, per_sample.pooler_output)
    torch.testing.assert_close(batch, forced, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_(enable|disable)` is deprecated:FutureWarning")
@pytest.mark.parametrize("storage", ["dense", "low-rank"])
@pytest.mark.parametrize("kwargs", [{"use_reentrant": True}, {"use_reentrant": False}])
def test_gradient_checkpointing_keeps_router_gradients(tiny_zoo, storage, kwargs):
    model = build(tiny_zoo, "attention+mlp", storage).train()
    pixel_values = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def gradients():
        model.zero_grad()
        model(pixel_values).pooler_output.square().sum().backward()
        return [p.grad.clone() for p in model.router_parameters()]

    want = gradients()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert all(torch.equal(g, w) for g, w in zip(gradients(), want))


@pytest.mark.parametrize("storage", ["dense", "low-rank"])
def test_compiles_without_graph_breaks(tiny_zoo, storage):
    model = build(tiny_zoo, "out+fc2", storage, router="shared")
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.eval()(pixel_values).pooler_output
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixel_values).pooler_output, want, atol=1e-6, rtol=1e-6)
    model.zero_grad()
    compiled.train()(pixel_values).pooler_output.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.router_parameters())
    torch._dynamo.reset()


def test_full_clip_model_with_routed_attention(tiny_zoo, tmp_path):
    vision = build(tiny_zoo, "q-v", "low-rank")
    text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    config = WEMoECLIPConfig(text_config=text.to_dict(), vision_config=vision.config.to_dict(), projection_dim=16)
    model = WEMoECLIPModel(config)
    model.vision_model.load_state_dict(vision.state_dict())
    model.save_pretrained(tmp_path)
    loaded, info = WEMoECLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    inputs = dict(input_ids=torch.tensor([[1, 2, 3]]), pixel_values=torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits_per_image, model(**inputs).logits_per_image)
    assert loaded.collapse(torch.tensor([1.0, 0.0, 0.0])).vision_model.encoder.layers[0].self_attn is not None


# ----------------------------------------------------------------------------------------------------------------
# Config and merge keys.


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["fc3"], r"moe_modules must name modules out of \['q_proj', .*'fc2'\], got unknown \['fc3'\]"),
        ([], "moe_modules must be a non-empty list"),
        (["fc1", "fc1"], "moe_modules must name each module once"),
        ("fc1", "moe_modules must be a non-empty list"),
    ],
)
def test_bad_moe_modules_are_refused_naming_the_field(value, message):
    with pytest.raises(ValueError, match=message):
        WEMoECLIPVisionConfig(expert_names=["a"], moe_modules=value)


def test_moe_modules_are_stored_in_canonical_order(tiny_zoo, tmp_path):
    config = WEMoECLIPVisionConfig(expert_names=["a"], moe_modules=("fc2", "v_proj", "q_proj"))
    assert config.moe_modules == ["q_proj", "v_proj", "fc2"] and config.routes_attention
    assert WEMoECLIPVisionConfig(expert_names=["a"]).moe_modules == ["fc1", "fc2"]
    with pytest.raises(WEMoEError, match="moe_modules"):
        build_wemoe(*tiny_zoo, moe_modules=["attn"])


def test_routed_tensor_names_layer_parent_and_tensor():
    modules = ["q_proj", "fc2"]
    assert routed_tensor("encoder.layers.3.self_attn.q_proj.weight", modules) == (3, "self_attn", "q_proj_weight")
    assert routed_tensor("encoder.layers.0.mlp.fc2.bias", modules) == (0, "mlp", "fc2_bias")
    assert routed_tensor("encoder.layers.0.mlp.fc1.bias", modules) is None
    assert routed_tensor("encoder.layers.0.self_attn.k_proj.weight", modules) is None
    assert routed_tensor("encoder.layers.0.layer_norm1.weight", modules) is None
    assert routed_tensor("encoder.layers.0.mlp.fc1.weight") == (0, "mlp", "fc1_weight")
