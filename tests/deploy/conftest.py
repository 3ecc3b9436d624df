"""Fixtures of the deployment checks: promtool (installed on demand as root) and real servers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

KVPACK = Path(sys.executable).with_name("kvpack")
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    """One running `kvpack serve` subprocess."""

    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _wait_serving(served: Served, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(served.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if served.proc.poll() is not None:
                pytest.fail(
                    f"kvpack serve exited with {served.proc.returncode}:\n{served.output()}"
                )
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    pytest.fail(f"kvpack serve not SERVING after {timeout} s:\n{served.output()}")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """Factory: ``serve("--store", "redis", ...)`` starts `kvpack serve` on free loopback ports
    and returns once its health service answers SERVING; every server is stopped (SIGTERM) at
    teardown."""
    started: list[Served] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Served:
        port, metrics_port = free_port(), free_port()
        log = tmp_path / f"serve-{len(started)}.log"
        cmd = [str(KVPACK), "serve", "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--metrics-port", str(metrics_port), "--grace", "1", *args]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        served = Served(proc, port, metrics_port, log)
        started.append(served)
        _wait_serving(served, timeout=30)
        return served

    yield start
    for served in started:
        served.proc.terminate()
    for served in started:
        try:
            served.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            served.proc.kill()
            served.proc.wait()
