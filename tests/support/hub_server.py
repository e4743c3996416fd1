"""A local Hugging Face Hub-compatible HTTP server for tests.

The server speaks the subset of the Hub HTTP API that ``huggingface_hub``, ``transformers`` and
``datasets`` use to create repos, upload files (regular and Git LFS; not Xet), and download them
again. It keeps real commits (40-hex ids, parents, a flat file tree per commit), branches and tags,
and stores file content by sha256 under ``root_dir``. It uses the standard library only (PyYAML is
used when importable, to validate model card metadata).

Typical use in a test::

    with HubServer(tmp_path / "hub") as server:
        env = client_env(server, tmp_path / "hf_home")
        run_client("from huggingface_hub import HfApi; HfApi().create_repo('org/name')", env)

``HF_ENDPOINT`` must be set before ``huggingface_hub`` is imported, which is why client code is run in
subprocesses here (see :func:`client_env` and :func:`run_client`).

Manual use: ``python tests/hub_server.py --root DIR --port N`` prints the server URL and serves until
interrupted.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import fnmatch
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import threading
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

USER = "testuser"
ORGS = ("testorg",)
DEFAULT_TOKEN = "hf_test_token"

# Plural names used in API paths -> repo types, and URL prefixes of resolve paths per repo type.
API_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}

# Files at least this large are answered `uploadMode: "lfs"` in preupload (the Hub uses 10 MB).
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024

# `.gitattributes` of a freshly created repo: binary and data formats go through LFS.
_LFS_EXTENSIONS = (
    "7z arrow bin bz2 ckpt ftz gz h5 joblib mlmodel model msgpack npy npz onnx ot parquet pb pickle pkl "
    "pt pth rar safetensors tar tflite tgz wasm xz zip zst"
).split()
DEFAULT_GITATTRIBUTES = "".join(
    f"*.{ext} filter=lfs diff=lfs merge=lfs -text\n" for ext in _LFS_EXTENSIONS
) + ("*tfevents* filter=lfs diff=lfs merge=lfs -text\n")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA_RE = re.compile(r"^[0-9a-f]{7,40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1024 * 1024


# --------------------------------------------------------------------------------------------------- helpers


def git_blob_oid(content: bytes) -> str:
    """Git object id of a blob with this content (what the Hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """Content of the Git LFS pointer file that stands in the git tree for an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now_iso() -> str:
    now = _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _gitattributes_lfs_patterns(text: str) -> list[str]:
    patterns = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and "filter=lfs" in parts[1:]:
            patterns.append(parts[0])
    return patterns


def _matches(path: str, pattern: str) -> bool:
    """Approximate gitattributes/gitignore matching: patterns without '/' match the file name."""
    pattern = pattern.lstrip("/")
    if pattern.endswith("/"):
        return path.startswith(pattern) or f"/{pattern}" in f"/{path}"
    if "/" not in pattern:
        return fnmatch.fnmatch(path.rsplit("/", 1)[-1], pattern)
    return fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.replace("**/", ""))


def _valid_path(path: Any) -> bool:
    if not isinstance(path, str) or not path or path.startswith("/") or path.endswith("/"):
        return False
    parts = path.split("/")
    return all(p not in ("", ".", "..") for p in parts) and parts[0] != ".git"


def _front_matter(text: str) -> str | None:
    """YAML front matter of a model/dataset card, or None when the card has none."""
    lines = text.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for i in range(1, len(lines)):
        if lines[i].strip() == "---":
            return "\n".join(lines[1:i])
    return None


def _validate_card_metadata(content: str) -> list[str]:
    """Errors the Hub would report for the YAML metadata of a card (empty when valid)."""
    block = _front_matter(content)
    if block is None:
        return []
    try:
        import yaml
    except ImportError:  # without PyYAML only the front matter delimiters are checked
        return []
    try:
        data = yaml.safe_load(block)
    except yaml.YAMLError as e:
        return [f"Invalid YAML in README.md metadata: {e}".replace("\n", " ")]
    if data is None:
        return []
    if not isinstance(data, dict):
        return ["README.md metadata must be a YAML mapping"]
    errors = []
    for key in ("tags", "datasets", "base_model", "language", "metrics", "license", "pipeline_tag"):
        value = data.get(key)
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        if key in ("license", "pipeline_tag") and isinstance(value, list):
            errors.append(f'"{key}" must be a string')
        elif not all(isinstance(v, str) for v in items):
            errors.append(f'"{key}" must be a string or a list of strings')
    index = data.get("model-index")
    if index is not None:
        errors.extend(_validate_model_index(index))
    return errors


def _validate_model_index(index: Any) -> list[str]:
    if not isinstance(index, list):
        return ['"model-index" must be a list']
    errors = []
    for i, model in enumerate(index):
        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            errors.append(f'"model-index[{i}].name" must be a string')
            continue
        results = model.get("results")
        if not isinstance(results, list):
            errors.append(f'"model-index[{i}].results" must be a list')
            continue
        for j, result in enumerate(results):
            where = f"model-index[{i}].results[{j}]"
            if not isinstance(result, dict):
                errors.append(f'"{where}" must be a mapping')
                continue
            task, dataset, metrics = result.get("task"), result.get("dataset"), result.get("metrics")
            if not isinstance(task, dict) or not isinstance(task.get("type"), str):
                errors.append(f'"{where}.task.type" must be a string')
            if not isinstance(dataset, dict) or not all(
                isinstance(dataset.get(k), str) for k in ("type", "name")
            ):
                errors.append(f'"{where}.dataset" must have string "type" and "name"')
            if not isinstance(metrics, list) or not metrics:
                errors.append(f'"{where}.metrics" must be a non-empty list')
                continue
            for k, metric in enumerate(metrics):
                if (
                    not isinstance(metric, dict)
                    or not isinstance(metric.get("type"), str)
                    or "value" not in metric
                ):
                    errors.append(f'"{where}.metrics[{k}]" must have a string "type" and a "value"')
    return errors


class HubError(Exception):
    """An HTTP error answer: status, message, optional `X-Error-Code`, extra headers and body fields."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


@dataclass
class _Failure:
    substring: str
    status: int
    remaining: int
    method: str | None
    headers: dict[str, str]


# --------------------------------------------------------------------------------------------------- storage


class HubStore:
    """Repos, commits, refs and content-addressed blobs, persisted under ``root_dir``.

    Repo state (small) lives in ``state.json``; file content lives in ``blobs/<sha256[:2]>/<sha256>``.
    Every public method is thread-safe.
    """

    def __init__(self, root_dir: str | os.PathLike) -> None:
        self.root = Path(root_dir)
        self.blob_dir = self.root / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        self.lock = threading.RLock()
        self._state_file = self.root / "state.json"
        self.repos: dict[str, dict] = {}
        if self._state_file.exists():
            self.repos = json.loads(self._state_file.read_text())["repos"]

    # ---------------------------------------------------------------- blobs

    def blob_path(self, sha256: str) -> Path:
        return self.blob_dir / sha256[:2] / sha256

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        if not _SHA256_RE.match(sha256 or ""):
            return False
        path = self.blob_path(sha256)
        return path.exists() and (size is None or path.stat().st_size == size)

    def put_bytes(self, content: bytes) -> str:
        sha256 = hashlib.sha256(content).hexdigest()
        if not self.has_blob(sha256):
            tmp = self._tmp_file()
            with tmp:
                tmp.write(content)
            self._install(tmp.name, sha256)
        return sha256

    def put_stream(self, chunks: Iterable[bytes], expected_sha256: str, expected_size: int | None) -> None:
        """Store streamed content, refusing it when its sha256 or size is not the announced one."""
        digest, size = hashlib.sha256(), 0
        tmp = self._tmp_file()
        try:
            with tmp:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    tmp.write(chunk)
            if digest.hexdigest() != expected_sha256:
                raise HubError(
                    400, f"sha256 of the uploaded content is {digest.hexdigest()}, not {expected_sha256}"
                )
            if expected_size is not None and size != expected_size:
                raise HubError(
                    400, f"uploaded {size} bytes for object {expected_sha256}, expected {expected_size}"
                )
            self._install(tmp.name, expected_sha256)
        finally:
            if os.path.exists(tmp.name):
                os.unlink(tmp.name)

    def _tmp_file(self):
        return tempfile.NamedTemporaryFile(dir=self.root / "tmp", delete=False)

    def _install(self, tmp_name: str, sha256: str) -> None:
        target = self.blob_path(sha256)
        target.parent.mkdir(exist_ok=True)
        os.replace(tmp_name, target)

    # ---------------------------------------------------------------- repos

    @staticmethod
    def key(repo_type: str, repo_id: str) -> str:
        return f"{repo_type}:{repo_id}"

    def save(self) -> None:
        with self.lock:
            tmp = self._state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"repos": self.repos}))
            os.replace(tmp, self._state_file)

    def get_repo(self, repo_type: str, repo_id: str) -> dict:
        repo = self.repos.get(self.key(repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def create_repo(self, repo_type: str, repo_id: str, private: bool = False) -> bool:
        """Create a repo with an initial commit holding `.gitattributes`; False if it already exists."""
        namespace, _, name = repo_id.partition("/")
        if not (_NAME_RE.match(namespace) and _NAME_RE.match(name)) or "--" in name or ".." in name:
            raise HubError(400, f"Invalid repo name {repo_id!r}")
        if repo_type not in URL_PREFIXES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        with self.lock:
            if self.key(repo_type, repo_id) in self.repos:
                return False
            self.repos[self.key(repo_type, repo_id)] = {
                "type": repo_type,
                "id": repo_id,
                "private": bool(private),
                "created_at": _now_iso(),
                "branches": {},
                "tags": {},
                "commits": {},
            }
            content = DEFAULT_GITATTRIBUTES.encode()
            entry = self._regular_entry(content, self.put_bytes(content))
            self._add_commit(
                self.repos[self.key(repo_type, repo_id)],
                "main",
                None,
                {".gitattributes": entry},
                "initial commit",
                "",
            )
            self.save()
            return True

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self.lock:
            self.get_repo(repo_type, repo_id)
            del self.repos[self.key(repo_type, repo_id)]
            self.save()

    def move_repo(self, repo_type: str, from_id: str, to_id: str) -> None:
        with self.lock:
            repo = self.get_repo(repo_type, from_id)
            if self.key(repo_type, to_id) in self.repos:
                raise HubError(409, f"Repository {to_id} already exists")
            del self.repos[self.key(repo_type, from_id)]
            repo["id"] = to_id
            self.repos[self.key(repo_type, to_id)] = repo
            self.save()

    # ---------------------------------------------------------------- revisions

    def resolve(self, repo: dict, revision: str) -> str:
        """Full commit id of a branch, tag, full commit id or unique commit id prefix (>= 7 chars)."""
        if revision in repo["branches"]:
            return repo["branches"][revision]
        if revision in repo["tags"]:
            return repo["tags"][revision]
        if _SHA_RE.match(revision):
            matches = [sha for sha in list(repo["commits"]) if sha.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def tree(self, repo: dict, sha: str) -> dict[str, dict]:
        return repo["commits"][sha]["tree"]

    def history(self, repo: dict, sha: str) -> list[dict]:
        commits = []
        while sha is not None:
            commits.append(repo["commits"][sha])
            sha = repo["commits"][sha]["parent"]
        return commits

    def create_branch(self, repo: dict, branch: str, starting_point: str | None) -> None:
        if not branch or branch.startswith("refs/") or not re.match(r"^[A-Za-z0-9._/-]+$", branch):
            raise HubError(400, f"Invalid branch name {branch!r}")
        with self.lock:
            if branch in repo["branches"]:
                raise HubError(409, f"Branch {branch} already exists")
            repo["branches"][branch] = self.resolve(repo, starting_point or "main")
            self.save()

    def delete_branch(self, repo: dict, branch: str) -> None:
        with self.lock:
            if branch not in repo["branches"]:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if branch == "main":
                raise HubError(403, "Cannot delete the default branch")
            del repo["branches"][branch]
            self.save()

    def create_tag(self, repo: dict, tag: str, revision: str) -> None:
        with self.lock:
            if tag in repo["tags"] or tag in repo["branches"]:
                raise HubError(409, f"Tag {tag} already exists")
            repo["tags"][tag] = self.resolve(repo, revision)
            self.save()

    def delete_tag(self, repo: dict, tag: str) -> None:
        with self.lock:
            if tag not in repo["tags"]:
                raise HubError(404, f"Invalid rev id: {tag}", "RevisionNotFound")
            del repo["tags"][tag]
            self.save()

    # ---------------------------------------------------------------- commits

    @staticmethod
    def _regular_entry(content: bytes, sha256: str) -> dict:
        return {"sha256": sha256, "size": len(content), "lfs": False, "oid": git_blob_oid(content)}

    @staticmethod
    def _lfs_entry(sha256: str, size: int) -> dict:
        return {"sha256": sha256, "size": size, "lfs": True, "oid": git_blob_oid(lfs_pointer(sha256, size))}

    def _add_commit(
        self, repo: dict, branch: str, parent: str | None, tree: dict, title: str, message: str
    ) -> str:
        date = _now_iso()
        payload = json.dumps(
            [repo["id"], parent, sorted(tree.items()), title, message, date, os.urandom(8).hex()]
        )
        sha = hashlib.sha1(payload.encode()).hexdigest()
        repo["commits"][sha] = {
            "id": sha,
            "parent": parent,
            "tree": tree,
            "title": title,
            "message": message,
            "date": date,
            "author": USER,
        }
        repo["branches"][branch] = sha
        return sha

    def commit(
        self,
        repo_type: str,
        repo_id: str,
        branch: str,
        operations: list[dict],
        *,
        title: str,
        message: str = "",
        parent_commit: str | None = None,
        create_branch: bool = False,
    ) -> str:
        """Apply operations atomically as one commit on `branch`; returns the new commit id.

        Operations are dicts with a `key` of `file` (`path`, `content` bytes), `lfsFile` (`path`, `oid`,
        optional `size`), `deletedFile` or `deletedFolder` (`path`). Everything is validated before
        anything is written: a failing commit leaves the repo untouched.
        """
        with self.lock:
            repo = self.get_repo(repo_type, repo_id)
            if branch not in repo["branches"]:
                if branch in repo["tags"] or _SHA_RE.match(branch):
                    raise HubError(400, f"Cannot commit to {branch!r}: commits must target a branch")
                if not create_branch:
                    raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
                head = repo["branches"]["main"]
            else:
                head = repo["branches"][branch]
            if parent_commit is not None and parent_commit != head:
                raise HubError(
                    412, f"A commit has happened since {parent_commit}: the head of {branch} is now {head}"
                )
            tree = dict(self.tree(repo, head))
            new_content: list[bytes] = []
            for op in operations:
                key, path = op.get("key"), op.get("path")
                if key in ("file", "lfsFile"):
                    if not _valid_path(path):
                        raise HubError(400, f"Invalid path in repo: {path!r}")
                    if any(p.startswith(path + "/") for p in tree):
                        raise HubError(400, f"Cannot add file {path!r}: a folder with that name exists")
                    for i in range(1, path.count("/") + 1):
                        if path.rsplit("/", i)[0] in tree:
                            raise HubError(
                                400, f"Cannot add file {path!r}: {path.rsplit('/', i)[0]!r} is a file"
                            )
                if key == "file":
                    content = op["content"]
                    new_content.append(content)
                    tree[path] = self._regular_entry(content, hashlib.sha256(content).hexdigest())
                elif key == "lfsFile":
                    oid, size = op.get("oid"), op.get("size")
                    if not self.has_blob(oid or ""):
                        raise HubError(
                            400,
                            f"LFS object {oid} for {path!r} was never uploaded: upload it before committing",
                        )
                    actual = self.blob_path(oid).stat().st_size
                    if size is not None and size != actual:
                        raise HubError(400, f"LFS object {oid} for {path!r} has size {actual}, not {size}")
                    tree[path] = self._lfs_entry(oid, actual)
                elif key == "deletedFile":
                    if path not in tree:
                        raise HubError(
                            404,
                            f"A file with this name doesn't exist: {path!r}",
                            "EntryNotFound",
                            {"X-Repo-Commit": head},
                        )
                    del tree[path]
                elif key == "deletedFolder":
                    prefix = str(path or "").rstrip("/") + "/"
                    inside = [p for p in tree if p.startswith(prefix)] if prefix != "/" else list(tree)
                    if not inside:
                        raise HubError(
                            404,
                            f"A folder with this name doesn't exist: {path!r}",
                            "EntryNotFound",
                            {"X-Repo-Commit": head},
                        )
                    for p in inside:
                        del tree[p]
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            for content in new_content:
                self.put_bytes(content)
            sha = self._add_commit(repo, branch, head, tree, title, message)
            self.save()
            return sha


# --------------------------------------------------------------------------------------------------- HTTP


class _Response:
    def __init__(
        self,
        status: int = 200,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        file: Path | None = None,
        file_range: tuple[int, int] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = dict(headers or {})
        self.file = file
        self.file_range = file_range


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> _Response:
    return _Response(
        status,
        json.dumps(data, default=str).encode(),
        {"Content-Type": "application/json", **(headers or {})},
    )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hf-wemoe-test-hub/1.0"
    timeout = 300
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.hub.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # ---------------------------------------------------------------- body

    def _body_chunks(self) -> Iterable[bytes]:
        """Yield the request body (Content-Length or chunked) once; later calls yield nothing."""
        if self._body_state != "unread":
            return
        self._body_state = "reading"
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                data = self.rfile.read(size)
                self.rfile.readline()
                yield data
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                data = self.rfile.read(min(_CHUNK, remaining))
                if not data:
                    break
                remaining -= len(data)
                yield data
        self._body_state = "done"

    def body(self) -> bytes:
        return b"".join(self._body_chunks())

    def json_body(self) -> Any:
        raw = self.body()
        try:
            return json.loads(raw) if raw else {}
        except ValueError as e:
            raise HubError(400, f"Request body is not valid JSON: {e}") from e

    # ---------------------------------------------------------------- dispatch

    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        self._body_state = "unread"
        split = urlsplit(self.path)
        self.query = {k: v for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        raw_path = split.path
        hub._record(method, raw_path)
        failure = hub._take_failure(method, raw_path)
        try:
            if failure is not None:
                raise HubError(
                    failure.status, f"Injected failure ({failure.status})", headers=failure.headers
                )
            response = _Router(self, hub, method, raw_path).route()
        except HubError as e:
            headers = {**e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            headers["X-Error-Message"] = e.message.replace("\n", " ")[:500]
            response = _json({"error": e.message, **e.extra}, e.status, headers)
        except Exception as e:  # a server bug: answer 500 and show it
            traceback.print_exc()
            response = _json({"error": f"Internal server error: {e!r}"}, 500)
        if self._body_state == "unread":  # keep the connection usable when a handler ignored the body
            for _ in self._body_chunks():
                pass
        elif self._body_state == "reading":  # a handler stopped halfway: the stream position is lost
            self.close_connection = True
        self.server.hub._record_response(method, raw_path, response.status)
        self._send(method, response)

    def _send(self, method: str, response: _Response) -> None:
        length = len(response.body)
        if response.file is not None:
            start, end = response.file_range or (0, response.file.stat().st_size - 1)
            length = end - start + 1
        self.send_response(response.status)
        headers = {"Content-Length": str(length), **response.headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if method == "HEAD":
            return
        if response.file is None:
            self.wfile.write(response.body)
            return
        with open(response.file, "rb") as f:
            f.seek(start)
            remaining = length
            while remaining > 0:
                data = f.read(min(_CHUNK, remaining))
                if not data:
                    break
                self.wfile.write(data)
                remaining -= len(data)


class _Router:
    """Maps one request to a store operation and builds the answer."""

    def __init__(self, handler: _Handler, hub: HubServer, method: str, raw_path: str) -> None:
        self.h = handler
        self.hub = hub
        self.store = hub.store
        self.method = method
        self.raw_path = raw_path
        self.parts = raw_path.strip("/").split("/")

    # ---------------------------------------------------------------- auth

    def token(self) -> str | None:
        auth = self.h.headers.get("Authorization", "")
        if not auth.lower().startswith("bearer "):
            return None
        token = auth[7:].strip()
        if self.hub.tokens is not None and token not in self.hub.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return token or None

    def require_write(self) -> None:
        if self.token() is None and self.hub.require_token:
            raise HubError(
                401, "You must be authenticated to write to the Hub (Authorization header missing)"
            )

    def readable_repo(self, repo_type: str, repo_id: str) -> dict:
        repo = self.store.get_repo(repo_type, repo_id)
        if repo["private"] and self.token() is None:
            raise HubError(401, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    # ---------------------------------------------------------------- routing

    def route(self) -> _Response:
        self.token()  # an invalid token is refused on every route, as on the Hub
        p, m = self.parts, self.method
        if p[0] == "api":
            rest = p[1:]
            if rest == ["whoami-v2"] and m == "GET":
                return self.whoami()
            if rest == ["repos", "create"] and m == "POST":
                return self.create_repo()
            if rest == ["repos", "delete"] and m == "DELETE":
                return self.delete_repo()
            if rest == ["repos", "move"] and m == "POST":
                return self.move_repo()
            if rest == ["validate-yaml"] and m == "POST":
                return self.validate_yaml()
            if len(rest) >= 3 and rest[0] in API_REPO_TYPES:
                repo_type = API_REPO_TYPES[rest[0]]
                repo_id = f"{unquote(rest[1])}/{unquote(rest[2])}"
                return self.repo_api(repo_type, repo_id, rest[3:])
            raise HubError(404, f"Not found: {self.raw_path}")
        if p[0] == "lfs-objects" and len(p) == 2:
            return self.lfs_object(p[1])
        if p[0] == "lfs-verify" and len(p) == 2 and m == "POST":
            return self.lfs_verify(p[1])
        repo_type = "model"
        if p[0] in ("datasets", "spaces"):
            repo_type, p = API_REPO_TYPES[p[0]], p[1:]
        if (
            len(p) >= 2
            and p[1].endswith(".git")
            and p[2:] == ["info", "lfs", "objects", "batch"]
            and m == "POST"
        ):
            return self.lfs_batch(repo_type, f"{unquote(p[0])}/{unquote(p[1])[:-4]}")
        if len(p) >= 5 and p[2] == "resolve" and m in ("GET", "HEAD"):
            repo_id = f"{unquote(p[0])}/{unquote(p[1])}"
            return self.resolve_file(repo_type, repo_id, unquote(p[3]), unquote("/".join(p[4:])))
        raise HubError(404, f"Not found: {self.raw_path}")

    def repo_api(self, repo_type: str, repo_id: str, rest: list[str]) -> _Response:
        m = self.method
        action = rest[0] if rest else None
        arg = unquote(rest[1]) if len(rest) > 1 else None
        if action is None and m == "GET":
            return self.repo_info(repo_type, repo_id, "main")
        if action == "revision" and arg is not None and m == "GET":
            return self.repo_info(repo_type, repo_id, arg)
        if action == "tree" and arg is not None and m == "GET":
            return self.tree(repo_type, repo_id, arg, unquote("/".join(rest[2:])))
        if action == "paths-info" and arg is not None and m == "POST":
            return self.paths_info(repo_type, repo_id, arg)
        if action == "preupload" and arg is not None and m == "POST":
            return self.preupload(repo_type, repo_id, arg)
        if action == "commit" and arg is not None and m == "POST":
            return self.commit(repo_type, repo_id, arg)
        if action == "refs" and m == "GET":
            return self.refs(repo_type, repo_id)
        if action == "commits" and m == "GET":
            return self.commits(repo_type, repo_id, arg or "main")
        if action == "branch" and arg is not None and m in ("POST", "DELETE"):
            return self.branch(repo_type, repo_id, arg)
        if action == "tag" and arg is not None and m in ("POST", "DELETE"):
            return self.tag(repo_type, repo_id, arg)
        if action == "settings" and m == "PUT":
            return self.settings(repo_type, repo_id)
        if action in ("xet-read-token", "xet-write-token"):
            raise HubError(
                501,
                "This test Hub server does not speak Xet: set HF_HUB_DISABLE_XET=1 in the client "
                "or start the server with force_regular=True",
            )
        raise HubError(404, f"Not found: {self.raw_path}")

    # ---------------------------------------------------------------- account and repos

    def whoami(self) -> _Response:
        if self.token() is None:
            raise HubError(401, "Invalid user token. Authorization header is missing.")
        return _json(
            {
                "type": "user",
                "id": "0" * 24,
                "name": USER,
                "fullname": "Test User",
                "email": f"{USER}@example.com",
                "emailVerified": True,
                "isPro": False,
                "canPay": False,
                "orgs": [{"type": "org", "name": org, "fullname": org, "roleInOrg": "admin"} for org in ORGS],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            }
        )

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.hub.url}/{URL_PREFIXES[repo_type]}{repo_id}"

    def create_repo(self) -> _Response:
        self.require_write()
        body = self.h.json_body()
        repo_type = body.get("type") or "model"
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise HubError(400, "Missing repo name")
        repo_id = f"{body.get('organization') or USER}/{name}"
        visibility = body.get("visibility")
        private = visibility == "private" if visibility is not None else bool(body.get("private"))
        url = self._repo_url(repo_type, repo_id)
        if not self.store.create_repo(repo_type, repo_id, private):
            # The client reads `url` from this answer when called with exist_ok=True.
            raise HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
        return _json({"url": url, "name": repo_id, "id": repo_id})

    def _body_repo(self) -> tuple[str, str]:
        body = self.h.json_body()
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise HubError(400, "Missing repo name")
        return body.get("type") or "model", f"{body.get('organization') or USER}/{name}"

    def delete_repo(self) -> _Response:
        self.require_write()
        repo_type, repo_id = self._body_repo()
        self.store.delete_repo(repo_type, repo_id)
        return _json({})

    def move_repo(self) -> _Response:
        self.require_write()
        body = self.h.json_body()
        self.store.move_repo(body.get("type") or "model", body["fromRepo"], body["toRepo"])
        return _json({"url": self._repo_url(body.get("type") or "model", body["toRepo"])})

    def settings(self, repo_type: str, repo_id: str) -> _Response:
        self.require_write()
        repo = self.store.get_repo(repo_type, repo_id)
        body = self.h.json_body()
        with self.store.lock:
            if body.get("visibility") is not None:
                repo["private"] = body["visibility"] == "private"
            elif body.get("private") is not None:
                repo["private"] = bool(body["private"])
            self.store.save()
        return _json({})

    def validate_yaml(self) -> _Response:
        body = self.h.json_body()
        content = body.get("content")
        if not isinstance(content, str):
            raise HubError(400, "Missing content")
        errors = _validate_card_metadata(content)
        if errors:
            return _json({"errors": [{"message": e} for e in errors], "warnings": []}, 400)
        return _json({"errors": [], "warnings": []})

    # ---------------------------------------------------------------- read API

    def _card_data(self, repo: dict, tree: dict) -> dict | None:
        entry = tree.get("README.md")
        if entry is None:
            return None
        block = _front_matter(self.store.blob_path(entry["sha256"]).read_text(errors="replace"))
        if block is None:
            return None
        try:
            import yaml

            data = yaml.safe_load(block)
        except Exception:
            return None
        return data if isinstance(data, dict) else None

    def repo_info(self, repo_type: str, repo_id: str, revision: str) -> _Response:
        repo = self.readable_repo(repo_type, repo_id)
        sha = self.store.resolve(repo, revision)
        commit = repo["commits"][sha]
        tree = commit["tree"]
        blobs = self.h.query.get("blobs", ["false"])[-1].lower() in ("1", "true")
        siblings = []
        for path in sorted(tree):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                entry = tree[path]
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if entry["lfs"]:
                    sibling["lfs"] = {
                        "size": entry["size"],
                        "sha256": entry["sha256"],
                        "pointerSize": len(lfs_pointer(entry["sha256"], entry["size"])),
                    }
            siblings.append(sibling)
        card = self._card_data(repo, tree)
        tags = card.get("tags") if card else None
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": sha,
            "lastModified": commit["date"],
            "createdAt": repo["created_at"],
            "private": repo["private"],
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": list(tags) if isinstance(tags, list) else ([tags] if isinstance(tags, str) else []),
            "siblings": siblings,
            "usedStorage": sum(e["size"] for e in tree.values()),
        }
        if card is not None:
            info["cardData"] = card
            if repo_type == "model":
                for key in ("library_name", "pipeline_tag"):
                    if isinstance(card.get(key), str):
                        info[key] = card[key]
        expand = self.h.query.get("expand")
        if expand:
            info = {k: v for k, v in info.items() if k in expand or k in ("_id", "id")}
        return _json(info)

    def _entries(self, repo: dict, sha: str, path: str, recursive: bool, expand: bool) -> list[dict]:
        tree = self.store.tree(repo, sha)
        prefix = f"{path}/" if path else ""
        if path and path in tree:
            return [self._file_entry(repo, sha, path, expand)]
        files = sorted(p for p in tree if p.startswith(prefix))
        if path and not files:
            raise HubError(404, f"Entry {path} not found", "EntryNotFound", {"X-Repo-Commit": sha})
        entries: dict[str, dict] = {}
        for file in files:
            relative = file[len(prefix) :].split("/")
            depth = len(relative) if recursive else 1
            for i in range(1, min(depth, len(relative) - 1) + 1):
                folder = prefix + "/".join(relative[:i])
                if folder not in entries:
                    entries[folder] = self._folder_entry(repo, sha, folder, expand)
            if recursive or len(relative) == 1:
                entries[file] = self._file_entry(repo, sha, file, expand)
        return [entries[k] for k in sorted(entries)]

    def _file_entry(self, repo: dict, sha: str, path: str, expand: bool) -> dict:
        entry = self.store.tree(repo, sha)[path]
        out: dict[str, Any] = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
        if entry["lfs"]:
            pointer = lfs_pointer(entry["sha256"], entry["size"])
            out["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": len(pointer)}
        if expand:
            out["lastCommit"] = self._last_commit(repo, sha, path)
        return out

    def _folder_entry(self, repo: dict, sha: str, path: str, expand: bool) -> dict:
        tree = self.store.tree(repo, sha)
        inside = sorted((p, e["oid"]) for p, e in tree.items() if p.startswith(path + "/"))
        out: dict[str, Any] = {
            "type": "directory",
            "oid": hashlib.sha1(json.dumps(inside).encode()).hexdigest(),
            "size": 0,
            "path": path,
        }
        if expand:
            out["lastCommit"] = self._last_commit(repo, sha, path)
        return out

    def _last_commit(self, repo: dict, sha: str, path: str) -> dict:
        """The oldest commit since which `path` (file or folder) has been unchanged."""

        def signature(tree: dict) -> Any:
            return sorted((p, e["oid"]) for p, e in tree.items() if p == path or p.startswith(path + "/"))

        commit = repo["commits"][sha]
        current = signature(commit["tree"])
        while commit["parent"] is not None:
            parent = repo["commits"][commit["parent"]]
            if signature(parent["tree"]) != current:
                break
            commit = parent
        return {"id": commit["id"], "title": commit["title"], "date": commit["date"]}

    def tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> _Response:
        repo = self.readable_repo(repo_type, repo_id)
        sha = self.store.resolve(repo, revision)
        recursive = self.h.query.get("recursive", ["false"])[-1].lower() in ("1", "true")
        expand = self.h.query.get("expand", ["false"])[-1].lower() in ("1", "true")
        return _json(self._entries(repo, sha, path.strip("/"), recursive, expand))

    def paths_info(self, repo_type: str, repo_id: str, revision: str) -> _Response:
        repo = self.readable_repo(repo_type, repo_id)
        sha = self.store.resolve(repo, revision)
        raw = self.h.body()
        if "json" in self.h.headers.get("Content-Type", ""):
            body = json.loads(raw or b"{}")
            paths, expand = body.get("paths", []), bool(body.get("expand"))
        else:
            form = parse_qs(raw.decode(), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = form.get("expand", ["false"])[-1].lower() in ("1", "true")
        tree = self.store.tree(repo, sha)
        out = []
        for path in paths:
            path = path.strip("/")
            if path in tree:
                out.append(self._file_entry(repo, sha, path, expand))
            elif path and any(p.startswith(path + "/") for p in tree):
                out.append(self._folder_entry(repo, sha, path, expand))
        return _json(out)

    def refs(self, repo_type: str, repo_id: str) -> _Response:
        repo = self.readable_repo(repo_type, repo_id)
        return _json(
            {
                "branches": [
                    {"name": b, "ref": f"refs/heads/{b}", "targetCommit": s}
                    for b, s in sorted(repo["branches"].items())
                ],
                "converts": [],
                "tags": [
                    {"name": t, "ref": f"refs/tags/{t}", "targetCommit": s}
                    for t, s in sorted(repo["tags"].items())
                ],
                "pullRequests": [],
            }
        )

    def commits(self, repo_type: str, repo_id: str, revision: str) -> _Response:
        repo = self.readable_repo(repo_type, repo_id)
        sha = self.store.resolve(repo, revision)
        return _json(
            [
                {
                    "id": c["id"],
                    "title": c["title"],
                    "message": c["message"],
                    "authors": [{"user": c["author"]}],
                    "date": c["date"],
                }
                for c in self.store.history(repo, sha)
            ]
        )

    def branch(self, repo_type: str, repo_id: str, branch: str) -> _Response:
        self.require_write()
        repo = self.store.get_repo(repo_type, repo_id)
        if self.method == "DELETE":
            self.store.delete_branch(repo, branch)
        else:
            self.store.create_branch(repo, branch, self.h.json_body().get("startingPoint"))
        return _json({})

    def tag(self, repo_type: str, repo_id: str, arg: str) -> _Response:
        self.require_write()
        repo = self.store.get_repo(repo_type, repo_id)
        if self.method == "DELETE":
            self.store.delete_tag(repo, arg)
        else:
            body = self.h.json_body()
            if not isinstance(body.get("tag"), str) or not body["tag"]:
                raise HubError(400, "Missing tag name")
            self.store.create_tag(repo, body["tag"], arg)
        return _json({})

    # ---------------------------------------------------------------- upload

    def _writable_head(self, repo: dict, revision: str) -> str:
        if revision in repo["branches"]:
            return repo["branches"][revision]
        if self.hub.auto_create_branches and not _SHA_RE.match(revision) and revision not in repo["tags"]:
            return repo["branches"]["main"]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def preupload(self, repo_type: str, repo_id: str, revision: str) -> _Response:
        self.require_write()
        if self.h.query.get("create_pr"):
            raise HubError(400, "Pull requests are not supported by the test Hub server")
        repo = self.store.get_repo(repo_type, repo_id)
        head = self._writable_head(repo, revision)
        tree = self.store.tree(repo, head)
        body = self.h.json_body()
        files = body.get("files")
        if not isinstance(files, list):
            raise HubError(400, "Expected a list of files")
        attributes = tree.get(".gitattributes")
        lfs_patterns = _gitattributes_lfs_patterns(
            self.store.blob_path(attributes["sha256"]).read_text() if attributes else DEFAULT_GITATTRIBUTES
        )
        gitignore = body.get("gitIgnore")
        if gitignore is None and ".gitignore" in tree:
            gitignore = self.store.blob_path(tree[".gitignore"]["sha256"]).read_text()
        ignore_patterns = [
            line.strip()
            for line in (gitignore or "").splitlines()
            if line.strip() and not line.startswith(("#", "!"))
        ]
        answers = []
        for file in files:
            path, size = file.get("path"), int(file.get("size") or 0)
            sample = base64.b64decode(file.get("sample") or "")
            if self.hub.force_regular:
                mode = "regular"
            elif size >= self.hub.lfs_threshold or b"\0" in sample:
                mode = "lfs"
            else:
                mode = "lfs" if any(_matches(path, pat) for pat in lfs_patterns) else "regular"
            existing = tree.get(path)
            oid = None
            if existing is not None:
                oid = existing["sha256"] if existing["lfs"] else existing["oid"]
            answers.append(
                {
                    "path": path,
                    "uploadMode": mode,
                    "shouldIgnore": any(_matches(path, pat) for pat in ignore_patterns),
                    "oid": oid,
                }
            )
        return _json({"files": answers, "commitOid": head})

    def lfs_batch(self, repo_type: str, repo_id: str) -> _Response:
        self.require_write()
        self.store.get_repo(repo_type, repo_id)
        body = self.h.json_body()
        operation = body.get("operation", "upload")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            out: dict[str, Any] = {"oid": oid, "size": size}
            if not _SHA256_RE.match(oid or "") or not isinstance(size, int):
                out["error"] = {"code": 422, "message": f"Invalid object {oid!r} of size {size!r}"}
            elif operation == "download":
                if self.store.has_blob(oid, size):
                    out["actions"] = {"download": {"href": f"{self.hub.url}/lfs-objects/{oid}"}}
                else:
                    out["error"] = {"code": 404, "message": f"Object {oid} does not exist"}
            elif not self.store.has_blob(oid, size):
                out["authenticated"] = True
                out["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs-objects/{oid}?size={size}"},
                    "verify": {"href": f"{self.hub.url}/lfs-verify/{oid}"},
                }
            objects.append(out)
        return _json(
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            headers={"Content-Type": "application/vnd.git-lfs+json"},
        )

    def lfs_object(self, oid: str) -> _Response:
        if not _SHA256_RE.match(oid):
            raise HubError(404, f"Invalid LFS object id {oid!r}")
        if self.method == "PUT":
            size = self.h.query.get("size", [None])[-1]
            self.store.put_stream(self.h._body_chunks(), oid, int(size) if size else None)
            return _Response(200, headers={"ETag": f'"{oid}"'})
        if self.method in ("GET", "HEAD") and self.store.has_blob(oid):
            return _Response(
                200, file=self.store.blob_path(oid), headers={"Content-Type": "application/octet-stream"}
            )
        raise HubError(404, f"LFS object {oid} not found")

    def lfs_verify(self, oid: str) -> _Response:
        body = self.h.json_body()
        if not self.store.has_blob(oid, body.get("size")):
            raise HubError(404, f"LFS object {oid} of size {body.get('size')} was not uploaded")
        return _json({})

    def commit(self, repo_type: str, repo_id: str, revision: str) -> _Response:
        self.require_write()
        if self.h.query.get("create_pr") and self.h.query["create_pr"][-1] not in ("", "0", "false"):
            raise HubError(400, "Pull requests are not supported by the test Hub server")
        self.store.get_repo(repo_type, repo_id)
        lines = [line for line in self.h.body().splitlines() if line.strip()]
        try:
            items = [json.loads(line) for line in lines]
        except ValueError as e:
            raise HubError(400, f"Commit payload is not valid NDJSON: {e}") from e
        if not items or items[0].get("key") != "header":
            raise HubError(400, "The first line of a commit payload must be its header")
        header = items[0].get("value") or {}
        title = header.get("summary")
        if not isinstance(title, str) or not title:
            raise HubError(400, "A commit needs a summary")
        operations = []
        for item in items[1:]:
            key, value = item.get("key"), dict(item.get("value") or {})
            if key == "header":
                raise HubError(400, "A commit payload has exactly one header")
            value["key"] = key
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                try:
                    value["content"] = base64.b64decode(value.get("content") or "", validate=True)
                except ValueError as e:
                    raise HubError(400, f"Invalid base64 content for {value.get('path')!r}") from e
            operations.append(value)
        sha = self.store.commit(
            repo_type,
            repo_id,
            revision,
            operations,
            title=title,
            message=header.get("description") or "",
            parent_commit=header.get("parentCommit"),
            create_branch=self.hub.auto_create_branches,
        )
        return _json(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self._repo_url(repo_type, repo_id)}/commit/{sha}",
                "pullRequestUrl": None,
                "hookOutput": "",
            }
        )

    # ---------------------------------------------------------------- download

    def resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str) -> _Response:
        repo = self.readable_repo(repo_type, repo_id)
        sha = self.store.resolve(repo, revision)
        entry = self.store.tree(repo, sha).get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        size = entry["size"]
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{entry["oid"]}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        if entry["lfs"]:
            headers["X-Linked-Etag"] = f'"{entry["sha256"]}"'
            headers["X-Linked-Size"] = str(size)
        blob = self.store.blob_path(entry["sha256"])
        range_header = self.h.headers.get("Range")
        if self.method == "GET" and range_header:
            byte_range = _parse_range(range_header, size)
            if byte_range is None:
                raise HubError(
                    416, f"Range {range_header} not satisfiable", headers={"Content-Range": f"bytes */{size}"}
                )
            headers["Content-Range"] = f"bytes {byte_range[0]}-{byte_range[1]}/{size}"
            return _Response(206, headers=headers, file=blob, file_range=byte_range)
        return _Response(200, headers=headers, file=blob)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Inclusive byte range of a single-range `Range` header; None when it cannot be satisfied."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if match is None or (not match.group(1) and not match.group(2)):
        return None
    if not match.group(1):  # suffix range: the last N bytes
        length = int(match.group(2))
        return (max(size - length, 0), size - 1) if length > 0 and size > 0 else None
    start = int(match.group(1))
    end = int(match.group(2)) if match.group(2) else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    hub: HubServer


# --------------------------------------------------------------------------------------------------- server


class HubServer:
    """A Hub-compatible server on 127.0.0.1, run in a background thread.

    Args:
        root_dir: where blobs and repo state are kept (created if missing; existing state is reloaded).
        port: 0 picks a free port.
        force_regular: answer `uploadMode: "regular"` to every preupload request, so that clients with
            Xet enabled (the default) never try to upload through Xet, which this server does not speak.
        require_token: refuse writes (and `whoami`) without an `Authorization: Bearer` header.
        tokens: when given, the only accepted tokens; any other bearer token gets a 401 on every route.
        lfs_threshold: files at least this large are uploaded through LFS.
        auto_create_branches: let commits to an unknown branch create it from `main`; by default they
            fail with `RevisionNotFound`, as on the Hub (create branches with `create_branch`).
        verbose: log every request to stderr.

    Attributes:
        requests: `(method, path)` of every request received, in order (path without query string).
        responses: `(method, path, status)` of every answer sent, in order.
    """

    def __init__(
        self,
        root_dir: str | os.PathLike,
        *,
        port: int = 0,
        force_regular: bool = False,
        require_token: bool = False,
        tokens: Iterable[str] | None = None,
        lfs_threshold: int = LFS_SIZE_THRESHOLD,
        auto_create_branches: bool = False,
        verbose: bool = False,
    ) -> None:
        self.store = HubStore(root_dir)
        self.port = port
        self.force_regular = force_regular
        self.require_token = require_token
        self.tokens = set(tokens) if tokens is not None else None
        self.lfs_threshold = lfs_threshold
        self.auto_create_branches = auto_create_branches
        self.verbose = verbose
        self.requests: list[tuple[str, str]] = []
        self.responses: list[tuple[str, str, int]] = []
        self._failures: list[_Failure] = []
        self._lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321`` (use it as ``HF_ENDPOINT``)."""
        if self._httpd is None:
            raise RuntimeError("The Hub server is not started")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def running(self) -> bool:
        """Whether the server answers requests (a reserved server refuses connections until started)."""
        return self._thread is not None

    def reserve(self) -> HubServer:
        """Bind the port without listening: `url` is known (to point clients at it before they are imported),
        connections are refused at once until `start`."""
        if self._httpd is None:
            self._httpd = _HTTPServer(("127.0.0.1", self.port), _Handler, bind_and_activate=False)
            self._httpd.hub = self
            try:
                self._httpd.server_bind()
            except BaseException:
                self._httpd.server_close()
                self._httpd = None
                raise
        return self

    def start(self) -> HubServer:
        if self._thread is not None:
            return self
        self.reserve()
        self._httpd.server_activate()
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        if self._thread is not None:  # shutdown() waits for serve_forever, which a reserved server never ran
            self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- test hooks

    def inject_failures(
        self,
        path_substring: str,
        status: int = 500,
        count: int = 1,
        *,
        method: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer `status` to the next `count` requests whose path contains `path_substring`."""
        with self._lock:
            self._failures.append(
                _Failure(
                    path_substring, status, count, method.upper() if method else None, dict(headers or {})
                )
            )

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def clear_requests(self) -> None:
        """Empty `requests` and `responses`."""
        with self._lock:
            self.requests.clear()
            self.responses.clear()

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def _record_response(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.responses.append((method, path, status))

    def _take_failure(self, method: str, path: str) -> _Failure | None:
        with self._lock:
            for failure in self._failures:
                if failure.remaining > 0 and failure.substring in path and failure.method in (None, method):
                    failure.remaining -= 1
                    return failure
        return None

    # ---------------------------------------------------------------- direct access (no HTTP)

    def create_repo(
        self, repo_id: str, *, repo_type: str = "model", private: bool = False, exist_ok: bool = True
    ) -> None:
        """Create a repo directly in the store."""
        if not self.store.create_repo(repo_type, repo_id, private) and not exist_ok:
            raise HubError(409, f"Repository {repo_id} already exists")

    def commit_files(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str | os.PathLike] | None = None,
        *,
        delete: Iterable[str] = (),
        repo_type: str = "model",
        revision: str = "main",
        message: str = "Upload files",
        lfs: bool | None = None,
    ) -> str:
        """Commit files directly in the store (creating the repo if needed); returns the commit id.

        Values of `files` are bytes (content), str (text content, not a path!) or `pathlib.Path` /
        other `os.PathLike` objects (local files to read). `lfs=None` stores files as LFS by the
        same rules as preupload; True/False forces it. `delete` lists paths (files, or folders ending
        with '/') to delete in the same commit.
        """
        self.store.create_repo(repo_type, repo_id)
        operations: list[dict] = []
        for path in delete:
            key = "deletedFolder" if path.endswith("/") else "deletedFile"
            operations.append({"key": key, "path": path.rstrip("/") if key == "deletedFile" else path})
        for path, value in (files or {}).items():
            if isinstance(value, str):
                content = value.encode()
            elif isinstance(value, bytes):
                content = value
            else:
                content = Path(value).read_bytes()
            as_lfs = lfs
            if as_lfs is None:
                as_lfs = len(content) >= self.lfs_threshold or any(
                    _matches(path, p) for p in _gitattributes_lfs_patterns(DEFAULT_GITATTRIBUTES)
                )
            if as_lfs:
                operations.append({"key": "lfsFile", "path": path, "oid": self.store.put_bytes(content)})
            else:
                operations.append({"key": "file", "path": path, "content": content})
        return self.store.commit(
            repo_type, repo_id, revision, operations, title=message, create_branch=self.auto_create_branches
        )

    def commit_folder(
        self,
        repo_id: str,
        folder: str | os.PathLike,
        *,
        path_in_repo: str = "",
        repo_type: str = "model",
        revision: str = "main",
        message: str = "Upload folder",
    ) -> str:
        """Commit every file of a local folder directly in the store; returns the commit id."""
        folder = Path(folder)
        prefix = path_in_repo.strip("/") + "/" if path_in_repo.strip("/") else ""
        files = {
            prefix + p.relative_to(folder).as_posix(): p
            for p in sorted(folder.rglob("*"))
            if p.is_file() and ".git" not in p.relative_to(folder).parts
        }
        return self.commit_files(repo_id, files, repo_type=repo_type, revision=revision, message=message)

    def head(self, repo_id: str, *, repo_type: str = "model", revision: str = "main") -> str:
        """Full commit id that `revision` resolves to."""
        return self.store.resolve(self.store.get_repo(repo_type, repo_id), revision)

    def files(self, repo_id: str, *, repo_type: str = "model", revision: str = "main") -> dict[str, dict]:
        """File tree at `revision`: path -> {sha256, size, lfs, oid}."""
        repo = self.store.get_repo(repo_type, repo_id)
        return dict(self.store.tree(repo, self.store.resolve(repo, revision)))

    def read_file(
        self, repo_id: str, path: str, *, repo_type: str = "model", revision: str = "main"
    ) -> bytes:
        """Content of a file at `revision`."""
        return self.store.blob_path(
            self.files(repo_id, repo_type=repo_type, revision=revision)[path]["sha256"]
        ).read_bytes()


# --------------------------------------------------------------------------------------------------- clients


_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
_CACHE_VARS = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "HF_XET_CACHE", "HF_TOKEN_PATH")


def hub_env_vars(
    server: HubServer | str,
    hf_home: str | os.PathLike,
    *,
    token: str | None = DEFAULT_TOKEN,
    disable_xet: bool = False,
) -> dict[str, str]:
    """The variables a client needs to talk to `server` (a HubServer or its URL).

    HF_ENDPOINT, HF_HOME (caches, remote code modules), HF_TOKEN, HF_HUB_DISABLE_TELEMETRY, quiet
    progress bars, and HF_HUB_DISABLE_XET=1 when `disable_xet`.
    """
    env = {
        "HF_ENDPOINT": server.url if isinstance(server, HubServer) else str(server).rstrip("/"),
        "HF_HOME": str(hf_home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if token is not None:
        env["HF_TOKEN"] = token
    if disable_xet:
        env["HF_HUB_DISABLE_XET"] = "1"
    return env


def client_env(
    server: HubServer | str,
    hf_home: str | os.PathLike,
    *,
    token: str | None = DEFAULT_TOKEN,
    disable_xet: bool = False,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Full environment for a client subprocess: the current one plus :func:`hub_env_vars`.

    Offline switches, cache locations and Xet/token settings inherited from the caller are dropped.
    """
    dropped = (*_OFFLINE_VARS, *_CACHE_VARS, "HF_HUB_DISABLE_XET", "HF_TOKEN")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(hub_env_vars(server, hf_home, token=token, disable_xet=disable_xet))
    env.update(extra or {})
    return env


def configure_environ(
    server: HubServer | str,
    hf_home: str | os.PathLike,
    *,
    token: str | None = DEFAULT_TOKEN,
    disable_xet: bool = True,
) -> None:
    """Point this process's Hugging Face clients at `server` (for the top of a conftest).

    Must run before `huggingface_hub` is imported: its endpoint and Xet switch are fixed at import.
    Xet is disabled by default because this server does not speak it (see `HubServer.force_regular`).
    """
    if "huggingface_hub" in sys.modules:
        raise RuntimeError("configure_environ() must run before huggingface_hub is imported")
    for key in (*_OFFLINE_VARS, *_CACHE_VARS, "HF_HUB_DISABLE_XET", "HF_TOKEN"):
        os.environ.pop(key, None)
    os.environ.update(hub_env_vars(server, hf_home, token=token, disable_xet=disable_xet))


def run_client(
    code: str, env: Mapping[str, str], *, timeout: float = 300, check: bool = True, cwd: str | None = None
) -> subprocess.CompletedProcess:
    """Run Python `code` in a subprocess with `env`; on failure (when `check`) raise with its output."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"client exited with {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        )
    return proc


RESULT_MARKER = "@@RESULT@@ "


def client_result(proc: subprocess.CompletedProcess) -> Any:
    """The JSON value a client printed with ``print(RESULT_MARKER + json.dumps(value))`` (the last one)."""
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    raise AssertionError(
        f"client printed no result\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )


def upload_folder_via_client(
    env: Mapping[str, str],
    repo_id: str,
    folder: str | os.PathLike,
    *,
    repo_type: str = "model",
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload folder",
) -> str:
    """Create the repo (if needed) and `HfApi.upload_folder` into it from a client subprocess.

    Returns the commit id. Use an env from :func:`client_env` (with `disable_xet=True`, or a server
    with `force_regular=True`).
    """
    args = json.dumps([repo_id, str(folder), repo_type, private, revision, commit_message])
    code = f"""
        import json
        from huggingface_hub import HfApi
        repo_id, folder, repo_type, private, revision, message = json.loads({args!r})
        api = HfApi()
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, repo_type=repo_type, revision=revision, commit_message=message
        )
        print({RESULT_MARKER!r} + json.dumps(info.oid))
    """
    return client_result(run_client(code, env))


def push_dataset_via_client(
    env: Mapping[str, str],
    repo_id: str,
    columns: Mapping[str, list],
    *,
    split: str = "train",
    private: bool = False,
) -> str:
    """`datasets.Dataset.from_dict(columns).push_to_hub(repo_id, split=split)` from a client subprocess.

    Returns the commit id. Values must be JSON-serialisable lists of equal length.
    """
    args = json.dumps([repo_id, dict(columns), split, private])
    code = f"""
        import json
        import datasets
        repo_id, columns, split, private = json.loads({args!r})
        info = datasets.Dataset.from_dict(columns).push_to_hub(repo_id, split=split, private=private)
        print({RESULT_MARKER!r} + json.dumps(info.oid))
    """
    return client_result(run_client(code, env))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the local Hub-compatible test server.")
    parser.add_argument("--root", required=True, help="storage folder (created if missing)")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument(
        "--force-regular", action="store_true", help="answer uploadMode 'regular' to every file"
    )
    parser.add_argument("--require-token", action="store_true", help="refuse writes without a bearer token")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    server = HubServer(
        args.root,
        port=args.port,
        force_regular=args.force_regular,
        require_token=args.require_token,
        verbose=args.verbose,
    ).start()
    print(server.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
