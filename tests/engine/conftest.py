"""Engine test fixtures: a client of a real server on loopback (memory store, no auth)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvpack.client import KVPackClient
from tests.client.client_support import ServerThread


@pytest.fixture(scope="module")
def remote() -> Iterator[KVPackClient]:
    server = ServerThread()
    try:
        with KVPackClient(server.address, timeout=60) as client:
            yield client
    finally:
        server.stop()
