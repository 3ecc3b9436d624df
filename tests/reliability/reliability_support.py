"""Helpers of the reliability and security suite (issue #11), importable by a unique name.

Puts the other suites' helper folders on ``sys.path`` (``tests/server``, ``tests/deploy``,
``tests/codec``) so their modules are reused rather than copied, loads the server and client
suites' conftest modules under names of their own (``from conftest import ...`` depends on which
conftest pytest imported last), and runs a private ``redis-server``.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parents[1]
for _sub in ("server", "deploy", "codec"):
    if str(TESTS / _sub) not in sys.path:
        sys.path.insert(0, str(TESTS / _sub))


def load_module(name: str, path: Path) -> Any:
    """Import the file ``path`` as module ``name`` (once; later calls return the same module)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


#: tests/server/conftest.py: in-process server fixtures (start_server, channels, redis_prefix).
server_fixtures = load_module(
    "kvpack_reliability_server_fixtures", TESTS / "server" / "conftest.py"
)
#: tests/client/conftest.py: ServerThread, a server on its own loop in a background thread.
client_fixtures = load_module(
    "kvpack_reliability_client_fixtures", TESTS / "client" / "conftest.py"
)
ServerThread = client_fixtures.ServerThread


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
