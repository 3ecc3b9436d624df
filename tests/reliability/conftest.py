"""Fixtures of the reliability and security suite (issue #11).

Reuses the other suites' fixtures instead of copying them (see reliability_support.py) and adds a
private ``redis-server`` on a free port (never the shared one).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.reliability_support import RedisProcess
from tests.server.conftest import channels, redis_prefix, start_server

# Re-exported fixtures (see tests/server/conftest.py): in-process servers on 127.0.0.1:0, aio
# channels closed at teardown, a unique shared-Redis key prefix cleaned up afterwards.
__all__ = ["channels", "redis_prefix", "start_server"]


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A private redis-server on a free loopback port, killed at teardown."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not installed")
    from tests.deploy.deploy_support import free_port

    server = RedisProcess(free_port(), tmp_path / "redis.log")
    server.start()
    yield server
    server.stop()
