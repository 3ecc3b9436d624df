"""Fixtures: in-process kvpack servers on 127.0.0.1:0 (no SO_REUSEPORT) and aio stubs to them."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from kvpack.options import channel_options
from kvpack.server.app import KVPackServer
from kvpack.server.config import ServerConfig
from kvpack.v1 import kvpack_pb2_grpc as pb_grpc

StartServer = Callable[..., Awaitable[KVPackServer]]


def make_config(**overrides: Any) -> ServerConfig:
    base: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "workers": 2}
    base.update(overrides)
    return ServerConfig(**base)


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """Factory: ``await start_server(store="disk", ...)`` -> a running KVPackServer."""
    servers: list[KVPackServer] = []

    async def start(**overrides: Any) -> KVPackServer:
        server = KVPackServer(make_config(**overrides))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop(grace=0.5)


@pytest.fixture
async def server(start_server: StartServer) -> KVPackServer:
    return await start_server()


@pytest.fixture
async def channels() -> AsyncIterator[Callable[..., aio.Channel]]:
    """Factory of aio channels closed at teardown."""
    opened: list[aio.Channel] = []

    def open_channel(
        address: str, credentials: grpc.ChannelCredentials | None = None, **kw: Any
    ) -> aio.Channel:
        if credentials is None:
            ch = aio.insecure_channel(address, options=channel_options())
        else:
            ch = aio.secure_channel(address, credentials, options=channel_options(), **kw)
        opened.append(ch)
        return ch

    yield open_channel
    for ch in opened:
        await ch.close()


@pytest.fixture
async def stub(server: KVPackServer, channels: Callable[..., aio.Channel]) -> Any:
    return pb_grpc.KVPackStub(channels(server.address))


@pytest.fixture
def redis_prefix() -> AsyncIterator[str]:
    """A unique Redis key prefix; every key under it is deleted afterwards."""
    import redis

    prefix = f"kvpack-test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    r = redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1)
    try:
        for key in r.scan_iter(match=prefix + "*"):
            r.delete(key)
    finally:
        r.close()


@pytest.fixture
def disk_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"
