"""The model API: folders saved by older releases, routing modes, router parameters, checkpointing, compile."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTextConfig

from hf_wemoe import WEMoECLIPConfig, WEMoECLIPModel, WEMoECLIPVisionConfig, build_wemoe
from hf_wemoe.models.modeling_wemoe import WEMoECLIPPreTrainedModel, WEMoECLIPVisionModel, is_router_parameter
from isolation import WITHOUT_PACKAGE
from tiny_models import make_base_and_experts, randomize_routers

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LEGACY = ("legacy_wemoe", "legacy_ewemoe")
# The legacy folders' configs use the field names deprecated since (`init_lambda`, `task_vector_sparsity`).
legacy_names = pytest.mark.filterwarnings("ignore:.*is deprecated, use:FutureWarning")


# ----------------------------------------------------------------------------------------------------------------
# Folders saved by version 0.1.0 (see fixtures/make_legacy_models.py) load and compute the same bits.


@pytest.fixture(scope="module")
def legacy_outputs() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "legacy_outputs.safetensors")


def _close(actual: torch.Tensor, stored: torch.Tensor) -> None:
    # The stored outputs were computed on the machine that saved the folders; another CPU (or thread count) may
    # round the same float operations differently, so they are compared closely, not bit for bit. Bit-identity
    # with the 0.1.0 code is checked on this machine against the folders' own model files (below).
    torch.testing.assert_close(actual, stored, atol=1e-5, rtol=1e-5)


def _assert_legacy_outputs(model, name: str, expected: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        outputs = model(expected["pixel_values"], output_routing_weights=True)
    _close(outputs.pooler_output, expected[f"{name}.pooler_output"])
    _close(outputs.last_hidden_state, expected[f"{name}.last_hidden_state"])
    _close(torch.stack(outputs.routing_weights), expected[f"{name}.routing_weights"])


@legacy_names
@pytest.mark.parametrize("name", LEGACY)
def test_legacy_folder_loads_bit_identically(name, legacy_outputs):
    model = WEMoECLIPVisionModel.from_pretrained(FIXTURES / name).eval()
    _assert_legacy_outputs(model, name, legacy_outputs)


@legacy_names
def test_legacy_folders_load_with_their_own_remote_code(tmp_path, legacy_outputs):
    """In a fresh process where hf_wemoe cannot be imported, the folders' own (0.1.0) model files give the same
    bits as this version's classes on this machine."""
    remote = tmp_path / "remote.safetensors"
    script = WITHOUT_PACKAGE + textwrap.dedent(
        f"""
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModel

        torch.set_num_threads({torch.get_num_threads()})  # the same reductions as the parent process
        pixel_values = load_file({str(FIXTURES / "legacy_outputs.safetensors")!r})["pixel_values"]
        results = {{}}
        for name in {LEGACY!r}:
            model = AutoModel.from_pretrained({str(FIXTURES)!r} + "/" + name, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            with torch.no_grad():
                outputs = model(pixel_values, output_routing_weights=True)
            results[name + ".pooler_output"] = outputs.pooler_output
            results[name + ".last_hidden_state"] = outputs.last_hidden_state
            results[name + ".routing_weights"] = torch.stack(outputs.routing_weights)
            print("REMOTE-OK", name)
        save_file(results, {str(remote)!r})
        """
    )
    env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(f"REMOTE-OK {name}" in result.stdout for name in LEGACY)
    old = load_file(remote)
    for name in LEGACY:
        model = WEMoECLIPVisionModel.from_pretrained(FIXTURES / name).eval()
        with torch.no_grad():
            outputs = model(legacy_outputs["pixel_values"], output_routing_weights=True)
        assert torch.equal(outputs.pooler_output, old[f"{name}.pooler_output"]), name
        assert torch.equal(outputs.last_hidden_state, old[f"{name}.last_hidden_state"]), name
        assert torch.equal(torch.stack(outputs.routing_weights), old[f"{name}.routing_weights"]), name
        _close(outputs.pooler_output, legacy_outputs[f"{name}.pooler_output"])


# ----------------------------------------------------------------------------------------------------------------
# Importing a model module first thing in a process works (the Auto-class registration runs as transformers loads).


@pytest.mark.parametrize("module", ["configuration_wemoe", "modeling_wemoe", "modeling_wemoe_clip"])
def test_model_module_imports_first_in_a_fresh_process(module):
    script = textwrap.dedent(
        f"""
        import hf_wemoe.models.{module}
        from transformers import AutoConfig, AutoModel
        from hf_wemoe.models.modeling_wemoe import WEMoECLIPVisionModel

        config = AutoConfig.for_model("wemoe_clip_vision_model", expert_names=["a"])
        assert type(AutoModel.from_config(config)) is WEMoECLIPVisionModel
        print("IMPORT-OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "IMPORT-OK" in result.stdout


# ----------------------------------------------------------------------------------------------------------------
# Router parameters: one rule, one pretrained base for the vision tower and the full CLIP model.


def test_is_router_parameter_names_router_weights_only():
    routers = [
        "encoder.router.hidden.weight",
        "encoder.layers.0.mlp.router.output.bias",
        "vision_model.encoder.layers.11.mlp.router.bias",
        "router.output.weight",
    ]
    others = [
        "encoder.layers.0.mlp.fc1.weight",
        "encoder.layers.0.mlp.task_vectors.fc1_weight_values",
        "encoder.layers.0.mlp.router",  # a module, not one of its parameters
        "text_model.encoder.layers.0.self_attn.q_proj.weight",
        "my_router.weight",
        "routers.weight",
    ]
    assert all(is_router_parameter(name) for name in routers)
    assert not any(is_router_parameter(name) for name in others)


def tiny_full_clip(shared_router: bool = False) -> WEMoECLIPModel:
    vision = build_wemoe(*make_base_and_experts(num_experts=2), shared_router=shared_router)
    text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    config = WEMoECLIPConfig(
        text_config=text.to_dict(), vision_config=vision.config.to_dict(), projection_dim=16
    )
    model = WEMoECLIPModel(config)
    model.vision_model.load_state_dict(vision.state_dict())
    randomize_routers(model)
    return model


@pytest.mark.parametrize("shared_router", [False, True])
def test_full_clip_model_shares_the_pretrained_base(tmp_path, shared_router):
    model = tiny_full_clip(shared_router)
    assert isinstance(model, WEMoECLIPPreTrainedModel)
    vision_routers = {f"vision_model.{name}" for name, _ in model.vision_model.named_parameters()}
    vision_routers = {name for name in vision_routers if is_router_parameter(name)}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == vision_routers and len(model.router_parameters()) == len(vision_routers)
    model.save_pretrained(tmp_path)
    loaded = WEMoECLIPModel.from_pretrained(tmp_path)
    assert {name for name, p in loaded.named_parameters() if p.requires_grad} == vision_routers
    loaded, info = WEMoECLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    assert {name for name, p in loaded.named_parameters() if p.requires_grad} == vision_routers
    assert not info["missing_keys"] and not info["unexpected_keys"]


# ----------------------------------------------------------------------------------------------------------------
# Routing modes are switched through the model (`set_routing`) or per call (`routing=`), never by assigning config.


@legacy_names
def test_set_routing_and_the_routing_argument_match_the_old_config_switch(legacy_outputs):
    # The 0.1.0 outputs with routing "batch" were made by assigning `model.config.routing`.
    model = WEMoECLIPVisionModel.from_pretrained(FIXTURES / "legacy_wemoe").eval()
    pixel_values, expected = legacy_outputs["pixel_values"], legacy_outputs["legacy_wemoe.batch_pooler_output"]
    with torch.no_grad():
        per_call = model(pixel_values, routing="batch").pooler_output
        assert model.config.routing == "sample"  # one call only
        model.set_routing("batch")
        assert model.config.routing == "batch"
        switched = model(pixel_values).pooler_output
        back = model(pixel_values, routing="sample").pooler_output
    assert torch.equal(per_call, switched)
    _close(per_call, expected)
    with torch.no_grad():
        model.set_routing("sample")
        assert torch.equal(back, model(pixel_values).pooler_output)
    _close(back, legacy_outputs["legacy_wemoe.pooler_output"])


def test_routing_values_are_checked_in_one_line():
    model = build_wemoe(*make_base_and_experts(num_experts=2))
    for call in (lambda: model.set_routing("tokens"), lambda: model(torch.zeros(1, 3, 32, 32), routing="tokens")):
        with pytest.raises(ValueError) as error:
            call()
        assert str(error.value) == "routing must be one of ['sample', 'batch'], got 'tokens'"
    assert model.config.routing == "sample"


def test_full_clip_model_switches_its_vision_tower(tmp_path):
    model = tiny_full_clip().eval()
    inputs = dict(input_ids=torch.tensor([[1, 2, 3]]), pixel_values=torch.randn(3, 3, 32, 32))
    with torch.no_grad():
        per_call = model(**inputs, routing="batch").logits_per_image
        model.set_routing("batch")
        switched = model(**inputs).logits_per_image
        vision = model.vision_model(inputs["pixel_values"]).pooler_output
        model.vision_model.set_routing("sample")
        per_sample_vision = model.vision_model(inputs["pixel_values"]).pooler_output
    assert torch.equal(per_call, switched) and not torch.equal(vision, per_sample_vision)
    model.set_routing("batch")
    model.save_pretrained(tmp_path)
    assert WEMoECLIPModel.from_pretrained(tmp_path).config.vision_config.routing == "batch"


# ----------------------------------------------------------------------------------------------------------------
# Renamed config fields: `scaling` (was `init_lambda`) and `sparsity` (was `task_vector_sparsity`).


def test_old_config_json_loads_into_the_renamed_fields(tmp_path):
    with pytest.warns(FutureWarning) as warned:
        config = WEMoECLIPVisionConfig.from_pretrained(FIXTURES / "legacy_ewemoe")
    messages = " ".join(str(warning.message) for warning in warned)
    assert "`init_lambda` is deprecated, use `scaling`" in messages
    assert "`task_vector_sparsity` is deprecated, use `sparsity`" in messages
    assert config.scaling == 0.3 and config.sparsity == 0.9 and config.shared_router is True
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["scaling"] == 0.3 and saved["sparsity"] == 0.9
    assert "init_lambda" not in saved and "task_vector_sparsity" not in saved


def test_old_option_names_still_build_the_same_model():
    base, experts = make_base_and_experts(num_experts=2)
    with pytest.warns(FutureWarning) as warned:
        old = build_wemoe(base, experts, init_lambda=0.25, task_vector_sparsity=0.9)
    messages = " ".join(str(warning.message) for warning in warned)
    assert "`init_lambda` is deprecated" in messages and "`task_vector_sparsity` is deprecated" in messages
    new = build_wemoe(base, experts, scaling=0.25, sparsity=0.9)
    assert old.config.scaling == 0.25 and old.config.sparsity == 0.9
    assert all(torch.equal(value, new.state_dict()[key]) for key, value in old.state_dict().items())


def test_old_attribute_names_read_and_write_the_new_fields():
    config = WEMoECLIPVisionConfig(expert_names=["a"], scaling=0.5, sparsity=0.2)
    with pytest.warns(FutureWarning, match="use `scaling`"):
        assert config.init_lambda == 0.5
    with pytest.warns(FutureWarning, match="use `sparsity`"):
        config.task_vector_sparsity = 0.7
    assert config.sparsity == 0.7


def test_old_and_new_names_together_must_agree():
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="pass only `scaling`"):
        WEMoECLIPVisionConfig(expert_names=["a"], scaling=0.5, init_lambda=0.3)
    with pytest.warns(FutureWarning):
        config = WEMoECLIPVisionConfig(expert_names=["a"], sparsity=0.4, task_vector_sparsity=0.4)
    assert config.sparsity == 0.4


# ----------------------------------------------------------------------------------------------------------------
# Gradient checkpointing for router training, and torch.compile without graph breaks.

VARIANTS = {"wemoe": {}, "e-wemoe": {"sparsity": 0.9, "shared_router": True}}


def router_gradients(model, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    model(pixel_values).pooler_output.square().sum().backward()
    return [p.grad.clone() for p in model.router_parameters()]


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_(enable|disable)` is deprecated:FutureWarning")
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": True}, {"use_reentrant": False}])
def test_gradient_checkpointing_keeps_router_gradients(variant, kwargs):
    model = build_wemoe(*make_base_and_experts(), **VARIANTS[variant]).train()
    randomize_routers(model)
    pixel_values = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    want = router_gradients(model, pixel_values)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert all(layer.gradient_checkpointing for layer in model.encoder.layers)
    assert all(torch.equal(g, w) for g, w in zip(router_gradients(model, pixel_values), want))
    model.gradient_checkpointing_disable()
    assert not any(layer.gradient_checkpointing for layer in model.encoder.layers)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_(enable|disable)` is deprecated:FutureWarning")
def test_gradient_checkpointing_of_the_full_clip_model():
    model = tiny_full_clip().train()
    inputs = dict(input_ids=torch.tensor([[1, 2, 3], [3, 2, 1]]), pixel_values=torch.randn(2, 3, 32, 32))

    def gradients():
        model.zero_grad()
        model(**inputs, return_loss=True).loss.backward()
        return [p.grad.clone() for p in model.router_parameters()]

    want = gradients()
    model.gradient_checkpointing_enable()
    assert all(torch.equal(g, w) for g, w in zip(gradients(), want))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiles_without_graph_breaks(variant, tmp_path):
    model = build_wemoe(*make_base_and_experts(), **VARIANTS[variant])
    randomize_routers(model)
    model.save_pretrained(tmp_path)
    # Loaded afresh: sparse task vectors are checked at load and expanded on first use, inside the graph.
    loaded = WEMoECLIPVisionModel.from_pretrained(tmp_path).eval()
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.eval()(pixel_values).pooler_output
    torch._dynamo.reset()
    compiled = torch.compile(loaded, backend="eager", fullgraph=True)  # fullgraph: any graph break raises
    # Expanding (in inference mode), then reading the expanded task vectors.
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            assert torch.equal(compiled(pixel_values).pooler_output, want)
    # Router training compiles too (the kernels' backward included), also after evaluation in inference mode.
    want = router_gradients(model.train(), pixel_values)
    assert all(torch.equal(g, w) for g, w in zip(router_gradients(compiled.train(), pixel_values), want))
    torch._dynamo.reset()
