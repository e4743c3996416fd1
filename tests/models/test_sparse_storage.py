"""Sparse task-vector storage: 16-bit block offsets plus per-block counts, round trips and corruption checks."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from hf_wemoe import WEMoECLIPVisionConfig, WEMoECLIPVisionModel, build_wemoe
from hf_wemoe.io.weights import count_parameters
from hf_wemoe.models.modeling_wemoe import WEMoETaskVectors
from hf_wemoe.models.wemoe_ops import decode_sparse_indices, encode_sparse_indices, num_kept_entries
from tiny_models import make_base_and_experts, randomize_routers

BLOCK = 65536


def test_encode_decode_round_trip_across_blocks():
    numel = 5 * BLOCK + 123
    generator = torch.Generator().manual_seed(0)
    first = torch.zeros(numel, dtype=torch.bool)
    first[:40000] = True  # more entries in one block than int16 can count to
    first[3 * BLOCK + 5 : 3 * BLOCK + 105] = True
    first[torch.randint(0, numel, (1000,), generator=generator)] = True
    first[BLOCK : 2 * BLOCK] = False  # an empty block
    first[numel - 1] = True  # the very last position
    second = torch.zeros(numel, dtype=torch.bool)
    second[torch.randperm(numel, generator=generator)[: int(first.sum())]] = True
    indices = torch.stack([first.nonzero().squeeze(1), second.nonzero().squeeze(1)]).to(torch.int32)

    offsets, counts = encode_sparse_indices(indices, numel)
    assert offsets.dtype == torch.int16 and offsets.shape == indices.shape
    assert counts.dtype == torch.int32 and counts.shape == (2, 6)
    assert counts[0, 1] == 0 and counts[0, 0] == 40000 + int(first[40000:BLOCK].sum())
    assert counts.sum(dim=1).tolist() == [indices.shape[1]] * 2
    # Offsets of 32768 and above are stored as negative int16 values (the same 16 bits).
    assert offsets[0, 32768] == 32768 - BLOCK and offsets.min() < 0
    assert torch.equal(decode_sparse_indices(offsets, counts), indices.long())


def test_encode_works_on_meta_tensors():
    offsets, counts = encode_sparse_indices(torch.arange(70000, device="meta"), 3 * BLOCK)
    assert offsets.device.type == counts.device.type == "meta" and counts.shape == (3,)


def _task_vectors(sparsity: float) -> WEMoETaskVectors:
    config = WEMoECLIPVisionConfig(
        hidden_size=200,
        intermediate_size=700,
        num_attention_heads=4,
        expert_names=["a", "b"],
        sparsity=sparsity,
    )
    return WEMoETaskVectors(config)


def test_set_then_dense_keeps_top_entries_in_every_block():
    module = _task_vectors(sparsity=0.7)
    numel = 700 * 200  # three blocks, the last one partial
    kept = num_kept_entries(numel, 0.7)
    generator = torch.Generator().manual_seed(1)
    tau = 0.01 * torch.randn(2, numel, generator=generator)
    # Expert a: 40000 large entries in block 0, none in block 1, the rest in block 2.
    tau[0, :40000] += 5.0
    tau[0, 2 * BLOCK : 2 * BLOCK + kept - 40000] -= 5.0
    module.set("fc1_weight", tau.view(2, 700, 200))

    assert module.fc1_weight_indices.dtype == torch.int16 and module.fc1_weight_indices.shape == (2, kept)
    assert module.fc1_weight_block_counts[0].tolist() == [40000, 0, kept - 40000]
    dense = module.dense("fc1_weight").view(2, numel)
    for k in range(2):
        top = torch.zeros(numel, dtype=torch.bool)
        top[tau[k].abs().topk(kept).indices] = True
        torch.testing.assert_close(dense[k], torch.where(top, tau[k], 0.0), atol=0, rtol=0)


def test_fresh_sparse_model_runs_as_the_pretrained_mlps():
    base, experts = make_base_and_experts(num_experts=2, seed=0, num_hidden_layers=1)
    model = build_wemoe(base, experts, sparsity=0.9)
    fresh = WEMoECLIPVisionModel(model.config)
    for name in ("fc1_weight", "fc2_bias"):
        assert not fresh.encoder.layers[0].mlp.task_vectors.dense(name).any()
    fresh(torch.randn(1, 3, 32, 32))


@pytest.fixture(scope="module")
def multi_block_model():
    # fc1/fc2 weights of 32 x 2100 = 67200 entries: two blocks, block 0 with more than 32767 kept entries.
    base, experts = make_base_and_experts(num_experts=2, seed=0, num_hidden_layers=1, intermediate_size=2100)
    model = build_wemoe(base, experts, sparsity=0.3, shared_router=True)
    randomize_routers(model)
    return model


def test_multi_block_save_and_load_give_identical_outputs(multi_block_model, tmp_path):
    model = multi_block_model
    counts = model.state_dict()["encoder.layers.0.mlp.task_vectors.fc2_weight_block_counts"]
    assert counts.shape == (2, 2) and (counts[:, 0] > 32767).all()
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert stored["encoder.layers.0.mlp.task_vectors.fc2_weight_indices"].dtype == torch.int16
    loaded = AutoModel.from_pretrained(tmp_path)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(x).pooler_output, model(x).pooler_output)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # Only values are parameters: the position tensors are not counted.
    state = model.state_dict()
    values = sum(v.numel() for k, v in state.items() if not k.endswith(("_indices", "_block_counts")))
    assert count_parameters(tmp_path)["total"] == values


def test_dtype_changes_keep_position_buffers(multi_block_model):
    model = copy.deepcopy(multi_block_model)
    module = model.encoder.layers[0].mlp.task_vectors
    before = module.dense("fc1_weight").clone()
    for change in (torch.nn.Module.half, lambda m: m.to(torch.bfloat16), torch.nn.Module.float):
        change(model)
        assert module.fc1_weight_indices.dtype == torch.int16
        assert module.fc1_weight_block_counts.dtype == torch.int32
        assert module.fc1_weight_values.dtype == torch.float32
    assert torch.equal(module.dense("fc1_weight"), before)


def _counts_off_by_one(state, key):
    state[key][1, 0] += 1


def _negative_count(state, key):
    kept = int(state[key][0].sum())
    state[key][0] = torch.tensor([-1, kept + 1])  # still sums to the number of kept entries


def _duplicate_position(state, key):
    state[key][0, 1] = state[key][0, 0]


def _position_past_the_end(state, key):
    # The last block holds positions 65536..67199: offset 65535 (int16 -1) would be position 131071.
    state[key][1, -1] = -1


CORRUPTIONS = {
    "counts-sum": ("fc2_weight_block_counts", _counts_off_by_one),
    "negative-count": ("fc2_weight_block_counts", _negative_count),
    "duplicate": ("fc2_weight_indices", _duplicate_position),
    "out-of-range": ("fc2_weight_indices", _position_past_the_end),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupted_positions_raise_a_clear_error(multi_block_model, tmp_path, corruption):
    suffix, corrupt = CORRUPTIONS[corruption]
    multi_block_model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    key = f"encoder.layers.0.mlp.task_vectors.{suffix}"
    corrupt(state, key)
    save_file(state, path, metadata={"format": "pt"})
    message = rf"corrupted sparse task vectors: .*'{re.escape(key)}'"
    # Checked once, when the checkpoint loads (not in the forward).
    with pytest.raises(ValueError, match=message):
        AutoModel.from_pretrained(tmp_path)
    model = copy.deepcopy(multi_block_model)
    with pytest.raises(ValueError, match=message):
        model.load_state_dict(state)
    # Stored tensors changed in place after loading are checked before they are first used.
    model = copy.deepcopy(multi_block_model)
    model(torch.randn(1, 3, 32, 32))
    with torch.no_grad():
        model.get_buffer(key).copy_(state[key])
    with pytest.raises(ValueError, match=message):
        model(torch.randn(1, 3, 32, 32))
