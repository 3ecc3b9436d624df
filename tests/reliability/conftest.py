"""Fixtures of the reliability and security suite (issue #11).

Reuses the other suites' helpers instead of copying them: the in-process server fixtures of
``tests/server/conftest.py`` (loaded under their own module name and re-exported), the request
builders of ``tests/server/server_support.py``, the `kvpack serve` subprocess launcher of
``tests/deploy/deploy_support.py`` and the codec's documented error bound from
``tests/codec/test_quant.py``. Adds a private ``redis-server`` on a free port (never the shared
one) and certificates for TLS.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parents[1]
for _sub in ("server", "deploy", "codec"):
    if str(TESTS / _sub) not in sys.path:
        sys.path.insert(0, str(TESTS / _sub))


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_server_fixtures = _load("kvpack_reliability_server_fixtures", TESTS / "server" / "conftest.py")

# Re-exported fixtures (see tests/server/conftest.py): in-process servers on 127.0.0.1:0, aio
# channels closed at teardown, a unique shared-Redis key prefix cleaned up afterwards.
start_server = _server_fixtures.start_server
channels = _server_fixtures.channels
redis_prefix = _server_fixtures.redis_prefix
make_config = _server_fixtures.make_config


class RedisProcess:
    """A private ``redis-server`` on ``port`` (no persistence), started and stopped by the test."""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> None:
        import redis

        binary = shutil.which("redis-server")
        assert binary is not None
        cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        cmd += ["--appendonly", "no", "--daemonize", "no"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    pytest.fail(f"redis-server exited: {self.log.read_text()[-2000:]}")
                try:
                    if client.ping():
                        return
                except redis.exceptions.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        pytest.fail(f"redis-server on port {self.port} did not answer PING in {timeout} s")

    def stop(self) -> None:
        """SIGKILL (an outage, not a shutdown) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


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


_client_fixtures = _load("kvpack_reliability_client_fixtures", TESTS / "client" / "conftest.py")
#: A KVPackServer on its own event loop in a background thread (tests/client/conftest.py), for
#: blocking stubs driven by hypothesis.
ServerThread = _client_fixtures.ServerThread
