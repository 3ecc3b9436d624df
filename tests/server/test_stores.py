"""Stores through the server: redis shared by two servers, disk across a restart, memory LRU,
DATA_LOSS on damaged entries, UNAVAILABLE when Redis cannot be reached."""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import torch

from kvpack import codec
from kvpack.errors import DataLoss
from kvpack.server.app import KVPackServer
from kvpack.server.stores.base import EntryMeta, Store
from kvpack.server.stores.disk import MAGIC, DiskStore, file_name
from kvpack.server.stores.memory import MemoryStore
from kvpack.server.stores.redis import RedisStore
from kvpack.v1 import kvpack_pb2 as pb
from kvpack.v1 import kvpack_pb2_grpc as pb_grpc
from tests.server.conftest import make_config
from tests.server.server_support import fetch, put_requests

REDIS_URL = "redis://127.0.0.1:6379/0"


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


# -- metadata validation and paged List (issue #20) -----------------------------------------------


GOOD_META: dict[str, Any] = {
    "stored_bytes": 10,
    "original_bytes": 40,
    "num_layers": 2,
    "dtype": "fp16",
    "codec": "lossy/huffman",
    "settings": {"mode": "lossy"},
    "created_unix": 1.5e9,
    "sha256": "ab" * 32,
}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stored_bytes", -1),
        ("stored_bytes", True),
        ("stored_bytes", 1.0),
        ("stored_bytes", 1 << 64),
        ("original_bytes", "40"),
        ("num_layers", None),
        ("num_layers", 1 << 33),
        ("dtype", 16),
        ("codec", ["lossy"]),
        ("sha256", 7),
        ("sha256", "not hex"),
        ("settings", ["mode", "lossy"]),
        ("settings", {"mode": 1}),
        ("settings", "mode=lossy"),
        ("created_unix", "yesterday"),
        ("created_unix", float("nan")),
        ("created_unix", float("inf")),
        ("created_unix", False),
        ("codec", "\ud800"),
        ("settings", {"\ud800": "x"}),
    ],
)
def test_entry_meta_rejects_mistyped_fields(field: str, value: Any) -> None:
    doc = {**GOOD_META, field: value}
    with pytest.raises(DataLoss, match=field):
        EntryMeta.from_json(json.dumps(doc))


@pytest.mark.parametrize("raw", [b"[1, 2]", b"null", b"{", b"\xff\xfe", b"[" * 100_000, b"{}"])
def test_entry_meta_rejects_what_is_not_metadata(raw: bytes) -> None:
    with pytest.raises(DataLoss, match="metadata"):
        EntryMeta.from_json(raw)


def test_entry_meta_round_trips_and_accepts_integral_times() -> None:
    meta = EntryMeta.from_json(json.dumps(GOOD_META))
    assert EntryMeta.from_json(meta.to_json()) == meta
    assert EntryMeta.from_json(json.dumps({**GOOD_META, "created_unix": 17})).created_unix == 17.0
    # Fields added later have defaults, so older metadata still reads.
    assert EntryMeta.from_json(b'{"stored_bytes": 3}').num_layers == 0


TENANTS = ("t1", "t10")  # "t1/" must never match "t10/..."
PER_TENANT = 1100


def paging_keys() -> list[str]:
    return sorted(f"{t}/k{i:05d}" for t in TENANTS for i in range(PER_TENANT))


def write_entry_file(root: Path, key: str, blob: bytes, meta: EntryMeta) -> None:
    """An entry file as DiskStore writes it (without its fsyncs: this test makes thousands)."""
    head = json.dumps({"key": key, "meta": json.loads(meta.to_json())}).encode()
    (root / file_name(key)).write_bytes(MAGIC + struct.pack("<I", len(head)) + head + blob)


@pytest.fixture(params=["memory", "disk", pytest.param("redis", marks=pytest.mark.redis)])
async def filled_store(request: Any, tmp_path: Path) -> AsyncIterator[Store]:
    """A store holding PER_TENANT entries under each of TENANTS."""
    blob = container(layers=1, n=8)
    meta = convert_meta(blob)
    store: Store
    if request.param == "disk":
        root = tmp_path / "store"
        root.mkdir()
        for key in paging_keys():
            write_entry_file(root, key, blob, meta)
        store = DiskStore(root)
        await store.open()
    elif request.param == "redis":
        store = RedisStore(REDIS_URL, prefix=request.getfixturevalue("redis_prefix"))
        await store.open()
        for key in paging_keys():
            await store.put(key, blob, meta)
    else:
        store = MemoryStore()
        for key in paging_keys():
            await store.put(key, blob, meta)
    yield store
    await store.close()


def convert_meta(blob: bytes) -> EntryMeta:
    from kvpack.server.container import meta_from_header, read_stored_header

    return meta_from_header(read_stored_header(blob), blob)


async def page_all(store: Store, prefix: str, limit: int, after: str = "") -> list[str]:
    """Every key under ``prefix`` after ``after``, asking for ``limit`` at a time; checks that no
    call returns more than ``limit`` entries and that each page is sorted."""
    out: list[str] = []
    while True:
        page = await store.list_page(prefix, after, limit)
        assert len(page) <= limit
        keys = [k for k, _ in page]
        assert keys == sorted(keys) and all(k.startswith(prefix) and k > after for k in keys)
        out += keys
        if len(page) < limit:
            return out
        after = keys[-1]


async def test_list_page_pages_tenants_in_order_without_leaks(filled_store: Store) -> None:
    store = filled_store
    expected = paging_keys()
    t1 = [k for k in expected if k.startswith("t1/")]
    assert await page_all(store, "t1/", 7) == t1
    assert await page_all(store, "t10/", 1000) == [k for k in expected if k.startswith("t10/")]
    assert await page_all(store, "t1", 333) == expected  # both tenants, one ordering
    assert await page_all(store, "t1/k0100", 4) == [k for k in t1 if k.startswith("t1/k0100")]
    assert await page_all(store, "t1/", 50, after="t1/k01097") == ["t1/k01098", "t1/k01099"]
    assert await page_all(store, "t1/", 50, after="t0") == t1[:50] + t1[50:]
    assert await store.list_page("t1/", "t1/k99999", 5) == []
    assert await store.list_page("t2/", "", 5) == []
    page = await store.list_page("t10/", "", 3)
    assert [k for k, _ in page] == ["t10/k00000", "t10/k00001", "t10/k00002"]
    assert page[0][1].num_layers == 1
    # Deletes and re-puts keep the index exact (no duplicates, no ghosts).
    blob = container(layers=1, n=8)
    assert await store.delete("t1/k00001")
    await store.put("t1/k00002", blob, convert_meta(blob))
    await store.put("t1/k00001x", blob, convert_meta(blob))
    first = [k for k, _ in await store.list_page("t1/", "", 4)]
    assert first == ["t1/k00000", "t1/k00001x", "t1/k00002", "t1/k00003"]
    usage = await store.usage()
    assert usage.entries == 2 * PER_TENANT  # one deleted, one added


async def test_redis_list_skips_expired_entries_and_indexes_old_ones(redis_prefix: str) -> None:
    store = RedisStore(REDIS_URL, prefix=redis_prefix)
    await store.open()
    blob = container(layers=1, n=8)
    meta = convert_meta(blob)
    r = redis.Redis(host="127.0.0.1", port=6379)
    try:
        for i in range(6):
            await store.put(f"t/k{i}", blob, meta)
        # An entry whose TTL ran out: its hash is gone, its index member is stale.
        r.delete(f"{redis_prefix}e:t/k1", f"{redis_prefix}e:t/k2")
        assert [k for k, _ in await store.list_page("t/", "", 2)] == ["t/k0", "t/k3"]
        assert r.zscore(f"{redis_prefix}idx", "t/k1") is None  # removed on the way
        assert (await store.usage()).entries == 4
        # An entry written before the index existed is indexed when a server opens the store.
        r.hset(f"{redis_prefix}e:t/old", mapping={"meta": meta.to_json(), "data": blob})
        await store.close()
        reopened = RedisStore(REDIS_URL, prefix=redis_prefix)
        await reopened.open()
        await reopened.index_rebuilt()
        keys = [k for k, _ in await reopened.list_page("t/", "", 10)]
        assert keys == ["t/k0", "t/k3", "t/k4", "t/k5", "t/old"]
        await reopened.close()
    finally:
        r.close()


class CountingStore(MemoryStore):
    """A memory store that records the ``limit`` of each list_page call."""

    def __init__(self) -> None:
        super().__init__()
        self.limits: list[int] = []

    async def list_page(self, prefix: str, after: str, limit: int) -> list[tuple[str, EntryMeta]]:
        self.limits.append(limit)
        return await super().list_page(prefix, after, limit)


async def test_list_rpc_asks_the_store_for_one_page(channels: Any) -> None:
    store = CountingStore()
    blob = container(layers=1, n=8)
    for i in range(25):
        await store.put(f"default/p/{i:02d}", blob, convert_meta(blob))
        await store.put(f"other/p/{i:02d}", blob, convert_meta(blob))
    server = KVPackServer(make_config(), store=store)
    await server.start()
    try:
        stub = pb_grpc.KVPackStub(channels(server.address))
        seen: list[str] = []
        token = ""
        while True:
            page = await stub.List(pb.ListRequest(prefix="p/", page_size=10, page_token=token))
            seen += [e.key for e in page.entries]
            token = page.next_page_token
            if not token:
                break
        assert seen == [f"p/{i:02d}" for i in range(25)]
        assert store.limits == [11, 11, 11]
    finally:
        await server.stop(grace=0.1)
