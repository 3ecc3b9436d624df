"""Faults: server SIGKILLed mid-upload and restarted on its disk store, Redis killed and restarted
during traffic, a full memory store, a client deadline expiring during a large Compress."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvpack import codec, errors
from kvpack.client import AsyncKVPackClient, CompressResult
from kvpack.codec import QuantSettings
from kvpack.server.compress import CompressSession
from kvpack.v1 import kvpack_pb2 as pb
from kvpack.v1 import kvpack_pb2_grpc as pb_grpc
from tests.codec.test_quant import check_bound
from tests.deploy.deploy_support import Servers
from tests.reliability.reliability_support import RedisProcess
from tests.server.server_support import (
    compress_requests,
    fetch,
    header,
    make_cache,
    put_requests,
)

QUANT = QuantSettings(k_window=16, v_window=16, block_tokens=32)
SMALL: dict[str, Any] = {"layers": 3, "hkv": 2, "hq": 4, "n": 128, "d": 32}
#: 8 layers x 2 x 1 MiB (bf16 [1, 2, 2048, 128]): long enough to interrupt mid-upload.
LARGE: dict[str, Any] = {"layers": 8, "hkv": 2, "hq": 8, "n": 2048, "d": 128}


def verify_against(decoded: Any, result: CompressResult) -> None:
    """A fetched entry decodes to the composite cache it was made from, within the bound."""
    assert len(decoded.keys) == len(result.keys)
    for layer in range(len(result.keys)):
        assert torch.equal(decoded.indices[layer], result.indices[layer])
        check_bound(result.keys[layer], decoded.keys[layer], "k", QUANT)
        check_bound(result.values[layer], decoded.values[layer], "v", QUANT)


async def health_status(channel: aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5
    )
    return int(reply.status)


# -- SIGKILL mid-upload, restart on the disk store ----------------------------------------------


@pytest.mark.slow
async def test_sigkill_mid_upload_then_restart_on_disk(tmp_path: Path) -> None:
    store = tmp_path / "store"
    servers = Servers(tmp_path)
    try:
        (first,) = await asyncio.to_thread(servers, "--store", "disk", "--disk-path", str(store))
        committed: dict[str, CompressResult] = {}
        async with AsyncKVPackClient(first.target, timeout=60) as client:
            for i in range(3):
                scores, keys, values = make_cache(**SMALL, seed=20 + i)
                committed[f"kept/{i}"] = await client.compress(
                    keys, values, scores=scores, ratio=0.5, key=f"kept/{i}", quant=QUANT
                )
            # A large upload, paused by its progress callback after two tensors: SIGKILL then.
            scores, keys, values = make_cache(**LARGE, seed=99)
            uploaded: list[int] = []
            paused = threading.Event()

            def progress(nbytes: int) -> None:
                uploaded.append(nbytes)
                if len(uploaded) == 2:
                    paused.set()
                    time.sleep(1.0)  # hold the upload here (worker thread) while it is killed

            task = asyncio.create_task(
                client.compress(
                    keys, values, scores=scores, ratio=0.5, key="torn/big", progress=progress
                )
            )
            for _ in range(600):
                if paused.is_set() or task.done():
                    break
                await asyncio.sleep(0.05)
            assert paused.is_set(), "the upload never started"
            os.kill(first.proc.pid, signal.SIGKILL)
            with pytest.raises(errors.Unavailable):
                await asyncio.wait_for(task, 30)
        assert first.proc.wait(timeout=10) == -signal.SIGKILL
        assert len(uploaded) < 2 * LARGE["layers"] + 1, "the upload finished before the kill"
        assert len(list(store.glob("*.kvpe"))) == len(committed)
        # What a kill during the disk write itself leaves behind: a partial temporary file.
        (store / ".tmp-torn-write").write_bytes(b"KVPE1\n" + b"\x00" * 100)

        (second,) = await asyncio.to_thread(servers, "--store", "disk", "--disk-path", str(store))
        assert not list(store.glob(".tmp-*")), "partial files must be removed on open"
        async with AsyncKVPackClient(second.target, timeout=60) as client:
            assert sorted([e.key async for e in client.list()]) == sorted(committed)
            with pytest.raises(errors.NotFound):
                await client.stat("torn/big")
            for key, result in committed.items():
                blob = await client.fetch_bytes(key)
                codec.verify(blob)
                verify_against(codec.decode(blob), result)
    finally:
        await asyncio.to_thread(servers.stop)


# -- Redis outage during traffic ----------------------------------------------------------------
#
# What the Redis store promises (see docs/DEPLOY.md): while Redis is down every call fails at once
# with UNAVAILABLE naming Redis and its address, and the server itself stays up (health SERVING);
# once Redis answers again the same server serves again without a restart. The test's Redis runs
# without persistence, like a Redis without AOF/RDB: entries written before it restarted are gone,
# and NOT_FOUND is then the honest answer (clients recompute). Every phase below is driven by the
# test, not by a background loop racing the kill and the restart, so no outcome depends on timing.


async def wait_for(predicate: Any, seconds: float, what: str) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {seconds} s: {what}")


#: Deadline of each call during the outage: it must end UNAVAILABLE (a refused connection, well
#: within the store's 1 s connect timeout and one retry), never hang on into DEADLINE_EXCEEDED.
OUTAGE_DEADLINE_S = 20.0


async def paused_put(blob: bytes, key: str, release: asyncio.Event) -> AsyncIterator[pb.PutRequest]:
    """A Put upload that stops after its header until ``release``: the store is written only
    after the whole upload arrived, so the write happens after whatever the test does meanwhile."""
    requests = put_requests(blob, key)
    yield next(requests)
    await release.wait()
    for request in requests:
        yield request


def assert_redis_unavailable(err: aio.AioRpcError, port: int, what: str) -> None:
    """UNAVAILABLE naming Redis, its address and a refused connection (not a timeout)."""
    details = err.details() or ""
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (what, err.code(), details)
    assert "redis" in details and "unreachable" in details, (what, details)
    assert f"127.0.0.1:{port}" in details, (what, details)
    assert "Timeout" not in details, (what, details)


async def put_then_fetch(stub: Any, blob: bytes, key: str, **kw: Any) -> bytes:
    await stub.Put(put_requests(blob, key), **kw)
    return await fetch(stub, key, **kw)


@pytest.mark.slow
async def test_redis_outage_fails_fast_and_recovers(
    own_redis: RedisProcess, start_server: Any, channels: Any
) -> None:
    server = await start_server(store="redis", redis_url=own_redis.url, redis_prefix="outage:")
    channel = channels(server.address)
    stub = pb_grpc.KVPackStub(channel)
    k = torch.randn(1, 2, 64, 16)
    blob = codec.encode([k], [k])

    # Before: traffic works; some uploads are in flight (header sent, body held back).
    await stub.Put(put_requests(blob, "before"), timeout=10)
    results = await asyncio.gather(
        *(put_then_fetch(stub, blob, f"t/{i}", timeout=10) for i in range(8))
    )
    assert results == [blob] * 8
    release = asyncio.Event()
    in_flight = [
        stub.Put(paused_put(blob, f"in-flight/{i}", release), timeout=60) for i in range(4)
    ]
    await wait_for(lambda: server.servicer.streams.active == 4, 30, "uploads in flight")

    own_redis.stop()  # SIGKILL: an outage, not a shutdown
    release.set()
    # The uploads in flight at the kill finish into the dead store: UNAVAILABLE, nothing torn.
    for call in in_flight:
        with pytest.raises(aio.AioRpcError) as err:
            await call
        assert_redis_unavailable(err.value, own_redis.port, "in-flight Put")
    # Every kind of call fails at once with UNAVAILABLE naming Redis, one by one and in a burst.
    calls = {
        "Put": lambda: stub.Put(put_requests(blob, "during"), timeout=OUTAGE_DEADLINE_S),
        "Fetch": lambda: fetch(stub, "before", timeout=OUTAGE_DEADLINE_S),
        "Stat": lambda: stub.Stat(pb.StatRequest(key="before"), timeout=OUTAGE_DEADLINE_S),
        "List": lambda: stub.List(pb.ListRequest(), timeout=OUTAGE_DEADLINE_S),
        "Delete": lambda: stub.Delete(pb.DeleteRequest(key="before"), timeout=OUTAGE_DEADLINE_S),
    }
    for name, call in calls.items():
        with pytest.raises(aio.AioRpcError) as err:
            await call()
        assert_redis_unavailable(err.value, own_redis.port, name)
    burst = await asyncio.gather(
        *(calls[name]() for name in ("Put", "Fetch") for _ in range(10)), return_exceptions=True
    )
    for outcome in burst:
        assert isinstance(outcome, aio.AioRpcError), outcome
        assert_redis_unavailable(outcome, own_redis.port, "burst")
    async with AsyncKVPackClient(server.address, retries=0, timeout=OUTAGE_DEADLINE_S) as client:
        with pytest.raises(errors.Unavailable, match="redis"):
            await client.stat("before")
    # The server process itself stays up.
    assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING

    # Redis back, empty (no persistence): the same server serves again at once (a pooled
    # connection left stale by the kill is replaced by the store's one retry), and what was stored
    # before is gone: NOT_FOUND, not UNAVAILABLE and not stale data.
    await asyncio.to_thread(own_redis.start)
    for key in ("before", "t/0", "in-flight/0", "during"):
        with pytest.raises(aio.AioRpcError) as err:
            await stub.Stat(pb.StatRequest(key=key), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, (key, err.value.details())
    with pytest.raises(aio.AioRpcError) as err:
        await fetch(stub, "before", timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await stub.List(pb.ListRequest(), timeout=10)).entries == []
    # Clients re-put what they need; new traffic (a burst too) works and stays working.
    assert await put_then_fetch(stub, blob, "before", timeout=10) == blob
    results = await asyncio.gather(
        *(put_then_fetch(stub, blob, f"t/{i}", timeout=10) for i in range(8))
    )
    assert results == [blob] * 8
    listed = [e.key for e in (await stub.List(pb.ListRequest(), timeout=10)).entries]
    assert listed == sorted(["before", *(f"t/{i}" for i in range(8))])
    assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING


async def test_full_redis_is_resource_exhausted(
    own_redis: RedisProcess, start_server: Any, channels: Any
) -> None:
    # Before: redis-py's OutOfMemoryError reached the client as INTERNAL.
    import redis

    admin = redis.Redis(host="127.0.0.1", port=own_redis.port)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", str(int(admin.info("memory")["used_memory"]) + (256 << 10)))
    admin.close()
    server = await start_server(store="redis", redis_url=own_redis.url, redis_prefix="full:")
    stub = pb_grpc.KVPackStub(channels(server.address))
    small, big = containers(1)[0], codec.encode(
        [torch.randn(1, 4, 512, 64)] * 2, [torch.randn(1, 4, 512, 64)] * 2,
        settings=QuantSettings(mode="lossless"),
    )  # fmt: skip
    assert len(big) > 512 << 10
    await stub.Put(put_requests(small, "fits"), timeout=10)
    with pytest.raises(aio.AioRpcError) as err:
        await stub.Put(put_requests(big, "too-big"), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    assert "is full" in (err.value.details() or "")
    assert await fetch(stub, "fits", timeout=10) == small  # what was stored is intact
    with pytest.raises(aio.AioRpcError) as err:
        await stub.Stat(pb.StatRequest(key="too-big"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


# -- memory budget -------------------------------------------------------------------------------


def containers(count: int, seed: int = 0) -> list[bytes]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        k = torch.randn(1, 2, 96, 32, generator=g).half()
        out.append(codec.encode([k, k], [k, k], settings=QuantSettings(mode="lossless")))
    return out


async def test_memory_budget_evicts_whole_lru_entries(start_server: Any, channels: Any) -> None:
    blobs = containers(16)
    size = max(len(b) for b in blobs)
    budget = 3 * size + size // 2
    server = await start_server(store="memory", store_bytes=budget)
    stub = pb_grpc.KVPackStub(channels(server.address))

    async def listed() -> list[str]:
        return [e.key for e in (await stub.List(pb.ListRequest(), timeout=5)).entries]

    for i in range(3):
        await stub.Put(put_requests(blobs[i], f"e{i}"), timeout=5)
    assert await fetch(stub, "e0", timeout=5) == blobs[0]  # e0 is now the most recently used
    await stub.Put(put_requests(blobs[3], "e3"), timeout=5)
    assert await listed() == ["e0", "e2", "e3"]  # e1 was least recently used
    evictions = server.metrics.registry.get_sample_value(
        "kvpack_store_evictions_total", {"store": "memory"}
    )
    assert evictions == 1.0

    # An entry that can never fit is refused whole, and evicts nothing.
    huge = codec.encode(
        [torch.randn(1, 4, 512, 64)] * 2, [torch.randn(1, 4, 512, 64)] * 2,
        settings=QuantSettings(mode="lossless"),
    )  # fmt: skip
    assert len(huge) > budget
    with pytest.raises(aio.AioRpcError) as err:
        await stub.Put(put_requests(huge, "huge"), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "budget" in (err.value.details() or "")
    assert await listed() == ["e0", "e2", "e3"]

    # Concurrent writers over the budget: whatever survives is whole and byte-identical.
    await asyncio.gather(
        *(stub.Put(put_requests(blobs[i], f"c{i}"), timeout=10) for i in range(4, 16))
    )
    usage = await server.store.usage()
    assert usage.bytes <= budget and 1 <= usage.entries <= 3
    by_key = {f"e{i}": blobs[i] for i in range(4)} | {f"c{i}": blobs[i] for i in range(4, 16)}
    for key in await listed():
        data = await fetch(stub, key, timeout=5)
        assert data == by_key[key]
        codec.verify(data)

    # A Compress into the full store evicts too and stores a complete entry.
    async with AsyncKVPackClient(server.address, timeout=30) as client:
        scores, keys, values = make_cache(layers=2, hkv=2, hq=4, n=64, d=16, seed=5)
        result = await client.compress(
            keys, values, scores=scores, ratio=0.5, key="compressed", quant=QUANT
        )
        verify_against(await client.fetch("compressed"), result)
    assert (await server.store.usage()).bytes <= budget


# -- deadline expiry during a large Compress -----------------------------------------------------


def live_sessions() -> int:
    gc.collect()
    return sum(type(o) is CompressSession for o in gc.get_objects())


async def test_deadline_expiry_abandons_compress(start_server: Any, channels: Any) -> None:
    server = await start_server()
    scores, keys, values = make_cache(**LARGE, seed=7)
    baseline_sessions = live_sessions()
    gauge = server.metrics.inflight_streams.labels("Compress")
    stalled = asyncio.Event()

    async def upload_then_stall() -> AsyncIterator[pb.CompressRequest]:
        # Header, scores, layer 0 and the start of layer 1 (8 messages), then nothing: the call
        # can only end by its deadline, however fast this machine is.
        requests = compress_requests(
            header(keys, LARGE["hq"], key="too/slow"), scores, keys, values
        )
        for i, request in enumerate(requests):
            if i == 8:
                break
            yield request
        stalled.set()
        await asyncio.Event().wait()

    stub = pb_grpc.KVPackStub(channels(server.address))
    call = stub.Compress(upload_then_stall(), timeout=1.0)
    with pytest.raises(aio.AioRpcError) as err:
        async for _ in call:
            pass
    assert stalled.is_set()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server lets go: no stream slot, no in-flight gauge, no session object, nothing stored.
    await wait_for(lambda: server.servicer.streams.active == 0, 10, "stream slot released")
    await wait_for(lambda: gauge._value.get() == 0, 10, "inflight gauge back to 0")
    await wait_for(lambda: live_sessions() <= baseline_sessions, 10, "session freed")
    usage = await server.store.usage()
    assert (usage.entries, usage.bytes) == (0, 0)
    await wait_for(
        lambda: (
            server.metrics.registry.get_sample_value(
                "kvpack_requests_total", {"method": "Compress", "code": "DEADLINE_EXCEEDED"}
            )
            == 1.0
        ),
        10,
        "DEADLINE_EXCEEDED counted",
    )
    # The client maps an expiry during its upload to the typed exception: 10 ms cannot carry
    # 16 MiB of K/V on any machine.
    async with AsyncKVPackClient(server.address, timeout=0.01, timeout_per_mib=0.0) as client:
        start = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded):
            await client.compress(keys, values, scores=scores, ratio=0.5, key="too/slow")
        assert time.monotonic() - start < 5
    await wait_for(lambda: server.servicer.streams.active == 0, 10, "stream slot released")
    assert (await server.store.usage()).entries == 0
    # The codec pool is not left clogged: a normal call right after succeeds.
    async with AsyncKVPackClient(server.address, timeout=30) as client:
        small = make_cache(**SMALL, seed=8)
        result = await client.compress(
            small[1], small[2], scores=small[0], ratio=0.5, key="after", quant=QUANT
        )
        verify_against(await client.fetch("after"), result)
