"""Calls that need no token (health Watch, reflection) have their own small stream cap, so they
never reach the tenants' capacity; one token configured for two tenants is refused at start-up."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvpack import codec
from kvpack.errors import InvalidArgument
from kvpack.server.app import KVPackServer
from kvpack.server.auth import load_tokens
from kvpack.v1 import kvpack_pb2 as pb
from kvpack.v1 import kvpack_pb2_grpc as pb_grpc
from tests.deploy.deploy_support import KVPACK, free_port
from tests.reliability.test_faults import wait_for
from tests.server.conftest import make_config
from tests.server.server_support import fetch, put_requests

TOKENS = "alpha:tok-alpha,beta:tok-beta"
ALPHA = [("authorization", "Bearer tok-alpha")]
FLAG = "--max-unauthenticated-streams"


def small_blob() -> bytes:
    k = torch.randn(1, 1, 16, 8)
    return codec.encode([k], [k])


async def open_watch(channel: aio.Channel) -> tuple[Any, grpc.StatusCode]:
    """A Health.Watch without a token; (call, OK) once its first response arrived, else
    (call, the status it failed with)."""
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
    try:
        reply = await call.read()
    except aio.AioRpcError as e:
        return call, e.code()
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return call, grpc.StatusCode.OK


async def tenant_calls_work(channel: aio.Channel, key: str) -> None:
    """Stat, Info, Put and Fetch of tenant alpha (with its token) all succeed."""
    stub = pb_grpc.KVPackStub(channel)
    data = small_blob()
    info = await stub.Info(pb.InfoRequest(), metadata=ALPHA, timeout=10)
    assert info.auth_required
    await stub.Put(put_requests(data, key), metadata=ALPHA, timeout=10)
    stat = await stub.Stat(pb.StatRequest(key=key), metadata=ALPHA, timeout=10)
    assert stat.stored_bytes == len(data)
    assert await fetch(stub, key, metadata=ALPHA, timeout=10) == data


async def health_check(channel: aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=10
    )
    return int(reply.status)


async def test_unauthenticated_streams_have_their_own_cap(start_server: Any, channels: Any) -> None:
    cap = 4
    server = await start_server(auth_tokens=TOKENS, max_unauthenticated_streams=cap)
    channel = channels(server.address)
    held = [await open_watch(channel) for _ in range(cap)]
    assert [code for _, code in held] == [grpc.StatusCode.OK] * cap
    assert server.auth_interceptor.exempt_streams.active == cap

    # One more: refused with a status naming the flag; the reflection stream shares the cap.
    _, code = await open_watch(channel)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(aio.AioRpcError) as err:
        await (
            health_pb2_grpc.HealthStub(channel)
            .Watch(health_pb2.HealthCheckRequest(), timeout=10)
            .read()
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert FLAG in (err.value.details() or "")
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    with pytest.raises(aio.AioRpcError) as err:
        await reflection.read()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert FLAG in (err.value.details() or "")

    # Unary health checks and the tenants' calls are untouched.
    assert await health_check(channel) == health_pb2.HealthCheckResponse.SERVING
    await tenant_calls_work(channel, "during-watch-flood")

    # Cancelled by their clients, the held streams free their slots: a new Watch works.
    for call, _ in held:
        call.cancel()
    await wait_for(lambda: server.auth_interceptor.exempt_streams.active == 0, 10, "slots released")
    call, code = await open_watch(channel)
    assert code == grpc.StatusCode.OK
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    reply = await reflection.read()
    assert any(s.name == "kvpack.v1.KVPack" for s in reply.list_services_response.service)
    call.cancel()


@pytest.mark.parametrize("tokens", [TOKENS, ""], ids=["tokens", "open"])
async def test_300_held_watch_streams_leave_tenants_working(
    start_server: Any, channels: Any, tokens: str
) -> None:
    """Default caps: 300 Watch streams (more than gRPC's old server-wide cap of 272) hold at most
    ``max_unauthenticated_streams`` slots; every tenant call still works."""
    server = await start_server(auth_tokens=tokens)
    cap = server.config.max_unauthenticated_streams
    channel = channels(server.address)
    opened = await asyncio.wait_for(asyncio.gather(*(open_watch(channel) for _ in range(300))), 60)
    assert await health_check(channel) == health_pb2.HealthCheckResponse.SERVING
    if tokens:
        await tenant_calls_work(channel, "after-300-watches")
    else:
        stub = pb_grpc.KVPackStub(channel)
        data = small_blob()
        await stub.Put(put_requests(data, "open"), timeout=10)
        assert await fetch(stub, "open", timeout=10) == data
    codes = [code for _, code in opened]
    assert codes.count(grpc.StatusCode.OK) == cap
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 300 - cap
    for call, _ in opened:
        call.cancel()


async def test_concurrent_rpc_cap_is_never_hit_before_the_servers_own_limits(
    start_server: Any, channels: Any
) -> None:
    """Every unauthenticated slot and every stream slot held at once: the next stream gets the
    servicer's own RESOURCE_EXHAUSTED (naming its flag), never gRPC's anonymous
    "Concurrent RPC limit exceeded", and unary calls still run."""
    streams, unauthenticated = 2, 40
    server = await start_server(
        auth_tokens=TOKENS,
        max_concurrent_streams=streams,
        max_streams_per_tenant=streams,
        max_unauthenticated_streams=unauthenticated,
    )
    channel = channels(server.address)
    stub = pb_grpc.KVPackStub(channel)
    held = await asyncio.gather(*(open_watch(channel) for _ in range(unauthenticated)))
    assert [code for _, code in held] == [grpc.StatusCode.OK] * unauthenticated

    release = asyncio.Event()

    async def stalled_upload() -> AsyncIterator[pb.PutRequest]:
        yield pb.PutRequest(header=pb.PutHeader(key="stalled", total_bytes=10))
        await release.wait()

    uploads = [stub.Put(stalled_upload(), metadata=ALPHA, timeout=60) for _ in range(streams)]
    await wait_for(lambda: server.servicer.streams.active == streams, 10, "uploads holding slots")
    with pytest.raises(aio.AioRpcError) as err:
        await fetch(stub, "k", metadata=ALPHA, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-" in (err.value.details() or ""), err.value.details()
    info = await stub.Info(pb.InfoRequest(), metadata=ALPHA, timeout=10)
    assert info.auth_required
    assert await health_check(channel) == health_pb2.HealthCheckResponse.SERVING
    for call in uploads:
        call.cancel()
    for call, _ in held:
        call.cancel()


# -- one token, two tenants ---------------------------------------------------------------------


def test_same_token_for_two_tenants_is_refused(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("# rotated\ngamma:tok-shared\n")
    cases = [
        ("alpha:tok-shared,beta:tok-shared", ""),
        ("alpha:tok-shared", str(tokens_file)),
    ]
    for inline, path in cases:
        with pytest.raises(InvalidArgument) as err:
            load_tokens(inline, path)
        message = err.value.message
        assert "tok-shared" not in message
        tenants = ("alpha", "beta") if not path else ("alpha", "gamma")
        assert all(repr(t) in message for t in tenants), message
        with pytest.raises(InvalidArgument):
            KVPackServer(make_config(auth_tokens=inline, auth_tokens_file=path))
    # Two tokens for one tenant (rotation) and the same token listed twice for one tenant are fine.
    assert load_tokens("alpha:old,alpha:new,alpha:new,beta:other", "") == [
        ("alpha", "old"),
        ("alpha", "new"),
        ("alpha", "new"),
        ("beta", "other"),
    ]


@pytest.mark.slow
def test_kvpack_serve_exits_on_a_token_shared_by_two_tenants(tmp_path: Path) -> None:
    cmd = [str(KVPACK), "serve", "--port", str(free_port()), "--metrics-port", "0"]
    cmd += ["--auth-tokens", "alpha:tok-shared,beta:tok-shared"]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        # Bounded: it exits (torch's import takes seconds), or it starts serving, which is wrong.
        for _ in range(1200):
            if proc.poll() is not None or "serving on" in log.read_text(errors="replace"):
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    output = log.read_text(errors="replace")
    assert "serving on" not in output, output
    assert proc.returncode == 1, output
    assert "'alpha'" in output and "'beta'" in output, output
    assert "tok-shared" not in output, output
