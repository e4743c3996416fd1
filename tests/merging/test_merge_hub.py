"""`hf-wemoe merge` from Hub references, served by the project's local Hub server.

`HF_ENDPOINT` must be set before huggingface_hub is imported, so the command runs in subprocesses with the
server's environment: that also checks exit codes and stderr for real.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from transformers import CLIPImageProcessor, CLIPVisionModel

from checkpoints import write_checkpoint
from hf_wemoe import WEMoECLIPVisionModel, build_wemoe
from hub_server import RESULT_MARKER, HubServer, client_env, client_result, run_client
from tiny_models import make_base_and_experts

BASE = "openai/clip-vit-base-patch32"
MNIST = "tanganke/clip-vit-base-patch32_mnist"
SVHN = "tanganke/clip-vit-base-patch32_svhn"
DTD = "tanganke/clip-vit-base-patch32_dtd"
CARS = "tanganke/clip-vit-base-patch32_stanford-cars"
GTSRB = "tanganke/clip-vit-base-patch32_gtsrb"
# Files a merge may download: config, safetensors (single or shards), shard index, preprocessor config.
ALLOWED = ("config.json", "preprocessor_config.json", "model.safetensors", "model.safetensors.index.json")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hub server holding a base and experts in several layouts, and the client environment to reach it."""
    root = tmp_path_factory.mktemp("hub")
    base, experts = make_base_and_experts(num_experts=3, seed=0)
    models = {"base": base, **experts}
    heads = {}
    with HubServer(root / "server") as server:
        # The base as the real one is stored: transformers-4 layout, an image processor, and pickle and other
        # weights beside the safetensors that a merge must not download.
        folder = write_checkpoint(base, root / "base", "v4")
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(folder)
        (folder / "pytorch_model.bin").write_bytes(b"not to be downloaded")
        (folder / "flax_model.msgpack").write_bytes(b"not to be downloaded")
        heads[BASE] = server.commit_folder(BASE, folder)
        heads[MNIST] = server.commit_folder(MNIST, write_checkpoint(experts["task0"], root / "mnist", "v4"))
        # SVHN: tag v1 holds task1; main moved on to other weights since.
        first = server.commit_folder(SVHN, write_checkpoint(experts["task1"], root / "svhn", "v5"))
        server.store.create_tag(server.store.get_repo("model", SVHN), "v1", first)
        heads[SVHN] = first
        server.commit_folder(SVHN, write_checkpoint(experts["task2"], root / "svhn-later", "v5"))
        heads[DTD] = server.commit_folder(DTD, write_checkpoint(experts["task2"], root / "dtd", "sharded"))
        heads[CARS] = server.commit_folder(CARS, write_checkpoint(experts["task1"], root / "cars", "clip"))
        heads[GTSRB] = server.commit_folder(
            GTSRB, write_checkpoint(experts["task0"], root / "gtsrb", "pickle")
        )
        env = client_env(server, root / "hf_home")
        yield server, env, models, heads, root


def cli(env, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hf_wemoe", "merge", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_merge_from_hub_references(hub, tmp_path):
    server, env, models, heads, _ = hub
    server.clear_requests()
    output = tmp_path / "wemoe"
    proc = cli(
        env,
        *("--base", BASE, "--output", str(output)),
        *("--expert", f"mnist={MNIST}", "--expert", f"svhn={SVHN}@v1", "--expert", f"dtd={DTD}"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("merged 3 experts (mnist, svhn, dtd) with wemoe into")

    # The same merge in memory: v4 base, v5 expert at a tag, sharded expert, all read correctly.
    reference = build_wemoe(
        models["base"], {"mnist": models["task0"], "svhn": models["task1"], "dtd": models["task2"]}, seed=0
    ).state_dict()
    merged = WEMoECLIPVisionModel.from_pretrained(output).state_dict()
    assert merged.keys() == reference.keys()
    assert all(torch.equal(merged[key], reference[key]) for key in reference)

    # Provenance: the commits that were read, also pinned in the recipe.
    config = json.loads((output / "config.json").read_text())
    assert config["base_model_ref"] == BASE and config["expert_refs"] == [MNIST, f"{SVHN}@v1", DTD]
    provenance = config["provenance"]
    assert provenance["base"] == {
        "ref": BASE,
        "source": "hub",
        "repo_id": BASE,
        "revision": None,
        "commit": heads[BASE],
        "layout": "clip_vision_prefixed",
    }
    assert provenance["experts"]["svhn"]["revision"] == "v1"
    assert {name: record["commit"] for name, record in provenance["experts"].items()} == {
        "mnist": heads[MNIST],
        "svhn": heads[SVHN],
        "dtd": heads[DTD],
    }
    recipe = yaml.safe_load((output / "merge_config.yaml").read_text())
    assert recipe["base"] == f"{BASE}@{heads[BASE]}"
    assert recipe["experts"] == {
        name: f"{ref}@{heads[ref]}" for name, ref in zip(["mnist", "svhn", "dtd"], [MNIST, SVHN, DTD])
    }

    # Only what a merge needs was downloaded; the base's image processor came along.
    downloaded = {path.rsplit("/", 1)[-1] for method, path in server.requests if "/resolve/" in path}
    assert downloaded and all(name in ALLOWED or name.startswith("model-000") for name in downloaded), (
        downloaded
    )
    assert any(name.startswith("model-000") for name in downloaded)  # the sharded expert
    assert (output / "preprocessor_config.json").read_bytes() == server.read_file(
        BASE, "preprocessor_config.json"
    )

    card = ModelCard.load(output / "README.md")
    assert card.data.base_model == [BASE, MNIST, SVHN, DTD]
    assert card.data.base_model_relation == "merge"
    assert f"https://huggingface.co/{MNIST}" in card.text


def test_hub_errors_exit_code_and_message(hub, tmp_path):
    _, env, _, _, _ = hub
    proc = cli(
        env, "--base", "openai/no-such-model", "--expert", f"mnist={MNIST}", "--output", "out", cwd=tmp_path
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "openai/no-such-model" in lines[0], (
        proc.stderr
    )
    assert "was not found" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_more_hub_cases_in_one_client(hub, tmp_path):
    """Several merges in one client process (cheaper than one process each): revisions, pickle, full CLIP, recipes."""
    _, env, models, _, _ = hub
    first = tmp_path / "first"
    code = f"""
        import contextlib, io, json
        from hf_wemoe.cli.main import main

        def merge(*args):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(["merge", "-q", *args])
            return [code, err.getvalue().strip()]

        results = {{
            "bad_revision": merge("--base", "{BASE}", "--expert", "svhn={SVHN}@v9", "--output", "bad"),
            "pickle_refused": merge("--base", "{BASE}", "--expert", "gtsrb={GTSRB}", "--output", "bad"),
            "first": merge(
                "--base", "{BASE}", "--expert", "cars={CARS}", "--expert", "gtsrb={GTSRB}", "--allow-pickle",
                "--method", "task-arithmetic", "--output", "{first}",
            ),
            "again": merge("--config", "{first / "merge_config.yaml"}", "--output", "{tmp_path / "again"}"),
        }}
        print({RESULT_MARKER!r} + json.dumps(results))
    """
    results = client_result(run_client(textwrap.dedent(code), env, cwd=str(tmp_path)))
    code, message = results["bad_revision"]
    assert code == 2 and message.startswith("error: revision 'v9' not found") and "\n" not in message
    code, message = results["pickle_refused"]
    assert code == 2 and "arbitrary code" in message and "--allow-pickle" in message and "\n" not in message
    assert not (tmp_path / "bad").exists()
    assert results["first"][0] == 0 and results["again"][0] == 0, results

    # Full CLIP (cars = task1) and pickle (gtsrb = task0) experts, merged by task arithmetic.
    merged = CLIPVisionModel.from_pretrained(first).state_dict()
    theta0 = models["base"].state_dict()
    thetas = [models["task1"].state_dict(), models["task0"].state_dict()]
    expected = {key: theta0[key] + 0.3 * sum(theta[key] - theta0[key] for theta in thetas) for key in theta0}
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-5, atol=1e-6)
    recipe = yaml.safe_load((first / "merge_config.yaml").read_text())
    assert recipe["allow_pickle"] is True and recipe["method"] == "task-arithmetic"
    # The pinned recipe rebuilds identical weights.
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        first / "model.safetensors"
    ).read_bytes()
