"""Damaged stored data (issue #20): one bad entry never stops the server or spoils List; it is
DATA_LOSS for its own key, through Stat, Fetch and both clients. A full disk is
RESOURCE_EXHAUSTED (not retried) and leaves no half-written file."""

from __future__ import annotations

import asyncio
import json
import resource
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from kvpack import errors
from kvpack.client import AsyncKVPackClient, KVPackClient
from kvpack.server.app import KVPackServer
from kvpack.server.stores.disk import MAGIC, file_name
from kvpack.v1 import kvpack_pb2 as pb
from kvpack.v1 import kvpack_pb2_grpc as pb_grpc
from tests.server.server_support import fetch
from tests.server.test_stores import container, put

#: Valid JSON, wrong type or range: each must be DATA_LOSS naming the field.
MISTYPED: dict[str, Any] = {
    "settings": ["mode", "lossy"],
    "created_unix": "yesterday",
    "num_layers": True,
    "stored_bytes": -1,
    "original_bytes": 1.5,
    "sha256": 7,
    "dtype": None,
}


def entry_path(disk_dir: Path, key: str, tenant: str = "default") -> Path:
    return disk_dir / file_name(f"{tenant}/{key}")


def edit_meta(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite the metadata JSON of a disk entry file in place (container bytes unchanged)."""
    raw = path.read_bytes()
    (meta_len,) = struct.unpack("<I", raw[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    doc = json.loads(raw[start : start + meta_len])
    edit(doc["meta"])
    head = json.dumps(doc).encode()
    path.write_bytes(MAGIC + struct.pack("<I", len(head)) + head + raw[start + meta_len :])


def store_errors(server: KVPackServer) -> float:
    value = server.metrics.registry.get_sample_value(
        "kvpack_store_errors_total", {"store": server.store.name}
    )
    return value or 0.0


async def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    """(code, details) of a unary call expected to fail."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value.code(), err.value.details() or ""


async def listed(stub: Any, prefix: str = "", page_size: int = 0) -> list[str]:
    """Every key List returns for ``prefix``, following page tokens."""
    out: list[str] = []
    token = ""
    while True:
        page = await stub.List(
            pb.ListRequest(prefix=prefix, page_size=page_size, page_token=token), timeout=5
        )
        out += [e.key for e in page.entries]
        token = page.next_page_token
        if not token:
            return out


async def test_mistyped_disk_metadata_is_data_loss_for_its_key_only(
    start_server: Any, channels: Any, tmp_path: Path
) -> None:
    disk = tmp_path / "store"
    first = await start_server(store="disk", disk_path=str(disk))
    stub = pb_grpc.KVPackStub(channels(first.address))
    blob = container()
    await put(stub, blob, "ok/a")
    for field in MISTYPED:
        await put(stub, blob, f"bad/{field}")
    await first.stop(grace=0.1)
    for field, value in MISTYPED.items():
        edit_meta(entry_path(disk, f"bad/{field}"), lambda m, f=field, v=value: m.update({f: v}))

    second = await start_server(store="disk", disk_path=str(disk))  # must start
    stub = pb_grpc.KVPackStub(channels(second.address))
    assert (await stub.Stat(pb.StatRequest(key="ok/a"), timeout=5)).num_layers == 2
    assert await fetch(stub, "ok/a", timeout=10) == blob
    for field in MISTYPED:
        code, details = await status_of(stub.Stat(pb.StatRequest(key=f"bad/{field}"), timeout=5))
        assert code == grpc.StatusCode.DATA_LOSS, (field, details)
        assert field in details and f"bad/{field}" in details and "default/" not in details
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fetch(stub, f"bad/{field}", timeout=10)
        assert err.value.code() == grpc.StatusCode.DATA_LOSS, field
    assert await listed(stub) == ["ok/a"]
    assert await listed(stub, "bad/", page_size=1) == []
    assert store_errors(second) >= len(MISTYPED)


async def test_disk_metadata_disagreeing_with_its_container_is_data_loss(
    start_server: Any, channels: Any, tmp_path: Path
) -> None:
    disk = tmp_path / "store"
    first = await start_server(store="disk", disk_path=str(disk))
    stub = pb_grpc.KVPackStub(channels(first.address))
    blob = container(layers=2)
    flips: dict[str, Any] = {
        "num_layers": 3,
        "dtype": "fp32",
        "original_bytes": 7,
        "stored_bytes": len(blob) - 1,
        "codec": "lossless/lossless",
    }
    await put(stub, blob, "c/good")
    for field in flips:
        await put(stub, blob, f"c/{field}")
    await first.stop(grace=0.1)
    for field, value in flips.items():
        edit_meta(entry_path(disk, f"c/{field}"), lambda m, f=field, v=value: m.update({f: v}))

    second = await start_server(store="disk", disk_path=str(disk))
    stub = pb_grpc.KVPackStub(channels(second.address))
    for field in flips:
        code, details = await status_of(stub.Stat(pb.StatRequest(key=f"c/{field}"), timeout=5))
        assert code == grpc.StatusCode.DATA_LOSS, (field, details)
        assert field in details, details
    assert await listed(stub, "c/") == ["c/good"]
    assert (await stub.Stat(pb.StatRequest(key="c/good"), timeout=5)).num_layers == 2


@pytest.mark.redis
async def test_mistyped_redis_metadata_is_data_loss_for_its_key_only(
    start_server: Any, channels: Any, redis_prefix: str
) -> None:
    server = await start_server(store="redis", redis_prefix=redis_prefix)
    stub = pb_grpc.KVPackStub(channels(server.address))
    blob = container()
    await put(stub, blob, "r/a")
    await put(stub, blob, "r/b")
    await put(stub, blob, "r/c")
    r = redis.Redis(host="127.0.0.1", port=6379)
    try:
        for key, field, value in (("r/b", "settings", ["x"]), ("r/c", "created_unix", "now")):
            raw = r.hget(f"{redis_prefix}e:default/{key}", "meta")
            assert isinstance(raw, bytes)
            meta = json.loads(raw)
            meta[field] = value
            r.hset(f"{redis_prefix}e:default/{key}", "meta", json.dumps(meta))
    finally:
        r.close()
    for key, field in (("r/b", "settings"), ("r/c", "created_unix")):
        code, details = await status_of(stub.Stat(pb.StatRequest(key=key), timeout=5))
        assert code == grpc.StatusCode.DATA_LOSS and field in details, details
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fetch(stub, key, timeout=10)
        assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert await listed(stub, "r/") == ["r/a"]
    assert await listed(stub, "r/", page_size=1) == ["r/a"]
    assert await fetch(stub, "r/a", timeout=10) == blob


def damage_file(disk: Path) -> dict[str, Callable[[Path], None]]:
    """Ways a disk entry file is found damaged on open (by the key that gets each)."""

    def bad_magic(p: Path) -> None:
        p.write_bytes(b"XXXXXX" + p.read_bytes()[6:])

    def truncated_meta(p: Path) -> None:
        p.write_bytes(p.read_bytes()[: len(MAGIC) + 20])

    def wrong_key(p: Path) -> None:
        edit_doc = p.read_bytes()
        p.write_bytes(edit_doc.replace(b"d/wrong_key", b"d/wrong_kez", 1))

    def mistyped(p: Path) -> None:
        edit_meta(p, lambda m: m.update(settings=[1]))

    def container_header(p: Path) -> None:
        raw = bytearray(p.read_bytes())
        (meta_len,) = struct.unpack("<I", raw[len(MAGIC) : len(MAGIC) + 4])
        raw[len(MAGIC) + 4 + meta_len + 20] ^= 0x01  # inside the container's JSON header
        p.write_bytes(bytes(raw))

    return {
        "d/bad_magic": bad_magic,
        "d/truncated_meta": truncated_meta,
        "d/wrong_key": wrong_key,
        "d/mistyped": mistyped,
        "d/container_header": container_header,
    }


async def test_clients_fetch_of_an_entry_damaged_before_restart_is_data_loss(
    start_server: Any, channels: Any, tmp_path: Path
) -> None:
    disk = tmp_path / "store"
    first = await start_server(store="disk", disk_path=str(disk))
    stub = pb_grpc.KVPackStub(channels(first.address))
    blob = container()
    damage = damage_file(disk)
    for key in [*damage, "d/ok"]:
        await put(stub, blob, key)
    await first.stop(grace=0.1)
    for key, spoil in damage.items():
        spoil(entry_path(disk, key))

    second = await start_server(store="disk", disk_path=str(disk))
    stub = pb_grpc.KVPackStub(channels(second.address))
    assert await listed(stub, "d/") == ["d/ok"]
    with KVPackClient(second.address, retries=0) as client:
        for key in damage:
            with pytest.raises(errors.DataLoss) as err:
                await asyncio.to_thread(client.fetch, key)
            assert key in err.value.message and "damaged" in err.value.message
        with pytest.raises(errors.NotFound):
            await asyncio.to_thread(client.fetch, "d/never_stored")
        assert (await asyncio.to_thread(client.fetch_bytes, "d/ok")) == blob
    async with AsyncKVPackClient(second.address, retries=0) as aclient:
        for key in damage:
            with pytest.raises(errors.DataLoss):
                await aclient.fetch(key)
        with pytest.raises(errors.NotFound):
            await aclient.fetch("d/never_stored")
        # Storing over a damaged entry repairs it; deleting one removes it.
        await aclient.put(blob, key="d/bad_magic")
        assert await aclient.fetch_bytes("d/bad_magic") == blob
        await aclient.delete("d/mistyped")
        with pytest.raises(errors.NotFound):
            await aclient.stat("d/mistyped")
    assert await listed(stub, "d/") == ["d/bad_magic", "d/ok"]


@contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """Files this process writes may not grow past ``nbytes``: a write past it fails with a
    real EFBIG from the kernel (Python ignores SIGXFSZ). Restored on exit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


async def test_full_disk_is_resource_exhausted_not_retried_and_leaves_nothing(
    start_server: Any, tmp_path: Path
) -> None:
    disk = tmp_path / "store"
    server = await start_server(store="disk", disk_path=str(disk))
    old, big = container(layers=1, n=16), container(layers=4, n=256, seed=3)
    assert len(big) > 8 * 4096
    with KVPackClient(server.address, retries=3) as client:
        await asyncio.to_thread(client.put, old, "full/kept")
        with file_size_limit(4096):
            with pytest.raises(errors.ResourceExhausted) as err:
                await asyncio.to_thread(client.put, big, "full/new")
            with pytest.raises(errors.ResourceExhausted):
                await asyncio.to_thread(client.put, big, "full/kept")
        assert "disk store" in err.value.message and "full" in err.value.message
        # Each attempt fails in the store before the client hears of it: one per put, no retry.
        assert store_errors(server) == 2
        assert sorted(p.name for p in disk.iterdir()) == [file_name("default/full/kept")]
        assert await asyncio.to_thread(client.fetch_bytes, "full/kept") == old
        with pytest.raises(errors.NotFound):
            await asyncio.to_thread(client.stat, "full/new")
        listed_keys = await asyncio.to_thread(lambda: [e.key for e in client.list("full/")])
        assert listed_keys == ["full/kept"]
        # Once there is room again the same put succeeds.
        await asyncio.to_thread(client.put, big, "full/new")
        assert await asyncio.to_thread(client.fetch_bytes, "full/new") == big
