"""`hf-wemoe push` and `--push-to-hub` against the local Hub server.

In-process pushes use the session server with Xet disabled (conftest); one push runs in a subprocess with the
client's defaults against a server that answers regular upload mode. Loading the pushed repos with
`trust_remote_code=True` runs in a fresh process where `hf_wemoe` cannot be imported.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, pipeline

from adaptation_fixtures import make_adaptation_world
from clip_worlds import adapt, make_clip_world, merge, sample_image
from hf_wemoe import WEMoECLIPModel, WEMoECLIPVisionModel
from hf_wemoe.cli.main import main
from hf_wemoe.errors import WEMoEError
from hf_wemoe.hub.push import _check_code_files, push_folder
from hub_server import RESULT_MARKER, HubServer, client_env, client_result, run_client
from isolation import WITHOUT_PACKAGE

LABELS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("push")
    clip_world = make_clip_world(root)
    return {
        **clip_world,
        "root": root,
        "vision": merge(clip_world, root / "vision"),
        "full": merge(clip_world, root / "full", "--full-clip"),
        "static": merge(clip_world, root / "static", "--method", "task-arithmetic"),
    }


def push(folder, repo_id, **kwargs):
    """`push_folder` with quick retries, as tests want."""
    return push_folder(folder, repo_id, backoff=0.01, show_progress=False, **kwargs)


def repo_files(server: HubServer, repo_id: str, revision: str = "main") -> set[str]:
    return set(server.files(repo_id, revision=revision))


def commit_count(server: HubServer, repo_id: str) -> int:
    repo = server.store.get_repo("model", repo_id)
    return len(server.store.history(repo, server.head(repo_id)))


def repo_exists(server: HubServer, repo_id: str) -> bool:
    return server.store.key("model", repo_id) in server.store.repos


def folder_files(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir() if path.is_file()}


@pytest.fixture(scope="module")
def pushed(world, hub_server):
    """The WEMoE vision tower and the full WEMoE CLIP model pushed to the session server."""
    return {
        "vision": push(world["vision"], "testorg/push-vision"),
        "full": push(world["full"], "testorg/push-full", commit_message="Full CLIP"),
    }


def test_push_uploads_the_folder_and_a_card_for_the_repo(world, pushed, hub_server):
    for kind in ("vision", "full"):
        result, folder = pushed[kind], world[kind]
        repo_id = result.repo_id
        assert result.created and result.url == f"{hub_server.url}/{repo_id}"
        assert result.commit_url.endswith(result.commit_oid) and hub_server.head(repo_id) == result.commit_oid
        assert repo_files(hub_server, repo_id) == folder_files(folder) | {".gitattributes"}
        for name in folder_files(folder) - {"README.md"}:
            assert hub_server.read_file(repo_id, name) == (folder / name).read_bytes(), name
        assert commit_count(hub_server, repo_id) == 2  # the repo's initial commit, then the push
        card = ModelCard.load(repo_id)  # from the Hub
        assert card.text.startswith(f"\n# {repo_id}\n") and f'"{repo_id}"' in card.text
        local = ModelCard((folder / "README.md").read_text())
        assert card.data.to_dict() == local.data.to_dict()
    history = HfApi().list_repo_commits("testorg/push-full")
    assert history[0].title == "Full CLIP"
    assert ModelCard.load("testorg/push-full").data.pipeline_tag == "zero-shot-image-classification"


def test_a_fresh_process_without_the_package_loads_the_pushed_models(world, pushed, hub_server, tmp_path):
    """trust_remote_code from the Hub: bit-identical outputs to the local models, and both pipelines run."""
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    vision = WEMoECLIPVisionModel.from_pretrained(world["vision"]).eval()
    full = WEMoECLIPModel.from_pretrained(world["full"]).eval()
    text = AutoTokenizer.from_pretrained(world["full"])(LABELS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = {
            "pixels": pixels,
            "text": dict(text),
            "vision": vision(pixels).pooler_output,
            "full": full(pixel_values=pixels, **text).logits_per_image,
        }
    torch.save(expected, tmp_path / "expected.pt")
    features = pipeline("image-feature-extraction", model=str(world["vision"]))(sample_image())
    scores = pipeline("zero-shot-image-classification", model=str(world["full"]))(
        sample_image(), candidate_labels=LABELS
    )
    (tmp_path / "pipelines.json").write_text(json.dumps({"features": features, "scores": scores}))

    code = f"""
        import json
        import torch
        from transformers import AutoModel, AutoModelForZeroShotImageClassification, pipeline
        from PIL import Image

        # test_full_clip.test_image, inlined: that module imports hf_wemoe.
        def sample_image(seed=0, size=40):
            generator = torch.Generator().manual_seed(seed)
            pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
            return Image.fromarray(pixels.numpy())

        try:
            import hf_wemoe  # noqa: F401
            raise SystemExit("hf_wemoe should not be importable here")
        except ImportError:
            pass
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        local = json.load(open({str(tmp_path / "pipelines.json")!r}))
        results = {{}}
        vision = AutoModel.from_pretrained("testorg/push-vision", trust_remote_code=True)
        results["vision_module"] = type(vision).__module__
        results["vision_equal"] = torch.equal(vision(expected["pixels"]).pooler_output, expected["vision"])
        full = AutoModelForZeroShotImageClassification.from_pretrained("testorg/push-full", trust_remote_code=True)
        results["full_class"] = type(full).__module__ + "." + type(full).__name__
        with torch.no_grad():
            logits = full(pixel_values=expected["pixels"], **expected["text"]).logits_per_image
        results["full_equal"] = torch.equal(logits, expected["full"])
        extractor = pipeline("image-feature-extraction", model="testorg/push-vision", trust_remote_code=True)
        results["features_equal"] = extractor(sample_image()) == local["features"]
        classifier = pipeline("zero-shot-image-classification", model="testorg/push-full", trust_remote_code=True)
        scores = classifier(sample_image(), candidate_labels={LABELS!r})
        results["scores"] = scores
        results["scores_equal"] = scores == local["scores"]
        print({RESULT_MARKER!r} + json.dumps(results))
    """
    env = client_env(hub_server, tmp_path / "hf_home", disable_xet=True)
    proc = run_client(WITHOUT_PACKAGE + textwrap.dedent(code), env, timeout=300)
    results = client_result(proc)
    assert results["vision_module"].startswith("transformers_modules"), results
    assert results["full_class"].startswith("transformers_modules") and results["full_class"].endswith(
        "modeling_wemoe_clip.WEMoECLIPModel"
    )
    assert results["vision_equal"] and results["full_equal"], results
    assert results["features_equal"], results
    assert sorted(s["label"] for s in results["scores"]) == sorted(LABELS) and results["scores_equal"], (
        results
    )
    assert "not supported for zero-shot-image-classification" not in proc.stderr


def test_push_with_the_client_defaults(world, tmp_path):
    """Xet left on (the default) against a server answering regular upload mode; the command line end to end."""
    with HubServer(tmp_path / "server", force_regular=True) as server:
        env = client_env(server, tmp_path / "hf_home")
        assert "HF_HUB_DISABLE_XET" not in env
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "hf_wemoe",
                "push",
                str(world["full"]),
                "--repo-id",
                "testorg/defaults",
                "-q",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.strip().splitlines()
        assert lines[-1] == f"{server.url}/testorg/defaults" and lines[0].startswith("pushed 13 files")
        assert repo_files(server, "testorg/defaults") == folder_files(world["full"]) | {".gitattributes"}
        weights = world["full"] / "model.safetensors"
        assert server.read_file("testorg/defaults", "model.safetensors") == weights.read_bytes()
        preuploads = [status for method, path, status in server.responses if path.endswith("/preupload/main")]
        assert preuploads == [200]
        assert not any("xet" in path for _, path in server.requests)


def test_repush_replaces_the_files_in_one_commit(world, hub_server):
    repo_id = "testorg/push-again"
    push(world["full"], repo_id)
    before = commit_count(hub_server, repo_id)
    result = push(world["static"], repo_id, private=True)  # an existing repo keeps its visibility
    assert not result.created
    assert repo_files(hub_server, repo_id) == folder_files(world["static"]) | {".gitattributes"}
    assert commit_count(hub_server, repo_id) == before + 1
    assert not hub_server.store.get_repo("model", repo_id)["private"]


def test_branch_and_private(world, hub_server):
    repo_id = "testorg/push-branch"
    result = push(world["vision"], repo_id, branch="untrained", private=True)
    assert hub_server.store.get_repo("model", repo_id)["private"]
    assert repo_files(hub_server, repo_id, "untrained") == folder_files(world["vision"]) | {".gitattributes"}
    assert repo_files(hub_server, repo_id) == {".gitattributes"}  # main untouched
    assert hub_server.head(repo_id, revision="untrained") == result.commit_oid


def test_adapted_model_card_round_trips_eval_results(world, hub_server, tmp_path):
    folder = adapt(shutil.copytree(world["vision"], tmp_path / "adapted"))
    push(folder, "testorg/push-adapted")
    assert {"eval_results.json", "routing.png"} <= repo_files(hub_server, "testorg/push-adapted")
    card = ModelCard.load("testorg/push-adapted")
    results = {r.dataset_name: r.metric_value for r in card.data.eval_results}
    assert results == {"blocks": 71.25, "stripes": 95.5, "local": 50.0}
    assert card.data.model_name == "testorg/push-adapted" and "![Routing" in card.text


def test_transient_errors_are_retried(world, hub_server):
    repo_id = "testorg/push-retried"
    hub_server.inject_failures("/api/repos/create", 503, count=2)
    hub_server.inject_failures("/api/validate-yaml", 429, count=1)
    hub_server.inject_failures(f"/api/models/{repo_id}/commit/", 500, count=1)
    hub_server.clear_requests()
    result = push(world["vision"], repo_id)
    statuses = [(path.split("/")[-1], status) for _, path, status in hub_server.responses if status >= 400]
    assert ("create", 503) in statuses and ("validate-yaml", 429) in statuses and ("main", 500) in statuses
    assert hub_server.head(repo_id) == result.commit_oid and commit_count(hub_server, repo_id) == 2


def test_persistent_server_errors_leave_no_repo(world, hub_server):
    repo_id = "testorg/push-failing"
    hub_server.inject_failures(f"/api/models/{repo_id}/commit/", 500, count=100)
    with pytest.raises(WEMoEError) as error:
        push(world["vision"], repo_id, max_attempts=3)
    message = str(error.value)
    assert "\n" not in message and "after 3 attempts" in message and "500" in message
    assert "nothing was committed" in message
    assert not repo_exists(hub_server, repo_id)  # the push created it, and deleted it again


def test_a_failed_push_keeps_the_previous_commit(world, hub_server):
    repo_id = "testorg/push-kept"
    first = push(world["vision"], repo_id)
    files = repo_files(hub_server, repo_id)
    # The files go up, then the server refuses the commit (not a transient error: no retry).
    hub_server.inject_failures(f"/api/models/{repo_id}/commit/", 400, count=1)
    hub_server.clear_requests()
    with pytest.raises(
        WEMoEError, match=r"^push to 'testorg/push-kept' failed trying to upload the folder: 400"
    ):
        push(world["full"], repo_id)
    assert [status for _, path, status in hub_server.responses if "/commit/" in path] == [400]
    assert hub_server.head(repo_id) == first.commit_oid and repo_files(hub_server, repo_id) == files


def test_connection_errors_are_retried_then_reported(world, monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(WEMoEError) as error:
        push(world["vision"], "testorg/unreachable", max_attempts=2)
    message = str(error.value)
    assert (
        message.startswith(f"cannot reach the Hub at http://127.0.0.1:{port} after 2 attempts")
        and "\n" not in message
    )


@pytest.mark.parametrize(
    "repo_id",
    [
        "no-namespace",
        "org/name/extra",
        "org/na me",
        "org/name@dev",
        "-org/name",
        "org/",
        "org/na--me",
        "org/" + "n" * 97,
    ],
)
def test_malformed_repo_ids_are_refused_before_any_request(world, hub_server, repo_id):
    hub_server.clear_requests()
    with pytest.raises(WEMoEError, match=r"^invalid repo id") as error:
        push(world["vision"], repo_id)
    assert "\n" not in str(error.value) and "ORG/NAME" in str(error.value)
    assert hub_server.requests == []


def test_no_token(world, hub_server, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    hub_server.clear_requests()
    with pytest.raises(
        WEMoEError, match=r"^no Hugging Face token: log in with `hf auth login` or set HF_TOKEN"
    ):
        push(world["vision"], "testorg/no-token")
    assert hub_server.requests == []


def test_a_refused_token(world, hub_server):
    hub_server.tokens = {"another-token"}
    try:
        with pytest.raises(WEMoEError, match=r"^the Hub refused the token \(401 Unauthorized\)") as error:
            push(world["vision"], "testorg/refused")
    finally:
        hub_server.tokens = None
    assert "\n" not in str(error.value) and not repo_exists(hub_server, "testorg/refused")


def _break(folder: Path, how: str) -> Path:
    if how == "no config":
        (folder / "config.json").unlink()
    elif how == "other model":
        (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    elif how == "missing tensor":
        state = load_file(folder / "model.safetensors")
        del state["encoder.layers.1.mlp.task_vectors.fc2_weight"]
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    elif how == "wrong shape":
        state = load_file(folder / "model.safetensors")
        state["post_layernorm.weight"] = state["post_layernorm.weight"][:-1]
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    elif how == "bad config":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "routing": "sometimes"}))
    elif how == "corrupt weights":
        (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    elif how == "no weights":
        (folder / "model.safetensors").unlink()
    elif how == "no code":
        (folder / "modeling_wemoe.py").unlink()
    elif how == "no kernels":
        (folder / "wemoe_ops.py").unlink()
    elif how == "no tokenizer":
        (folder / "tokenizer_config.json").unlink()
    return folder


@pytest.mark.parametrize(
    "kind, how, message",
    [
        ("vision", "no config", "is not a model folder: it has no config.json"),
        ("vision", "other model", "holds a 'bert' model"),
        ("vision", "missing tensor", "lacks weight 'encoder.layers.1.mlp.task_vectors.fc2_weight'"),
        ("vision", "wrong shape", "weight 'post_layernorm.weight' has shape (31,), the model expects (32,)"),
        ("vision", "corrupt weights", "/model' cannot be read"),
        ("vision", "bad config", "is not a valid wemoe_clip_vision_model config: routing must be one of"),
        ("vision", "no weights", "has no model weights"),
        ("vision", "no code", "lacks the model code file modeling_wemoe.py"),
        ("vision", "no kernels", "lacks the model code file wemoe_ops.py"),
        ("full", "no kernels", "lacks the model code file wemoe_ops.py"),
        ("full", "no tokenizer", "full CLIP model without a tokenizer"),
    ],
)
def test_broken_folders_are_refused_before_any_request(world, hub_server, tmp_path, kind, how, message):
    folder = _break(shutil.copytree(world[kind], tmp_path / "model"), how)
    hub_server.clear_requests()
    with pytest.raises(WEMoEError) as error:
        push(folder, "testorg/broken")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert hub_server.requests == [] and not repo_exists(hub_server, "testorg/broken")


def test_code_check_follows_the_files_own_imports():
    """A folder saved before the kernels moved to wemoe_ops.py has no such file, and its model code needs none."""
    folder = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_ewemoe"
    assert not (folder / "wemoe_ops.py").exists()
    _check_code_files(folder, json.loads((folder / "config.json").read_text()))


def test_command_line(world, hub_server, tmp_path, capsys):
    assert main(["push", str(world["vision"]), "--repo-id", "testorg/push-cli", "-q", "--keep-card"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"{hub_server.url}/testorg/push-cli" and "(new repo)" in out[0]
    # --keep-card uploads the folder's own card (written for the folder name) unchanged.
    assert (
        hub_server.read_file("testorg/push-cli", "README.md") == (world["vision"] / "README.md").read_bytes()
    )
    assert main(["push", str(tmp_path / "missing"), "--repo-id", "testorg/push-cli"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "does not exist" in error and "\n" not in error


def test_merge_push_to_hub(world, hub_server, tmp_path, capsys):
    experts = ["--expert", f"blocks={world['blocks']}", "--expert", f"stripes={world['stripes']}"]
    base = ["merge", "-q", "--base", str(world["clip"]), *experts]
    # A malformed repo id is refused before merging.
    assert main([*base, "--output", str(tmp_path / "bad"), "--push-to-hub", "not a repo"]) == 2
    assert "invalid repo id" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    output = tmp_path / "wemoe-clip"
    assert main([*base, "--output", str(output), "--full-clip", "--push-to-hub", "testorg/merged"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("merged 2 experts") and out[1].startswith("pushed 13 files")
    assert repo_files(hub_server, "testorg/merged") == folder_files(output) | {".gitattributes"}
    card = ModelCard.load("testorg/merged")
    assert card.data.pipeline_tag == "zero-shot-image-classification" and "# testorg/merged" in card.text


def test_train_push_to_hub(hub_server, tmp_path, capsys):
    adaptation = make_adaptation_world(tmp_path / "world")
    tasks = {"blocks": str(adaptation["blocks"]), "stripes": str(adaptation["stripes"])}
    args = ["train", "-q", "--model", str(adaptation["wemoe"]), "--templates", "generic", "--steps", "2",
            "--batch-size-per-task", "4", "--output", str(tmp_path / "adapted"), "--push-to-hub", "testorg/adapted",
            *[f"--task={name}={dataset}" for name, dataset in tasks.items()]]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 0
    # The command composes the training workflow with the push: the last line is the push's.
    pushed = capsys.readouterr().out.strip().splitlines()[-1]
    assert pushed.startswith("pushed ") and f"{hub_server.url}/testorg/adapted " in pushed
    files = repo_files(hub_server, "testorg/adapted")
    assert {"eval_results.json", "routing.png", "README.md", "modeling_wemoe.py"} <= files
    results = json.loads(hub_server.read_file("testorg/adapted", "eval_results.json"))
    assert results["baselines"][0]["name"] == "before adaptation"
    assert results["datasets"] == tasks
    card = ModelCard.load("testorg/adapted")
    assert {r.dataset_name for r in card.data.eval_results} == {"blocks", "stripes"}
    assert "| before adaptation |" in card.text and "results on those tasks are transductive" in card.text
