"""Hostile input through raw kvpack.v1 stubs (what the client would refuse to send).

Every case must answer the right status with a message naming the problem; afterwards the server
still answers health SERVING and List/Stat/usage show nothing new (no bad entry stored).
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack import codec, wire
from kvpack.options import MAX_MESSAGE_BYTES
from kvpack.server.app import KVPackServer
from kvpack.v1 import kvpack_pb2 as pb
from kvpack.v1 import kvpack_pb2_grpc as pb_grpc
from tests.reliability.reliability_support import ServerThread
from tests.server.server_support import (
    aiter_of,
    fetch,
    header,
    make_cache,
    put_requests,
    tensor_requests,
)

INV = grpc.StatusCode.INVALID_ARGUMENT
LOSS = grpc.StatusCode.DATA_LOSS
EXH = grpc.StatusCode.RESOURCE_EXHAUSTED
Req = pb.CompressRequest

# A valid small cache: 2 layers, B=1, Hkv=2, Hq=4, n=32, d=16, fp16.
L, HKV, HQ, N, D = 2, 2, 4, 32, 16
SCORES, KEYS, VALUES = make_cache(layers=L, hkv=HKV, hq=HQ, n=N, d=D, dtype=torch.float16)


def hdr(**kw: Any) -> pb.CompressHeader:
    """A valid header (kvcompose, ratio 0.5, store under hostile/x); ``kw`` overrides fields."""
    h = header(KEYS, HQ, store=True, key="hostile/x")
    for name, value in kw.items():
        if name in pb.Layout.DESCRIPTOR.fields_by_name:
            setattr(h.layout, name, value)
        else:
            setattr(h, name, value)
    return h


def tensor(kind: int, layer: int, t: torch.Tensor) -> list[Req]:
    return list(tensor_requests(kind, layer, t))


def begin(kind: int, layer: int, t: torch.Tensor, **kw: Any) -> Req:
    """The TensorBegin of ``t`` with fields overridden by ``kw``."""
    msg = tensor(kind, layer, t)[0]
    for name, value in kw.items():
        if name == "shape":
            del msg.begin.shape[:]
            msg.begin.shape.extend(value)
        else:
            setattr(msg.begin, name, value)
    return msg


def stats() -> list[Req]:
    return tensor(pb.TENSOR_KIND_SCORES, 0, SCORES)


def layer(i: int, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> list[Req]:
    k = KEYS[i] if k is None else k
    v = VALUES[i] if v is None else v
    return tensor(pb.TENSOR_KIND_KEYS, i, k) + tensor(pb.TENSOR_KIND_VALUES, i, v)


def valid() -> list[Req]:
    return [Req(header=hdr()), *stats(), *layer(0), *layer(1), Req(finish=pb.Finish())]


def with_bad(t: torch.Tensor, value: float) -> torch.Tensor:
    """``t`` with ``value`` in one column of the last axis (so some kept element holds it)."""
    out = t.clone()
    out[..., 3] = value
    return out


def chunk(offset: int, data: bytes) -> Req:
    return Req(chunk=pb.Chunk(offset=offset, data=data))


K0 = tensor(pb.TENSOR_KIND_KEYS, 0, KEYS[0])  # begin + one chunk
K0_BYTES = bytes(wire.tensor_bytes(KEYS[0]))
FIN = Req(finish=pb.Finish())
BIG = 1 << 62


def compress_cases() -> list[tuple[str, Callable[[], list[Req]], grpc.StatusCode, str]]:
    """(name, requests, expected code, word the message must contain)."""
    h = Req(header=hdr())
    s = stats()
    return [
        # Out-of-order stream messages.
        ("empty stream", lambda: [], INV, "CompressHeader"),
        ("chunk before header", lambda: [chunk(0, b"x")], INV, "CompressHeader"),
        ("keys before header", lambda: K0, INV, "CompressHeader"),
        ("finish before header", lambda: [FIN], INV, "CompressHeader"),
        ("two headers", lambda: [h, h], INV, "header"),
        ("values before keys", lambda: [h, *s, *tensor(4, 0, VALUES[0])], INV, "KEYS"),
        ("layer 1 before layer 0", lambda: [h, *s, *tensor(3, 1, KEYS[1])], INV, "layer 0"),
        ("keys twice", lambda: [h, *s, *K0, *K0], INV, "VALUES"),
        ("chunk instead of begin", lambda: [h, *s, chunk(0, b"x")], INV, "TensorBegin"),
        ("stats after layer 0", lambda: [h, *s, *layer(0), *s], INV, "layer 1"),
        ("missing statistics", lambda: [h, *layer(0)], INV, "statistics"),
        ("finish too early", lambda: [h, *s, *layer(0), FIN], INV, "Finish after 1 of 2"),
        ("no finish", lambda: [h, *s, *layer(0), *layer(1)], INV, "Finish"),
        ("extra layer", lambda: [h, *s, *layer(0), *layer(1), *layer(0)], INV, "num_layers"),
        # Shapes, dtypes, lengths.
        ("zero layers", lambda: [Req(header=hdr(num_layers=0))], INV, "num_layers"),
        ("zero head_dim", lambda: [Req(header=hdr(head_dim=0))], INV, "head_dim"),
        ("huge layers", lambda: [Req(header=hdr(num_layers=2**32 - 1))], EXH, "max-layers"),
        ("huge seq_len", lambda: [Req(header=hdr(seq_len=2**32 - 1))], EXH, "max-seq-len"),
        ("huge batch", lambda: [Req(header=hdr(batch_size=10**6))], EXH, "max-batch-size"),
        (
            "raw size over limit",
            lambda: [Req(header=hdr(num_layers=512, seq_len=1 << 20, head_dim=1024))],
            EXH,
            "max-request-bytes",
        ),
        ("gqa not a multiple", lambda: [Req(header=hdr(num_query_heads=3))], INV, "multiple"),
        ("int64 K/V dtype", lambda: [Req(header=hdr(dtype=pb.DTYPE_INT64))], INV, "dtype"),
        ("unknown dtype", lambda: [Req(header=hdr(dtype=42))], INV, "dtype"),
        ("unset dtype", lambda: [Req(header=hdr(dtype=0))], INV, "dtype"),
        (
            "keys wrong shape",
            lambda: [h, *s, *tensor(3, 0, torch.zeros(1, 2, N + 1, D, dtype=torch.float16))],
            INV,
            "shape",
        ),
        (
            "keys wrong dtype",
            lambda: [h, *s, *tensor(3, 0, KEYS[0].float())],
            INV,
            "dtype",
        ),
        ("nbytes not prod(shape)", lambda: [h, *s, begin(3, 0, KEYS[0], nbytes=5)], INV, "nbytes"),
        (
            "huge dimensions",
            lambda: [h, *s, begin(3, 0, KEYS[0], shape=[BIG, BIG, BIG, BIG], nbytes=0)],
            INV,
            "shape",
        ),
        (
            "stats huge dimensions",
            lambda: [h, begin(1, 0, SCORES, shape=[BIG, 1, 4, N], nbytes=BIG)],
            INV,
            "statistics",
        ),
        (
            "stats nbytes huge",
            lambda: [h, begin(1, 0, SCORES, nbytes=BIG)],
            EXH,
            "max-request-bytes",
        ),
        (
            "scores wrong shape",
            lambda: [h, *tensor(1, 0, SCORES[:, :, :, :-1].contiguous())],
            INV,
            "statistics",
        ),
        ("scores int64", lambda: [h, *tensor(1, 0, SCORES.long())], INV, "FLOAT"),
        # Chunk sizes and offsets.
        (
            "chunk past nbytes",
            lambda: [h, *s, K0[0], chunk(0, K0_BYTES + b"xx")],
            INV,
            "past the declared",
        ),
        (
            "chunk offset out of order",
            lambda: [h, *s, K0[0], chunk(0, K0_BYTES[:100]), chunk(200, K0_BYTES[200:300])],
            INV,
            "offset",
        ),
        (
            "chunk offset repeated",
            lambda: [h, *s, K0[0], chunk(0, K0_BYTES[:100]), chunk(0, K0_BYTES[:100])],
            INV,
            "offset",
        ),
        ("empty chunk", lambda: [h, *s, K0[0], chunk(0, b"")], INV, "empty chunk"),
        (
            "tensor cut short",
            lambda: [h, *s, K0[0], chunk(0, K0_BYTES[:100]), *tensor(4, 0, VALUES[0])],
            INV,
            "expected chunks",
        ),
        (
            "crc mismatch",
            lambda: [h, *s, begin(3, 0, KEYS[0], crc32=zlib.crc32(K0_BYTES) ^ 1), K0[1]],
            LOSS,
            "CRC-32",
        ),
        # Non-finite numbers.
        (
            "NaN in scores",
            lambda: [h, *tensor(1, 0, with_bad(SCORES, math.nan))],
            INV,
            "NaN",
        ),
        (
            "Inf in scores",
            lambda: [h, *tensor(1, 0, with_bad(SCORES, math.inf))],
            INV,
            "Inf",
        ),
        (
            "NaN in keys",
            lambda: [h, *s, *layer(0, k=with_bad(KEYS[0], math.nan)), *layer(1), FIN],
            INV,
            "non-finite",
        ),
        (
            "Inf in values",
            lambda: [h, *s, *layer(0), *layer(1, v=with_bad(VALUES[1], -math.inf)), FIN],
            INV,
            "non-finite",
        ),
        (
            "NaN in keys, policy none",
            lambda: [
                Req(header=header(KEYS, HQ, policy="none", ratio=None, store=True, key="h/n")),
                *layer(0, k=with_bad(KEYS[0], math.nan)),
                *layer(1),
                FIN,
            ],
            INV,
            "non-finite",
        ),
        (
            "NaN window queries",
            lambda: [
                h,
                *tensor(2, 0, with_bad(torch.randn(L, 1, HQ, 4, D, dtype=torch.float16), math.nan)),
                *layer(0),
                *layer(1),
                FIN,
            ],
            INV,
            "NaN",
        ),
        # Header fields.
        ("unknown policy", lambda: [Req(header=hdr(policy="evil"))], INV, "policy"),
        ("ratio out of range", lambda: [Req(header=hdr(ratio=1.5))], INV, "ratio"),
        ("ratio NaN", lambda: [Req(header=hdr(ratio=math.nan))], INV, "ratio"),
        ("ratio and n_keep", lambda: [Req(header=hdr(n_keep=3))], INV, "exactly one"),
        (
            "bad policy setting",
            lambda: [Req(header=_with_settings({"agg_task": "bogus"}))],
            INV,
            "agg_task",
        ),
        ("bad quant setting", lambda: [Req(header=_with_quant(k_error_bound=0.0))], INV, "bound"),
        ("bad quant mode", lambda: [Req(header=_with_quant(mode="zip"))], INV, "mode"),
        ("bad store key", lambda: [Req(header=hdr(key="../a b"))], INV, "invalid key"),
        (
            "token ids without model",
            lambda: [Req(header=_with_tokens())],
            INV,
            "model",
        ),
    ]


def _with_settings(settings_: dict[str, str]) -> pb.CompressHeader:
    h = hdr()
    h.policy_settings.update(settings_)
    return h


def _with_quant(**kw: Any) -> pb.CompressHeader:
    h = hdr()
    for name, value in kw.items():
        setattr(h.quant, name, value)
    return h


def _with_tokens() -> pb.CompressHeader:
    h = hdr(key="")
    h.token_ids.extend([1, 2, 3])
    return h


class Target:
    """A server plus a raw stub, with a baseline entry to prove nothing else gets stored."""

    def __init__(self, server: KVPackServer, channel: aio.Channel) -> None:
        self.server = server
        self.channel = channel
        self.stub = pb_grpc.KVPackStub(channel)
        self.blob = codec.encode(KEYS, VALUES)

    async def setup(self) -> None:
        await self.stub.Put(put_requests(self.blob, "baseline/one"), timeout=10)

    async def expect(self, aw: Any, code: grpc.StatusCode, word: str) -> str:
        """Await ``aw``; it must fail with ``code`` and a message containing ``word``."""
        try:
            await aw
        except aio.AioRpcError as e:
            got, details = e.code(), e.details() or ""
        else:
            raise AssertionError(f"accepted; expected {code.name} naming {word!r}")
        assert got == code, f"{got.name}: {details}"
        assert word.lower() in details.lower(), details
        return details

    async def unharmed(self) -> None:
        """Health SERVING; exactly the baseline entry stored, intact."""
        health = health_pb2_grpc.HealthStub(self.channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        listed = await self.stub.List(pb.ListRequest(), timeout=5)
        assert [e.key for e in listed.entries] == ["baseline/one"]
        usage = await self.server.store.usage()
        assert (usage.entries, usage.bytes) == (1, len(self.blob))
        assert await fetch(self.stub, "baseline/one", timeout=5) == self.blob


@pytest.fixture
async def target(start_server: Any, channels: Any) -> Target:
    server = await start_server()
    t = Target(server, channels(server.address))
    await t.setup()
    return t


async def compress_call(stub: Any, requests: list[Req]) -> None:
    async for _ in stub.Compress(aiter_of(iter(requests)), timeout=20):
        pass


async def test_valid_stream_is_accepted(target: Target) -> None:
    """The baseline the hostile cases are mutations of."""
    await compress_call(target.stub, valid())
    await target.stub.Delete(pb.DeleteRequest(key="hostile/x"), timeout=5)
    await target.unharmed()


async def test_hostile_compress_streams(target: Target) -> None:
    failures = []
    for name, build, code, word in compress_cases():
        try:
            await target.expect(compress_call(target.stub, build()), code, word)
        except AssertionError as e:
            failures.append(f"{name}: {e}")
    assert not failures, "\n".join(failures)
    await target.unharmed()


def _put(key: str, total: int, crc: int, *chunks: pb.Chunk) -> Iterator[pb.PutRequest]:
    yield pb.PutRequest(header=pb.PutHeader(key=key, total_bytes=total, crc32=crc))
    for c in chunks:
        yield pb.PutRequest(chunk=c)


async def test_hostile_puts(target: Target) -> None:
    blob = target.blob
    crc = zlib.crc32(blob)
    stub = target.stub
    rng = random.Random(11)
    for size in (0, 1, 16, 4096):
        junk = rng.randbytes(size)
        await target.expect(stub.Put(put_requests(junk, "junk"), timeout=5), INV, "container")
    cases: list[tuple[Iterator[pb.PutRequest], grpc.StatusCode, str]] = [
        (iter([]), INV, "PutHeader"),
        (iter([pb.PutRequest(chunk=pb.Chunk(data=b"x"))]), INV, "PutHeader"),
        (_put("p", len(blob), crc, pb.Chunk(data=blob[:100])), INV, "incomplete"),
        (_put("p", 100, crc, pb.Chunk(data=blob)), INV, "past the declared"),
        (_put("p", BIG, crc), EXH, "exceeds"),
        (_put("p", len(blob), crc, pb.Chunk(offset=5, data=blob)), INV, "offset"),
        (_put("p", len(blob), crc ^ 1, pb.Chunk(data=blob)), LOSS, "CRC-32"),
        (_put("bad key!", len(blob), crc, pb.Chunk(data=blob)), INV, "invalid key"),
        (
            iter([*_put("p", len(blob), crc), pb.PutRequest(header=pb.PutHeader(key="q"))]),
            INV,
            "only chunks",
        ),
    ]
    for requests, code, word in cases:
        await target.expect(stub.Put(requests, timeout=5), code, word)
    await target.unharmed()


BAD_KEYS = ["", " ", "a b", "x" * 201, "ünicode", "a\nb", "a\x00b", "*", "[a]", "a?b", "ke;y"]


async def test_malformed_keys_on_every_keyed_method(target: Target) -> None:
    stub = target.stub
    for key in BAD_KEYS:
        calls = [
            stub.Stat(pb.StatRequest(key=key), timeout=5),
            stub.Delete(pb.DeleteRequest(key=key), timeout=5),
            fetch(stub, key, timeout=5),
        ]
        if key:  # an empty Put/Compress key asks for a content key; an empty prefix lists all
            calls.append(stub.Put(put_requests(target.blob, key), timeout=5))
            calls.append(compress_call(stub, [Req(header=hdr(key=key))]))
            await target.expect(stub.List(pb.ListRequest(prefix=key), timeout=5), INV, "prefix")
        for call in calls:
            await target.expect(call, INV, "key")
    await target.expect(
        stub.List(pb.ListRequest(page_token="!!not base64"), timeout=5), INV, "page_token"
    )
    await target.expect(fetch(stub, "baseline/one", 5, 9, timeout=5), INV, "layer range")
    await target.unharmed()


async def test_oversized_message_is_refused(target: Target) -> None:
    """A single message over the server's receive limit: RESOURCE_EXHAUSTED from gRPC itself."""
    big_send = [("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES)]
    async with aio.insecure_channel(target.server.address, options=big_send) as channel:
        stub = pb_grpc.KVPackStub(channel)
        huge = b"\x00" * (MAX_MESSAGE_BYTES + 1024)
        requests = _put("p", len(huge), zlib.crc32(huge), pb.Chunk(data=huge))
        await target.expect(stub.Put(requests, timeout=10), EXH, "larger than max")
        requests2 = [Req(header=hdr()), *stats(), K0[0], chunk(0, huge)]
        await target.expect(compress_call(stub, requests2), EXH, "larger than max")
    await target.unharmed()


# -- container damage through Put (sync stub, server on its own loop: hypothesis drives it) ------


@pytest.fixture(scope="module")
def threaded(request: pytest.FixtureRequest) -> Iterator[tuple[Any, Any, bytes]]:
    """(server thread, sync stub, small real container) shared by the damage tests."""
    running = ServerThread()
    channel = grpc.insecure_channel(running.address)
    stub = pb_grpc.KVPackStub(channel)
    k = torch.randn(1, 1, 8, 4, generator=torch.Generator().manual_seed(3))
    blob = codec.encode(
        [k], [k], settings=codec.QuantSettings(k_window=0, v_window=0, block_tokens=4)
    )
    yield running, stub, blob
    channel.close()
    running.stop()


def put_code(stub: Any, data: bytes, crc: int | None = None) -> tuple[grpc.StatusCode, str]:
    requests = list(put_requests(data, "damaged"))
    if crc is not None:
        requests[0].header.crc32 = crc
    try:
        stub.Put(iter(requests), timeout=5)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def assert_nothing_stored(running: Any) -> None:
    assert running.run(running.server.store.usage()).entries == 0


@pytest.mark.slow
def test_every_truncation_via_put(threaded: tuple[Any, Any, bytes]) -> None:
    running, stub, blob = threaded
    for cut in range(len(blob)):
        code, details = put_code(stub, blob[:cut])
        assert code == INV, f"cut {cut}: {code.name} {details}"
        assert "container" in details
    assert_nothing_stored(running)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_bit_flips_via_put(threaded: tuple[Any, Any, bytes], data: st.DataObject) -> None:
    running, stub, blob = threaded
    flips = data.draw(st.lists(st.integers(0, 8 * len(blob) - 1), min_size=1, max_size=4))
    damaged = bytearray(blob)
    for bit in flips:
        damaged[bit // 8] ^= 1 << (bit % 8)
    if bytes(damaged) == blob:
        return  # flips cancelled out
    # Damaged before upload (wire CRC matches): the container's own checks must catch it.
    code, details = put_code(stub, bytes(damaged))
    assert code == INV and "container" in details, f"{flips}: {code.name} {details}"
    # Damaged in transit (wire CRC of the original): the wire CRC catches it.
    code, details = put_code(stub, bytes(damaged), crc=zlib.crc32(blob))
    assert code == LOSS and "CRC-32" in details, f"{flips}: {code.name} {details}"
    assert_nothing_stored(running)
