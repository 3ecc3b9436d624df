"""Stores through the server: redis shared by two servers, disk across a restart, memory LRU,
DATA_LOSS on damaged entries, UNAVAILABLE when Redis cannot be reached."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import torch

from kvpack import codec
from kvpack.v1 import kvpack_pb2 as pb
from kvpack.v1 import kvpack_pb2_grpc as pb_grpc
from tests.server.server_support import fetch, put_requests


def container(layers: int = 2, n: int = 64, seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(1, 2, n, 32, generator=g).half() for _ in range(layers)]
    values = [torch.randn(1, 2, n, 32, generator=g).half() for _ in range(layers)]
    return codec.encode(keys, values)


async def put(stub: Any, blob: bytes, key: str = "") -> pb.PutResponse:
    return await stub.Put(put_requests(blob, key), timeout=10)


@pytest.mark.redis
async def test_redis_shared_by_two_servers(
    start_server: Any, channels: Any, redis_prefix: str
) -> None:
    a = await start_server(store="redis", redis_prefix=redis_prefix)
    b = await start_server(store="redis", redis_prefix=redis_prefix, redis_ttl=60)
    stub_a = pb_grpc.KVPackStub(channels(a.address))
    stub_b = pb_grpc.KVPackStub(channels(b.address))
    blob = container()
    assert (await put(stub_a, blob, "shared/one")).stored_bytes == len(blob)
    assert await fetch(stub_b, "shared/one", timeout=10) == blob
    listed = await stub_b.List(pb.ListRequest(prefix="shared/"), timeout=5)
    assert [e.key for e in listed.entries] == ["shared/one"]
    assert (await stub_b.Stat(pb.StatRequest(key="shared/one"), timeout=5)).num_layers == 2
    await stub_b.Delete(pb.DeleteRequest(key="shared/one"), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fetch(stub_a, "shared/one", timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # TTL applies to entries written through b.
    await put(stub_b, blob, "shared/ttl")
    r = redis.Redis(host="127.0.0.1", port=6379)
    ttl = r.ttl(f"{redis_prefix}e:default/shared/ttl")
    r.close()
    assert 0 < ttl <= 60
    # Damaged data in Redis is DATA_LOSS, never wrong bytes.
    r = redis.Redis(host="127.0.0.1", port=6379)
    r.hset(f"{redis_prefix}e:default/shared/ttl", "data", blob[:-1] + bytes([blob[-1] ^ 1]))
    r.close()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fetch(stub_a, "shared/ttl", timeout=10)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS


async def test_redis_unreachable_is_unavailable(start_server: Any, channels: Any) -> None:
    server = await start_server(store="redis", redis_url="redis://127.0.0.1:1/0")
    stub = pb_grpc.KVPackStub(channels(server.address))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await put(stub, container(layers=1), "x")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "redis" in err.value.details() and "127.0.0.1:1" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Stat(pb.StatRequest(key="x"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    errors = server.metrics.registry.get_sample_value(
        "kvpack_store_errors_total", {"store": "redis"}
    )
    assert errors is not None and errors >= 2  # the gauge refresher may count one more


async def test_disk_store_survives_restart_and_detects_damage(
    start_server: Any, channels: Any, disk_dir: Path
) -> None:
    first = await start_server(store="disk", disk_path=str(disk_dir))
    stub = pb_grpc.KVPackStub(channels(first.address))
    blob = container()
    await put(stub, blob, "persist/a")
    await put(stub, container(seed=1), "persist/b")
    await first.stop(grace=0.1)

    second = await start_server(store="disk", disk_path=str(disk_dir))
    stub = pb_grpc.KVPackStub(channels(second.address))
    assert await fetch(stub, "persist/a", timeout=10) == blob
    listed = await stub.List(pb.ListRequest(prefix="persist/"), timeout=5)
    assert [e.key for e in listed.entries] == ["persist/a", "persist/b"]
    assert not list(disk_dir.glob(".tmp-*"))

    # Flip one byte of b's container on disk: DATA_LOSS on fetch.
    from kvpack.server.stores.disk import file_name

    path = disk_dir / file_name("default/persist/b")
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fetch(stub, "persist/b", timeout=10)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert "damaged" in err.value.details()


async def test_memory_lru_eviction(start_server: Any, channels: Any) -> None:
    blob = container(layers=1)
    server = await start_server(store_bytes=len(blob) * 3)
    stub = pb_grpc.KVPackStub(channels(server.address))
    for name in "abc":
        await put(stub, blob, f"lru/{name}")
    await fetch(stub, "lru/a", timeout=5)  # a is now the most recently used
    await put(stub, blob, "lru/d")  # evicts b, the least recent
    listed = await stub.List(pb.ListRequest(prefix="lru/"), timeout=5)
    assert [e.key for e in listed.entries] == ["lru/a", "lru/c", "lru/d"]
    scrape = server.metrics.scrape().decode()
    assert 'kvpack_store_evictions_total{store="memory"} 1.0' in scrape
    assert 'kvpack_store_entries{store="memory"} 3.0' in scrape
    # An entry larger than the whole budget is refused, nothing evicted.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await put(stub, container(layers=4), "lru/huge")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len((await stub.List(pb.ListRequest(), timeout=5)).entries) == 3
