"""Concurrency: 1, 4, 16 asyncio clients against one loopback `kvpack serve` process.

Every client sends `--requests` Compress calls (kvcompose at --ratio, stored, no cache returned)
of one request cache [layers, 1, kv_heads, --conc-seq, head_dim] back to back; all clients start
together after one untimed warm-up call. Throughput: input (K+V) GB/s and requests/s over the
wall time of the whole round; latency: p50/p99 of single calls. With 16 x 4 calls, p99 is
close to the slowest call.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import torch

from kvpack.bench import data, loopback
from kvpack.bench.timing import percentile
from kvpack.client import AsyncKVPackClient

CLIENTS = (1, 4, 16)


def _request(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of one Compress call: K, V and attention scores on the CPU."""
    shape = argparse.Namespace(**{**vars(args), "seq": args.conc_seq, "device": "cpu"})
    keys, values = data.cache(shape)
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(args.layers, 1, args.q_heads, args.conc_seq, generator=gen)
    return {
        "keys": keys,
        "values": values,
        "scores": logits.softmax(-1),
        "ratio": args.ratio,
        "store": True,
        "return_cache": False,
    }


async def _round(address: str, clients: int, requests: int, call: dict[str, Any]) -> list[float]:
    """Latencies (s) of `clients` x `requests` calls; each client has its own channel."""
    conns = [AsyncKVPackClient(address, timeout=600.0, retries=0) for _ in range(clients)]

    async def client(c: AsyncKVPackClient) -> list[float]:
        out = []
        for _ in range(requests):
            start = time.perf_counter()
            await c.compress(**call)
            out.append(time.perf_counter() - start)
        return out

    try:
        await asyncio.gather(*(c.info() for c in conns))  # connect before timing
        results = await asyncio.gather(*(client(c) for c in conns))
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    return [t for r in results for t in r]


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    call = _request(args)
    size = data.nbytes(call["keys"] + call["values"])
    out: dict[str, Any] = {"request_bytes": size, "requests_per_client": args.requests}
    async with loopback.server() as address:
        await _round(address, 1, 1, call)  # warm-up: server imports, codec pool, allocator
        for n in CLIENTS:
            start = time.perf_counter()
            lat = await _round(address, n, args.requests, call)
            wall = time.perf_counter() - start
            p50, p99 = percentile(lat, 50), percentile(lat, 99)
            out[str(n)] = {
                "calls": len(lat),
                "wall_s": wall,
                "gbps": size * len(lat) / wall / 1e9,
                "requests_per_s": len(lat) / wall,
                "p50_s": p50,
                "p99_s": p99,
                "min_s": min(lat),
                "max_s": max(lat),
                "p99_over_p50": p99 / p50,
            }
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """{"request_bytes", "requests_per_client", "<clients>": {"calls", "wall_s", "gbps",
    "requests_per_s", "p50_s", "p99_s", "min_s", "max_s", "p99_over_p50"}} for 1, 4, 16."""
    return asyncio.run(_run(args))
