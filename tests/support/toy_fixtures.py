"""Session fixture: the toy zoo's small preset, built once per test run.

Import it into ``conftest.py`` (``from toy_fixtures import toy_zoo_small  # noqa: F401``). Set
``HF_WEMOE_TEST_ZOO`` to the folder of an already-built small zoo (``hf-wemoe toy-zoo --preset small
--output DIR``) to skip the build.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from hf_wemoe.toy import ZooManifest


@pytest.fixture(scope="session")
def toy_zoo_small(tmp_path_factory) -> ZooManifest:
    """The manifest of a small-preset toy zoo (seed 0), built into a session temp folder or reused."""
    # Imported here: this module may be loaded before conftest has set up the Hub environment.
    from hf_wemoe.toy import ZooManifest, build_toy_zoo

    reuse = os.environ.get("HF_WEMOE_TEST_ZOO")
    if reuse:
        manifest = ZooManifest.load(reuse)
        if manifest.preset != "small":
            pytest.fail(
                f"HF_WEMOE_TEST_ZOO={reuse} holds a {manifest.preset!r} zoo; the tests expect 'small'"
            )
        return manifest
    return build_toy_zoo(tmp_path_factory.mktemp("toy-zoo") / "small", "small", seed=0, progress=False)
