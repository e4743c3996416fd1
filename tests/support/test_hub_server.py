"""Tests of the local Hub server (tests/hub_server.py) against real huggingface_hub, transformers and
datasets clients.

Clients run in subprocesses because ``HF_ENDPOINT`` must be set before ``huggingface_hub`` is imported;
protocol details (headers, status codes, atomicity) are checked with plain HTTP requests.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import importlib.util
import json
import os
import urllib.error
import urllib.request

import pytest

from hub_server import (
    RESULT_MARKER,
    HubServer,
    client_env,
    client_result,
    git_blob_oid,
    push_dataset_via_client,
    run_client,
    upload_folder_via_client,
)

BIG_SIZE = 10 * 1024 * 1024 + 17  # just over the size that makes a file go through LFS


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("hub")) as hub:
        yield hub


@pytest.fixture(scope="module")
def regular_server(tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("hub_regular"), force_regular=True) as hub:
        yield hub


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A saved tiny CLIPVisionModel, a fixed input and the model's output on it."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    root = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    model = CLIPVisionModel(config).eval()
    model.save_pretrained(root / "model")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(pixels, root / "pixels.pt")
    with torch.no_grad():
        expected = model(pixel_values=pixels).pooler_output
    return {"dir": root / "model", "pixels": root / "pixels.pt", "expected": expected}


def _http(
    server: HubServer, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None
) -> tuple[int, dict, bytes]:
    """One plain HTTP request; returns (status, headers, body) whatever the status."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(server.url + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _ndjson(*items: dict) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


# --------------------------------------------------------------------------------------------------- protocol


def test_resolve_headers_ranges_and_errors(server):
    text, weights = b"hello hub\n", os.urandom(3000)
    sha = server.commit_files("org/resolve", {"notes.txt": text, "w/model.safetensors": weights})
    assert server.files("org/resolve")["w/model.safetensors"]["lfs"] is True

    status, headers, body = _http(server, "HEAD", "/org/resolve/resolve/main/notes.txt")
    assert status == 200 and body == b""
    assert headers["X-Repo-Commit"] == sha
    assert headers["ETag"] == f'"{git_blob_oid(text)}"'
    assert headers["Content-Length"] == str(len(text))
    assert "X-Linked-Etag" not in headers and "X-Xet-Hash" not in headers

    # LFS file, revision given as a short commit id.
    status, headers, body = _http(server, "GET", f"/org/resolve/resolve/{sha[:7]}/w/model.safetensors")
    assert status == 200 and body == weights
    assert headers["X-Linked-Etag"] == f'"{hashlib.sha256(weights).hexdigest()}"'
    assert headers["X-Linked-Size"] == str(len(weights)) and headers["X-Repo-Commit"] == sha

    status, headers, body = _http(
        server, "GET", "/org/resolve/resolve/main/w/model.safetensors", headers={"Range": "bytes=100-"}
    )
    assert status == 206 and body == weights[100:]
    assert headers["Content-Range"] == f"bytes 100-{len(weights) - 1}/{len(weights)}"
    status, _, body = _http(
        server, "GET", "/org/resolve/resolve/main/notes.txt", headers={"Range": "bytes=-3"}
    )
    assert status == 206 and body == text[-3:]
    status, headers, _ = _http(
        server, "GET", "/org/resolve/resolve/main/notes.txt", headers={"Range": "bytes=99-"}
    )
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(text)}"

    status, headers, _ = _http(server, "HEAD", "/org/resolve/resolve/main/missing.json")
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound" and headers["X-Repo-Commit"] == sha
    status, headers, _ = _http(server, "HEAD", "/org/resolve/resolve/nobranch/notes.txt")
    assert status == 404 and headers["X-Error-Code"] == "RevisionNotFound"
    status, headers, _ = _http(server, "HEAD", "/org/nothere/resolve/main/notes.txt")
    assert status == 404 and headers["X-Error-Code"] == "RepoNotFound"
    status, headers, _ = _http(server, "GET", "/api/agent-harnesses")
    assert status == 404


def test_preupload_modes(server, regular_server):
    files = [
        {"path": "config.json", "size": 10, "sample": base64.b64encode(b'{"a": 1}').decode()},
        {"path": "model.safetensors", "size": 10, "sample": base64.b64encode(b"text-like").decode()},
        {"path": "big.txt", "size": BIG_SIZE, "sample": base64.b64encode(b"aaaa").decode()},
        {"path": "blob.dat", "size": 4, "sample": base64.b64encode(b"\0\1\2\3").decode()},
    ]
    modes = {}
    for hub in (server, regular_server):
        hub.create_repo("org/pre")
        status, _, body = _http(hub, "POST", "/api/models/org/pre/preupload/main", {"files": files})
        assert status == 200
        modes[hub] = {f["path"]: f["uploadMode"] for f in json.loads(body)["files"]}
    assert modes[server] == {
        "config.json": "regular",
        "model.safetensors": "lfs",
        "big.txt": "lfs",
        "blob.dat": "lfs",
    }
    assert set(modes[regular_server].values()) == {"regular"}
    status, headers, _ = _http(server, "POST", "/api/models/org/pre/preupload/nobranch", {"files": files})
    assert status == 404 and headers["X-Error-Code"] == "RevisionNotFound"


def test_lfs_upload_checks_sha256_and_commits_are_atomic(server):
    server.create_repo("org/atomic")
    head = server.head("org/atomic")
    content = os.urandom(2048)
    oid = hashlib.sha256(content).hexdigest()
    batch = {"operation": "upload", "objects": [{"oid": oid, "size": len(content)}], "transfers": ["basic"]}
    status, _, body = _http(server, "POST", "/org/atomic.git/info/lfs/objects/batch", batch)
    assert status == 200
    href = json.loads(body)["objects"][0]["actions"]["upload"]["href"]
    status, _, _ = _http(server, "PUT", href[len(server.url) :], content[:-1] + b"x")
    assert status == 400 and not server.store.has_blob(oid)

    # A commit referencing the never-uploaded object fails as a whole: the regular file is not added.
    header = {"key": "header", "value": {"summary": "add", "description": ""}}
    regular = {
        "key": "file",
        "value": {"path": "a.txt", "content": base64.b64encode(b"a").decode(), "encoding": "base64"},
    }
    lfs = {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": oid, "size": len(content)}}
    ndjson = {"Content-Type": "application/x-ndjson"}
    status, _, body = _http(
        server, "POST", "/api/models/org/atomic/commit/main", _ndjson(header, regular, lfs), ndjson
    )
    assert status == 400 and b"never uploaded" in body
    assert server.head("org/atomic") == head and "a.txt" not in server.files("org/atomic")

    status, _, _ = _http(server, "PUT", href[len(server.url) :], content)
    assert status == 200 and server.store.has_blob(oid, len(content))
    status, _, body = _http(
        server, "POST", "/api/models/org/atomic/commit/main", _ndjson(header, regular, lfs), ndjson
    )
    assert status == 200
    new_head = json.loads(body)["commitOid"]
    assert server.head("org/atomic") == new_head != head
    assert server.read_file("org/atomic", "w.bin") == content

    # The object is known now: the batch endpoint asks for no upload.
    status, _, body = _http(server, "POST", "/org/atomic.git/info/lfs/objects/batch", batch)
    assert "actions" not in json.loads(body)["objects"][0]

    # A stale parent commit and deleting a missing file are refused without side effects.
    stale = {"key": "header", "value": {"summary": "x", "parentCommit": head}}
    status, _, _ = _http(
        server, "POST", "/api/models/org/atomic/commit/main", _ndjson(stale, regular), ndjson
    )
    assert status == 412
    delete = {"key": "deletedFile", "value": {"path": "nope.txt"}}
    status, headers, _ = _http(
        server, "POST", "/api/models/org/atomic/commit/main", _ndjson(header, delete), ndjson
    )
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound"
    assert server.head("org/atomic") == new_head


def test_chunked_request_body(server):
    """Bodies sent with chunked transfer encoding (streamed uploads) are read in full."""
    content = os.urandom(70_000)
    oid = hashlib.sha256(content).hexdigest()
    connection = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=30)
    try:
        pieces = (content[i : i + 9000] for i in range(0, len(content), 9000))
        connection.request("PUT", f"/lfs-objects/{oid}", body=pieces, encode_chunked=True)
        response = connection.getresponse()
        response.read()
        assert response.status == 200
        # The same connection stays usable for the next request.
        connection.request("GET", f"/lfs-objects/{oid}")
        response = connection.getresponse()
        assert response.status == 200 and response.read() == content
    finally:
        connection.close()


def test_branches_from_commits(server):
    """Commits to an unknown branch fail as on the Hub, unless the server auto-creates branches."""
    main = server.commit_files("org/branches", {"a.txt": b"main"})
    header = {"key": "header", "value": {"summary": "on dev"}}
    add = {"key": "file", "value": {"path": "a.txt", "content": base64.b64encode(b"dev").decode()}}
    path = "/api/models/org/branches/commit/dev"
    status, headers, _ = _http(server, "POST", path, _ndjson(header, add))
    assert status == 404 and headers["X-Error-Code"] == "RevisionNotFound"
    server.auto_create_branches = True
    try:
        status, _, body = _http(server, "POST", path, _ndjson(header, add))
    finally:
        server.auto_create_branches = False
    assert status == 200
    dev = json.loads(body)["commitOid"]
    assert server.store.get_repo("model", "org/branches")["commits"][dev]["parent"] == main
    assert server.read_file("org/branches", "a.txt", revision="dev") == b"dev"
    assert server.read_file("org/branches", "a.txt", revision=main[:10]) == b"main"
    status, _, body = _http(server, "GET", "/api/models/org/branches/refs")
    assert {b["name"]: b["targetCommit"] for b in json.loads(body)["branches"]} == {"main": main, "dev": dev}


def test_validate_yaml(server):
    good = "---\nlicense: apache-2.0\ntags: [merge]\nbase_model: [a/b, c/d]\n---\n# Card\n"
    bad_yaml = "---\ntags: [unclosed\n---\n"
    bad_index = "---\nmodel-index:\n- name: m\n  results:\n  - task: {type: x}\n---\n"
    status, _, body = _http(server, "POST", "/api/validate-yaml", {"content": good, "repoType": "model"})
    assert status == 200 and json.loads(body)["errors"] == []
    for content in (bad_yaml, bad_index):
        status, _, body = _http(
            server, "POST", "/api/validate-yaml", {"content": content, "repoType": "model"}
        )
        assert status == 400 and json.loads(body)["errors"]


def test_tokens_and_persistence(tmp_path):
    with HubServer(tmp_path / "hub", require_token=True, tokens={"good"}) as hub:
        assert _http(hub, "GET", "/api/whoami-v2")[0] == 401
        assert _http(hub, "GET", "/api/whoami-v2", headers={"Authorization": "Bearer bad"})[0] == 401
        status, _, body = _http(hub, "GET", "/api/whoami-v2", headers={"Authorization": "Bearer good"})
        assert status == 200 and json.loads(body)["name"] == "testuser"
        create = {"name": "kept", "organization": "org", "type": "dataset", "visibility": "private"}
        assert _http(hub, "POST", "/api/repos/create", create)[0] == 401
        assert _http(hub, "POST", "/api/repos/create", create, {"Authorization": "Bearer good"})[0] == 200
        # Private repos are hidden from anonymous readers.
        status, headers, _ = _http(hub, "GET", "/api/datasets/org/kept")
        assert status == 401 and headers["X-Error-Code"] == "RepoNotFound"
        sha = hub.head("org/kept", repo_type="dataset")
    with HubServer(tmp_path / "hub") as hub:  # state survives a restart on the same folder
        status, _, body = _http(hub, "GET", "/api/datasets/org/kept", headers={"Authorization": "Bearer x"})
        assert status == 200 and json.loads(body)["sha"] == sha and json.loads(body)["private"] is True


def test_fault_injection_and_request_log(server):
    server.commit_files("org/faults", {"a.txt": b"a"})
    server.clear_requests()
    server.inject_failures("/org/faults/resolve/", 503, count=2, method="GET")
    statuses = [_http(server, "GET", "/org/faults/resolve/main/a.txt")[0] for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert _http(server, "HEAD", "/org/faults/resolve/main/a.txt")[0] == 200
    assert server.requests == [("GET", "/org/faults/resolve/main/a.txt")] * 3 + [
        ("HEAD", "/org/faults/resolve/main/a.txt")
    ]
    assert [s for _, _, s in server.responses] == [503, 503, 200, 200]


# --------------------------------------------------------------------------------------------------- real clients


def test_hub_client_api(server, tmp_path):
    env = client_env(server, tmp_path / "home", disable_xet=True)
    code = f"""
        import json
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
        )
        api = HfApi()
        out = {{}}
        out["whoami"] = api.whoami()["name"]
        out["url"] = str(api.create_repo("org/api", private=True))
        try:
            api.create_repo("org/api")
        except HfHubHTTPError as e:
            out["duplicate"] = e.response.status_code
        api.create_repo("org/api", exist_ok=True)
        out["private"] = api.model_info("org/api").private
        api.upload_file(path_or_fileobj=b"main", path_in_repo="f.txt", repo_id="org/api")
        api.create_branch("org/api", branch="dev")
        api.upload_file(path_or_fileobj=b"dev", path_in_repo="f.txt", repo_id="org/api", revision="dev")
        out["main"] = open(hf_hub_download("org/api", "f.txt"), "rb").read().decode()
        out["dev"] = open(hf_hub_download("org/api", "f.txt", revision="dev"), "rb").read().decode()
        refs = api.list_repo_refs("org/api")
        out["branches"] = sorted(b.name for b in refs.branches)
        out["commits"] = [c.title for c in api.list_repo_commits("org/api", revision="dev")]
        out["paths"] = [p.path for p in api.get_paths_info("org/api", ["f.txt", "nope"])]
        out["exists"] = [api.file_exists("org/api", "f.txt"), api.file_exists("org/api", "nope")]
        for name, call in [
            ("missing_repo", lambda: api.model_info("org/unknown")),
            ("missing_repo_file", lambda: hf_hub_download("org/unknown", "config.json")),
            ("missing_revision", lambda: hf_hub_download("org/api", "f.txt", revision="nobranch")),
            ("missing_file", lambda: hf_hub_download("org/api", "adapter_config.json")),
        ]:
            try:
                call()
            except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
                out[name] = type(e).__name__
        api.delete_repo("org/api")
        out["deleted"] = not api.repo_exists("org/api")
        print({RESULT_MARKER!r} + json.dumps(out))
    """
    out = client_result(run_client(code, env))
    assert out["whoami"] == "testuser"
    assert out["url"] == f"{server.url}/org/api"
    assert out["duplicate"] == 409 and out["private"] is True
    assert (out["main"], out["dev"]) == ("main", "dev")
    assert out["branches"] == ["dev", "main"]
    assert out["commits"][-1] == "initial commit" and len(out["commits"]) == 3
    assert out["paths"] == ["f.txt"] and out["exists"] == [True, False]
    assert out["missing_repo"] == out["missing_repo_file"] == "RepositoryNotFoundError"
    assert out["missing_revision"] == "RevisionNotFoundError"
    assert out["missing_file"] == "RemoteEntryNotFoundError"
    assert out["deleted"] is True


_LOAD_AND_RUN = """
    import json, torch
    from transformers import CLIPVisionModel
    def run(repo, **kwargs):
        model = CLIPVisionModel.from_pretrained(repo, **kwargs).eval()
        with torch.no_grad():
            return model(pixel_values=torch.load({pixels!r})).pooler_output
"""


def test_model_roundtrip_through_lfs(server, tiny_clip, tmp_path):
    """Xet disabled: weights go through the LFS batch API; old revisions stay readable."""
    import torch

    folder = tmp_path / "upload"
    folder.mkdir()
    for file in tiny_clip["dir"].iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    (folder / "notes.txt").write_text("first version\n")
    big = (b"0123456789abcdef" * (BIG_SIZE // 16 + 1))[:BIG_SIZE]
    (folder / "big.txt").write_bytes(big)
    env = client_env(server, tmp_path / "home", disable_xet=True)

    first = upload_folder_via_client(env, "org/clip", folder)
    files = server.files("org/clip")
    assert files["model.safetensors"]["lfs"] and files["big.txt"]["lfs"] and not files["config.json"]["lfs"]
    assert any(m == "PUT" and p.startswith("/lfs-objects/") for m, p in server.requests)
    second = run_client(
        """
        from huggingface_hub import HfApi
        print(HfApi().delete_file("notes.txt", repo_id="org/clip").oid)
        """,
        env,
    ).stdout.split()[-1]
    assert server.head("org/clip") == second != first

    server.clear_requests()
    code = (
        _LOAD_AND_RUN.format(pixels=str(tiny_clip["pixels"]))
        + f"""
    import hashlib
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError
    torch.save({{"main": run("org/clip"), "first": run("org/clip", revision={first!r})}}, {str(tmp_path / "out.pt")!r})
    out = {{}}
    old = snapshot_download("org/clip", revision={first!r})
    out["old_notes"] = open(old + "/notes.txt").read()
    out["short_sha"] = open(hf_hub_download("org/clip", "notes.txt", revision={first[:7]!r})).read()
    out["big_sha256"] = hashlib.sha256(open(hf_hub_download("org/clip", "big.txt"), "rb").read()).hexdigest()
    try:
        hf_hub_download("org/clip", "notes.txt")
    except EntryNotFoundError as e:
        out["deleted"] = type(e).__name__
    print({RESULT_MARKER!r} + json.dumps(out))
    """
    )
    out = client_result(run_client(code, env))
    outputs = torch.load(tmp_path / "out.pt")
    assert torch.equal(outputs["main"], tiny_clip["expected"])
    assert torch.equal(outputs["first"], tiny_clip["expected"])
    assert out["old_notes"] == out["short_sha"] == "first version\n"
    assert out["big_sha256"] == hashlib.sha256(big).hexdigest()
    assert out["deleted"] == "RemoteEntryNotFoundError"
    # transformers probes optional files and gets EntryNotFound answers it tolerates.
    if (
        importlib.util.find_spec("peft") is not None
    ):  # transformers probes for an adapter only with peft installed
        assert any(p.endswith("/adapter_config.json") and status == 404 for _, p, status in server.responses)


def test_model_roundtrip_with_xet_client_and_regular_server(regular_server, tiny_clip, tmp_path):
    """Xet left on in the client: a force-regular server keeps every file out of Xet."""
    import torch

    env = client_env(regular_server, tmp_path / "home")
    assert "HF_HUB_DISABLE_XET" not in env
    code = (
        _LOAD_AND_RUN.format(pixels=str(tiny_clip["pixels"]))
        + f"""
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo("org/clip")
    info = api.upload_folder(repo_id="org/clip", folder_path={str(tiny_clip["dir"])!r})
    torch.save(run("org/clip"), {str(tmp_path / "out.pt")!r})
    print({RESULT_MARKER!r} + json.dumps(info.oid))
    """
    )
    sha = client_result(run_client(code, env))
    assert regular_server.head("org/clip") == sha
    assert regular_server.files("org/clip")["model.safetensors"]["lfs"] is False
    assert not any("/info/lfs/" in path for _, path in regular_server.requests)
    assert torch.equal(torch.load(tmp_path / "out.pt"), tiny_clip["expected"])


def test_xet_client_fails_fast_on_lfs_server(server, tmp_path):
    """Without force_regular, a Xet-enabled client asks for a Xet token and gets a clear 501."""
    code = """
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo("org/xet")
        api.upload_file(path_or_fileobj=bytes(100), path_in_repo="w.bin", repo_id="org/xet")
    """
    proc = run_client(code, client_env(server, tmp_path / "home"), check=False, timeout=60)
    assert proc.returncode != 0
    assert ("GET", "/api/models/org/xet/xet-write-token/main", 501) in server.responses


def test_dataset_push_and_load(server, tmp_path):
    env = client_env(server, tmp_path / "home", disable_xet=True)
    columns = {"x": [1, 2, 3, 4], "label": ["a", "b", "a", "c"]}
    sha = push_dataset_via_client(env, "org/ds", columns)
    files = server.files("org/ds", repo_type="dataset")
    parquet = [p for p in files if p.endswith(".parquet")]
    assert len(parquet) == 1 and files[parquet[0]]["lfs"] and "README.md" in files
    code = f"""
        import json, datasets
        ds = datasets.load_dataset("org/ds")
        pinned = datasets.load_dataset("org/ds", split="train", revision={sha!r})
        print({RESULT_MARKER!r} + json.dumps([ds["train"].to_dict(), pinned.to_dict(), list(ds)]))
    """
    loaded, pinned, splits = client_result(run_client(code, env))
    assert loaded == pinned == columns and splits == ["train"]
    assert any(m == "GET" and p.endswith(".parquet") for m, p in server.requests)


def test_client_retries_injected_failures(server, tmp_path):
    env = client_env(server, tmp_path / "home", disable_xet=True)
    server.create_repo("org/retry")
    server.clear_requests()
    # Transient errors on calls the client retries, then one on a call it does not retry.
    server.inject_failures("/api/models/org/retry/preupload/", 503)
    server.inject_failures("/lfs-objects/", 500, method="PUT")
    server.inject_failures("/org/retry/resolve/main/w.bin", 429, method="GET")
    code = f"""
        import json
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError
        api = HfApi()
        api.upload_file(path_or_fileobj=bytes(range(256)) * 4, path_in_repo="w.bin", repo_id="org/retry")
        ok = open(hf_hub_download("org/retry", "w.bin"), "rb").read() == bytes(range(256)) * 4
        status = None
        try:  # repo info is not retried: the error reaches the caller
            api.model_info("org/retry")
        except HfHubHTTPError as e:
            status = e.response.status_code
        print({RESULT_MARKER!r} + json.dumps([ok, status]))
    """
    server.inject_failures("/api/models/org/retry", 500, method="GET")
    ok, status = client_result(run_client(code, env))
    assert ok is True and status == 500
    calls = list(server.requests)
    assert calls.count(("POST", "/api/models/org/retry/preupload/main")) == 2
    assert sum(m == "PUT" and p.startswith("/lfs-objects/") for m, p in calls) == 2
    assert calls.count(("GET", "/org/retry/resolve/main/w.bin")) == 2
    assert server.read_file("org/retry", "w.bin") == bytes(range(256)) * 4
