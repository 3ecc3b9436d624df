"""Put / Fetch / Delete / Stat / List / Info and their status codes; stream limits; drain."""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

import grpc
import pytest
import torch

from kvpack import codec, wire
from kvpack.v1 import kvpack_pb2 as pb
from kvpack.v1 import kvpack_pb2_grpc as pb_grpc
from tests.server.server_support import fetch, put_requests


def container(layers: int = 3) -> bytes:
    k = [torch.randn(1, 2, 80, 16).to(torch.bfloat16) for _ in range(layers)]
    return codec.encode(k, k)


async def code_of(aw: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await aw
    return err.value.code(), err.value.details()


async def test_put_fetch_stat_delete(stub: Any) -> None:
    blob = container()
    reply = await stub.Put(put_requests(blob, "a/b:c.d-e_f"), timeout=5)
    assert reply.key == "a/b:c.d-e_f" and reply.stored_bytes == len(blob)
    assert await fetch(stub, "a/b:c.d-e_f", timeout=5) == blob
    part = codec.decode(await fetch(stub, "a/b:c.d-e_f", 2, 0, timeout=5))
    assert part.layers == [2]
    info = await stub.Stat(pb.StatRequest(key="a/b:c.d-e_f"), timeout=5)
    assert info.num_layers == 3 and info.dtype == pb.DTYPE_BFLOAT16
    assert info.original_bytes == 3 * 2 * 80 * 16 * 2 * 2 and info.codec == "lossy/auto"
    assert info.settings["k_error_bound"]
    # Put without a key: content-addressed from the bytes, same bytes -> same key.
    first = await stub.Put(put_requests(blob), timeout=5)
    again = await stub.Put(put_requests(blob), timeout=5)
    assert first.key == again.key and first.key.startswith("sha256:")
    await stub.Delete(pb.DeleteRequest(key="a/b:c.d-e_f"), timeout=5)
    code, _ = await code_of(stub.Stat(pb.StatRequest(key="a/b:c.d-e_f"), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = await code_of(stub.Delete(pb.DeleteRequest(key="a/b:c.d-e_f"), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = await code_of(fetch(stub, "missing", timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND
    code, msg = await code_of(fetch(stub, first.key, 5, 9, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "layer range" in msg


async def test_invalid_keys_and_uploads(stub: Any) -> None:
    inv = grpc.StatusCode.INVALID_ARGUMENT
    for key in ("has space", "x" * 201, "semi;colon", "ünicode"):
        code, msg = await code_of(stub.Stat(pb.StatRequest(key=key), timeout=5))
        assert code == inv and "invalid key" in msg
    code, _ = await code_of(stub.Stat(pb.StatRequest(key=""), timeout=5))
    assert code == inv
    blob = container()
    # Not a container at all.
    junk = b"\x00" * 1000
    code, msg = await code_of(stub.Put(put_requests(junk, "junk"), timeout=5))
    assert code == inv and "container" in msg
    # Damaged container whose CRC-32 on the wire matches (damage before upload).
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0xFF
    code, _ = await code_of(stub.Put(put_requests(bytes(bad), "bad"), timeout=5))
    assert code == inv
    # Wire CRC mismatch (damage in transit) -> DATA_LOSS; chunk gap -> INVALID_ARGUMENT.
    reqs = list(put_requests(blob, "crc"))
    reqs[0].header.crc32 ^= 1
    code, _ = await code_of(stub.Put(iter(reqs), timeout=5))
    assert code == grpc.StatusCode.DATA_LOSS
    reqs = list(put_requests(blob, "gap"))
    reqs[1].chunk.offset = 7
    code, msg = await code_of(stub.Put(iter(reqs), timeout=5))
    assert code == inv and "offset" in msg
    code, _ = await code_of(stub.Put(iter([pb.PutRequest(chunk=pb.Chunk(data=b"x"))]), timeout=5))
    assert code == inv
    code, msg = await code_of(stub.List(pb.ListRequest(prefix="a b"), timeout=5))
    assert code == inv


async def test_list_pages(stub: Any) -> None:
    blob = container(layers=1)
    names = [f"page/{i:02d}" for i in range(7)]
    for name in names:
        await stub.Put(put_requests(blob, name), timeout=5)
    await stub.Put(put_requests(blob, "other"), timeout=5)
    seen: list[str] = []
    token = ""
    while True:
        reply = await stub.List(pb.ListRequest(prefix="page/", page_size=3, page_token=token))
        seen += [e.key for e in reply.entries]
        assert len(reply.entries) <= 3
        token = reply.next_page_token
        if not token:
            break
    assert seen == names
    code, _ = await code_of(stub.List(pb.ListRequest(page_token="!!notbase64"), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_info(stub: Any) -> None:
    info = await stub.Info(pb.InfoRequest(), timeout=5)
    assert "kvcompose" in info.policies and "none" in info.policies
    assert set(info.quant_modes) == {"lossy", "fixed", "lossless"}
    assert info.store == "memory" and not info.auth_required
    assert info.container_version >= 1 and info.limits.chunk_bytes == wire.CHUNK_BYTES
    assert info.limits.max_concurrent_streams == 64


async def test_concurrent_stream_limit(start_server: Any, channels: Any) -> None:
    server = await start_server(max_concurrent_streams=1)
    stub = pb_grpc.KVPackStub(channels(server.address))
    gate = asyncio.Event()
    blob = container(layers=1)

    async def slow_upload() -> Any:
        reqs = list(put_requests(blob, "slow"))
        yield reqs[0]
        await gate.wait()
        for r in reqs[1:]:
            yield r

    first = stub.Put(slow_upload(), timeout=10)
    for _ in range(100):  # until the first stream holds the only slot
        if server.servicer.streams.active:
            break
        await asyncio.sleep(0.01)
    code, msg = await code_of(stub.Put(put_requests(blob, "second"), timeout=5))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-concurrent-streams" in msg
    gate.set()
    assert (await first).key == "slow"
    assert server.servicer.streams.active == 0


async def test_put_over_request_limit(start_server: Any, channels: Any) -> None:
    server = await start_server(max_request_bytes=1000)
    stub = pb_grpc.KVPackStub(channels(server.address))
    big = container()
    code, msg = await code_of(stub.Put(put_requests(big, "big"), timeout=5))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in msg
    assert zlib.crc32(big)  # the header was rejected before any allocation of its size


async def test_deadline_and_cancel_free_the_stream(server: Any, stub: Any) -> None:
    async def stalled() -> Any:
        yield pb.PutRequest(header=pb.PutHeader(key="stall", total_bytes=10))
        await asyncio.sleep(30)

    code, _ = await code_of(stub.Put(stalled(), timeout=0.5))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(100):
        if not server.servicer.streams.active:
            break
        await asyncio.sleep(0.02)
    assert server.servicer.streams.active == 0
    value = server.metrics.registry.get_sample_value(
        "kvpack_requests_total", {"method": "Put", "code": "DEADLINE_EXCEEDED"}
    )
    assert value == 1.0
