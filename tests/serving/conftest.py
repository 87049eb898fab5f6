"""Fixtures for the serving tests: the real EfficientNet-Lite0 exported once per session, real servers.

INSERVE_TEST_MODELS may name a folder a previous run of this fixture exported (to skip the 1-2 minute
export while iterating); by default the session exports its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from servers import BACKBONE


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("INSERVE_TEST_MODELS")
    if given and (Path(given) / BACKBONE / "manifest.json").is_file():
        return Path(given)
    out = tmp_path_factory.mktemp("models")
    command = [sys.executable, "-m", "inserve.clients.cli", "export", "--backbone", BACKBONE, "--out", str(out)]
    subprocess.run([*command, "--dasr-strides", "8", "--stop-stride", "8", "--no-check"], check=True, timeout=900)
    return out
