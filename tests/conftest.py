"""Test-session setup: the local Hub server, isolated caches, shared fixtures.

HF_ENDPOINT must point at the local Hub server before huggingface_hub is first imported (it fixes its endpoint at
import), so the server's port is reserved here, at the very top of the session. The server itself starts only
when a test asks for the `hub_server` fixture; until then the port refuses connections, so a test that reaches
for the Hub without the fixture fails at once instead of hanging.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

# The test helpers (local Hub server, tiny models, fixture worlds) live in tests/support/; the test files are
# grouped like the package in folders without __init__.py, so pytest puts each file's folder on sys.path, and
# this puts support/ there too.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "support"))

from hub_server import HubServer, configure_environ  # noqa: E402

_SESSION_CACHE = tempfile.mkdtemp(prefix="hf-wemoe-tests-")
HUB = HubServer(os.path.join(_SESSION_CACHE, "hub_store")).reserve()
# HF_ENDPOINT, HF_HOME, HF_TOKEN, telemetry off, HF_HUB_DISABLE_XET=1; raises if huggingface_hub is imported
configure_environ(HUB, os.path.join(_SESSION_CACHE, "hf_home"))
atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)
atexit.register(HUB.stop)
# Package caches (zero-shot heads, toy zoo) live in the session folder too.
os.environ["HF_WEMOE_CACHE"] = os.path.join(_SESSION_CACHE, "hf_wemoe")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def hub_server() -> HubServer:
    """The session's local Hub server (127.0.0.1, free port), started on first use."""
    return HUB.start()


@pytest.fixture(autouse=True)
def _reset_hub_faults():
    yield
    if HUB.running:
        HUB.clear_failures()


from toy_fixtures import toy_zoo_small  # noqa: E402, F401  (session fixture: the toy zoo's small preset)
