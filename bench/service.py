"""End-to-end Compress throughput on loopback vs a bare gRPC byte stream of the same size.

    .venv/bin/python -m kvpack.bench.service [--mib 256] [--store] [--return-cache]
    .venv/bin/python -m kvpack.bench.service --message-sizes [--mib 128 --repeats 4]

A child process serves both a kvpack server (memory store) and a trivial byte sink defined here
(not in the product proto): a client-streaming RPC that counts the bytes of 1 MiB messages. The
parent uploads the same number of bytes to each, one stream at a time, and reports MB/s of both
and their ratio (target >= 0.7). The KV cache is bf16, L layers of [1, 8, n, 128] with scores
[L, 1, 32, n]; Compress runs kvcompose at ratio 0.5 (select + gather per layer), plus encoding
with ``--store`` and streaming the composite cache back with ``--return-cache``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import torch
from grpc import aio

from kvpack import wire
from kvpack.client import messages
from kvpack.options import channel_options, server_options

SINK_METHOD = "/kvpack.bench.Sink/Upload"
KV_HEADS, Q_HEADS, HEAD_DIM, LAYERS = 8, 32, 128, 32


def _identity(b: bytes) -> bytes:
    return b


async def _sink(requests: AsyncIterator[bytes], context: aio.ServicerContext) -> bytes:
    total = 0
    async for chunk in requests:
        total += len(chunk)
    return str(total).encode()


async def _child(workers: int) -> None:
    """Serve kvpack and the sink on free loopback ports; print both; run until stdin closes."""
    from kvpack.server.app import KVPackServer
    from kvpack.server.config import ServerConfig

    kv = KVPackServer(ServerConfig(port=0, metrics_port=0, workers=workers, store_bytes=8 << 30))
    await kv.start()
    sink = aio.server(options=server_options())
    handler = grpc.stream_unary_rpc_method_handler(
        _sink, request_deserializer=_identity, response_serializer=_identity
    )
    sink.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("kvpack.bench.Sink", {"Upload": handler})]
    )
    sink_port = sink.add_insecure_port("127.0.0.1:0")
    await sink.start()
    print(json.dumps({"kvpack": kv.address, "sink": f"127.0.0.1:{sink_port}"}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await sink.stop(0)
    await kv.stop(0)


def _cache(n: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(LAYERS, 1, Q_HEADS, n, generator=g)
    keys = [
        torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=g).to(torch.bfloat16) for _ in range(LAYERS)
    ]
    values = [
        torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=g).to(torch.bfloat16) for _ in range(LAYERS)
    ]
    return scores, keys, values


def _requests(
    scores: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    store: bool,
    return_cache: bool,
) -> AsyncIterator[bytes]:
    """The client library's serialised request stream (kvpack.client.messages)."""
    upload = messages.compress_upload(
        keys,
        values,
        {
            "scores": scores,
            "ratio": 0.5,
            "store": store,
            "key": "bench/kv",
            "return_cache": return_cache,
        },
    )

    async def gen() -> AsyncIterator[bytes]:
        for frame in upload.frames():
            yield frame

    return gen()


async def _bench(args: argparse.Namespace, addresses: dict[str, str]) -> dict[str, Any]:
    n = max(1, int(args.mib * (1 << 20)) // (LAYERS * 2 * KV_HEADS * HEAD_DIM * 2))
    scores, keys, values = _cache(n)
    kv_bytes = sum(t.numel() * 2 for t in keys + values)
    upload_bytes = kv_bytes + scores.numel() * 4
    payload = bytes(wire.CHUNK_BYTES)
    chunks = -(-upload_bytes // wire.CHUNK_BYTES)
    out: dict[str, Any] = {"kv_mib": kv_bytes / (1 << 20), "upload_mib": upload_bytes / (1 << 20)}
    async with (
        aio.insecure_channel(addresses["kvpack"], options=channel_options()) as kch,
        aio.insecure_channel(addresses["sink"], options=channel_options()) as sch,
    ):
        compress = messages.compress_method(kch)
        upload = sch.stream_unary(
            SINK_METHOD, request_serializer=_identity, response_deserializer=_identity
        )

        async def raw() -> AsyncIterator[bytes]:
            for _ in range(chunks):
                yield payload

        bare, comp = [], []
        summary = None
        for _ in range(args.repeats):
            start = time.perf_counter()
            got = await upload(raw(), timeout=600)
            bare.append(time.perf_counter() - start)
            assert int(got) == chunks * wire.CHUNK_BYTES
            start = time.perf_counter()
            async for r in compress(
                _requests(scores, keys, values, args.store, args.return_cache), timeout=600
            ):
                if r.HasField("summary"):
                    summary = r.summary
            comp.append(time.perf_counter() - start)
    assert summary is not None
    bare_mbs = chunks * wire.CHUNK_BYTES / min(bare) / 1e6
    comp_mbs = upload_bytes / min(comp) / 1e6
    out.update(
        bare_stream_mb_s=round(bare_mbs, 1),
        compress_mb_s=round(comp_mbs, 1),
        ratio=round(comp_mbs / bare_mbs, 3),
        store=args.store,
        return_cache=args.return_cache,
        token_ratio=round(summary.token_ratio, 3),
        compression_ratio=round(summary.compression_ratio, 2),
        server_timings_s={k: round(v, 3) for k, v in summary.timings_seconds.items()},
    )
    return out


#: Message sizes compared by ``--message-sizes`` (kvpack streams wire.CHUNK_BYTES = 1 MiB).
MESSAGE_SIZES = (64 << 10, 256 << 10, 1 << 20, 4 << 20)


async def _message_sizes(args: argparse.Namespace, addresses: dict[str, str]) -> dict[str, Any]:
    """Best MB/s of uploading ``--mib`` MiB to the byte sink in messages of each of
    MESSAGE_SIZES, rounds interleaved so that load drifts hit every size alike."""
    total = int(args.mib * (1 << 20))
    best = dict.fromkeys(MESSAGE_SIZES, 0.0)
    async with aio.insecure_channel(addresses["sink"], options=channel_options()) as channel:
        upload = channel.stream_unary(
            SINK_METHOD, request_serializer=_identity, response_deserializer=_identity
        )
        for _ in range(args.repeats):
            for size in MESSAGE_SIZES:
                payload, count = bytes(size), max(1, total // size)

                async def messages_(payload: bytes = payload, count: int = count) -> Any:
                    for _ in range(count):
                        yield payload

                start = time.perf_counter()
                assert int(await upload(messages_(), timeout=600)) == count * size
                best[size] = max(best[size], count * size / (time.perf_counter() - start) / 1e6)
    ref = best[wire.CHUNK_BYTES]
    return {
        f"{s >> 10}KiB": {"mb_s": round(v, 1), "vs_1MiB": round(v / ref, 2)}
        for s, v in best.items()
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; returns the figures (also printed by ``main``)."""
    child = subprocess.Popen(
        [sys.executable, "-m", "kvpack.bench.service", "--child", "--workers", str(args.workers)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        addresses = json.loads(child.stdout.readline())
        if getattr(args, "message_sizes", False):
            return asyncio.run(_message_sizes(args, addresses))
        return asyncio.run(_bench(args, addresses))
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=float, default=256, help="MiB of K+V to upload (256)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each; best is kept")
    parser.add_argument("--workers", type=int, default=2, help="server codec threads (2)")
    parser.add_argument("--store", action="store_true", help="also encode and store")
    parser.add_argument("--return-cache", action="store_true", help="stream composite K/V back")
    parser.add_argument(
        "--message-sizes",
        action="store_true",
        help="instead: the bare stream's MB/s by message size (64 KiB to 4 MiB)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        asyncio.run(_child(args.workers))
        return 0
    result = run(args)
    if args.message_sizes:
        print(json.dumps(result))
        return 0
    print(
        f"bare gRPC stream {result['bare_stream_mb_s']} MB/s, Compress "
        f"{result['compress_mb_s']} MB/s, ratio {result['ratio']}x "
        f"({result['upload_mib']:.0f} MiB uploaded)"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
