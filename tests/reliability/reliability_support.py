"""Helpers of the reliability and security suite (issue #11).

Reuses the other suites' helpers by their package names (tests.server, tests.client,
tests.deploy) rather than copying them, and runs a private ``redis-server``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.client.client_support import ServerThread

__all__ = ["RedisProcess", "ServerThread"]


class RedisProcess:
    """A private ``redis-server`` on ``port``, started and stopped by the test. It runs without
    persistence (no RDB, no AOF): after :meth:`stop` and :meth:`start` it is empty, so every entry
    written before is gone (NOT_FOUND), as with a production Redis configured that way."""

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
