"""`kvpack serve`: configuration sources, --help, a real process answering health, SIGTERM."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvpack.cli import build_parser
from kvpack.errors import InvalidArgument
from kvpack.server.config import ServerConfig, parse_bytes

ROOT = Path(__file__).resolve().parents[2]


def parse(argv: list[str]) -> object:
    return build_parser(["serve", *argv]).parse_args(["serve", *argv])


def test_config_precedence(tmp_path: Path) -> None:
    toml = tmp_path / "kvpack.toml"
    toml.write_text('[server]\nport = 6000\nstore-bytes = "1GiB"\nworkers = 3\ngrace = 2.5\n')
    env = {"KVPACK_PORT": "7000", "KVPACK_WORKERS": "1"}
    cfg = ServerConfig.from_sources(parse(["--config", str(toml), "--port", "8000"]), env)
    assert (cfg.port, cfg.workers, cfg.store_bytes, cfg.grace) == (8000, 1, 1 << 30, 2.5)
    cfg = ServerConfig.from_sources(parse([]), {})
    assert (cfg.host, cfg.port, cfg.metrics_port, cfg.store) == ("127.0.0.1", 50051, 9464, "memory")
    assert cfg.store_bytes == 2 << 30
    with pytest.raises(InvalidArgument, match="disk-path"):
        ServerConfig.from_sources(parse(["--store", "disk"]), {})
    with pytest.raises(InvalidArgument, match="unknown option"):
        (tmp_path / "bad.toml").write_text("nope = 1\n")
        ServerConfig.from_sources(parse(["--config", str(tmp_path / "bad.toml")]), {})
    assert parse_bytes("512MiB") == 512 << 20 and parse_bytes("1e9") == 10**9


def test_help_documents_every_option() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvpack", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    ).stdout
    for f in dataclasses.fields(ServerConfig):
        assert "--" + f.name.replace("_", "-") in out
        assert "KVPACK_" + f.name.upper() in out
    assert "[default: 127.0.0.1" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_serve_process_health_and_sigterm() -> None:
    port = _free_port()
    env = {**os.environ, "KVPACK_METRICS_PORT": "0", "KVPACK_GRACE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvpack", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        fast_retry = [
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 300),
        ]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=fast_retry) as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
            stub = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + 10
            while True:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING or (
                    time.monotonic() > deadline
                ):
                    break
                time.sleep(0.1)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        out = proc.stdout.read() if proc.stdout else ""
        assert "open to anyone" in out and "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
