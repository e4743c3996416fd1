"""Model sources: references, checkpoint layouts (transformers 4/5, full CLIP, shards, pickle), bad files.

Inputs in every layout come from `write_checkpoint` (tests/support/checkpoints.py), shared with the merge tests.
"""

from __future__ import annotations

import json

import pytest
import torch

from checkpoints import write_checkpoint
from hf_wemoe.errors import SourceError
from hf_wemoe.io.sources import open_source, parse_reference
from tiny_models import make_base_and_experts

LAYOUTS = ("v5", "v4", "clip", "sharded")


@pytest.fixture(scope="module")
def tiny():
    base, experts = make_base_and_experts(num_experts=1, seed=0)
    return base, experts["task0"]


@pytest.fixture(scope="module")
def checkpoints(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    base, _ = tiny
    return {layout: write_checkpoint(base, root / layout, layout) for layout in (*LAYOUTS, "pickle")}


def test_parse_reference(tmp_path):
    ref = parse_reference("openai/clip-vit-base-patch32")
    assert (ref.repo_id, ref.revision, ref.is_local) == ("openai/clip-vit-base-patch32", None, False)
    ref = parse_reference("tanganke/clip-vit-base-patch32_mnist@v1.0")
    assert (ref.repo_id, ref.revision) == ("tanganke/clip-vit-base-patch32_mnist", "v1.0")
    assert ref.pinned("a" * 40) == "tanganke/clip-vit-base-patch32_mnist@" + "a" * 40
    assert parse_reference(str(tmp_path)).path == tmp_path.resolve()
    assert parse_reference(str(tmp_path)).pinned("sha256:x") == str(tmp_path)
    for bad in ("", "./missing-folder", "/no/such/folder", "a/b/c", "org/name@", "bad name"):
        with pytest.raises(SourceError):
            parse_reference(bad)
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    with pytest.raises(SourceError, match="is a file"):
        parse_reference(str(file))


@pytest.mark.parametrize("layout", [*LAYOUTS, "pickle"])
def test_layouts_give_the_vision_tower_in_one_key_layout(tiny, checkpoints, layout):
    base, _ = tiny
    source = open_source(str(checkpoints[layout]), allow_pickle=layout == "pickle")
    reference = base.state_dict()
    assert source.keys == list(reference)
    for key, tensor in reference.items():
        assert source.shape(key) == tuple(tensor.shape)
        assert torch.equal(source.get(key), tensor), key
    assert source.config.hidden_size == base.config.hidden_size
    assert source.config.num_hidden_layers == base.config.num_hidden_layers
    assert source.config.model_type == "clip_vision_model"
    assert source.commit.startswith("sha256:")
    assert source.provenance()["source"] == "local"
    expected_layout = {"v4": "clip_vision_prefixed", "pickle": "clip_vision_prefixed", "clip": "clip"}
    assert source.layout == expected_layout.get(layout, "clip_vision")


def test_pickle_only_checkpoints_are_refused_unless_allowed(checkpoints):
    with pytest.raises(SourceError) as info:
        open_source(str(checkpoints["pickle"]))
    message = str(info.value)
    assert "pytorch_model.bin" in message and "arbitrary code" in message and "--allow-pickle" in message
    assert "\n" not in message


def test_local_revision_is_a_content_hash(tiny, tmp_path):
    base, expert = tiny
    first = open_source(str(write_checkpoint(base, tmp_path / "a"))).commit
    again = open_source(str(write_checkpoint(base, tmp_path / "b"))).commit
    other = open_source(str(write_checkpoint(expert, tmp_path / "c"))).commit
    assert first == again != other
    assert open_source(str(tmp_path / "a"), hash_local=False).commit is None


def test_corrupt_safetensors_are_reported(tiny, tmp_path):
    base, _ = tiny
    folder = write_checkpoint(base, tmp_path / "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(SourceError, match="corrupt or incomplete") as info:
        open_source(str(folder))
    assert "model.safetensors" in str(info.value)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(SourceError, match="corrupt or incomplete"):
        open_source(str(folder))


def test_bad_checkpoints_are_reported(tiny, tmp_path):
    base, _ = tiny
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(base.config.to_dict()))
    with pytest.raises(SourceError, match="no model weights"):
        open_source(str(empty))

    folder = write_checkpoint(base, tmp_path / "text")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(SourceError, match="'bert' model"):
        open_source(str(folder))

    # Weights that do not match their own config (two layers missing).
    folder = write_checkpoint(base, tmp_path / "mismatch")
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 5}))
    with pytest.raises(SourceError, match="lacks tensor 'encoder.layers.3"):
        open_source(str(folder))

    folder = write_checkpoint(base, tmp_path / "no-config")
    (folder / "config.json").unlink()
    with pytest.raises(SourceError, match="no config.json"):
        open_source(str(folder))


def test_a_missing_shard_is_reported(tiny, tmp_path):
    base, _ = tiny
    folder = write_checkpoint(base, tmp_path / "sharded", "sharded")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(SourceError, match="missing"):
        open_source(str(folder))
