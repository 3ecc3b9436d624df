"""Fixtures of the reliability and security suite (issue #11).

Reuses the other suites' fixtures instead of copying them (see reliability_support.py) and adds a
private ``redis-server`` on a free port (never the shared one).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from reliability_support import RedisProcess, server_fixtures

# Re-exported fixtures (see tests/server/conftest.py): in-process servers on 127.0.0.1:0, aio
# channels closed at teardown, a unique shared-Redis key prefix cleaned up afterwards.
start_server = server_fixtures.start_server
channels = server_fixtures.channels
redis_prefix = server_fixtures.redis_prefix


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A private redis-server on a free loopback port, killed at teardown."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not installed")
    from deploy_support import free_port

    server = RedisProcess(free_port(), tmp_path / "redis.log")
    server.start()
    yield server
    server.stop()
