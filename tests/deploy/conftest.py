"""Fixtures of the deployment checks: promtool, installed on demand when running as root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deploy_support  # noqa: F401  (importable by the test modules from here on)

PROMTOOL_HINT = (
    "promtool is missing: install Debian's `prometheus` package "
    "(apt-get install -y --no-install-recommends prometheus), or run the tests as root so this "
    "fixture installs it"
)


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of promtool; installs Debian's `prometheus` package first when missing and root."""
    found = shutil.which("promtool")
    if found:
        return found
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(PROMTOOL_HINT)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"]
    done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    found = shutil.which("promtool")
    if not found:
        pytest.fail(f"apt-get install prometheus did not provide promtool:\n{done.stderr[-2000:]}")
    return found
