"""The service end to end: Compress without and with storing (bench/service.py, against its bare
gRPC byte stream of the same size), then Fetch + client decode of a stored entry.

Compress figures are bench/service.py's (best of --repeats, MB/s of uploaded bytes, its own
32-layer bf16 shape with n chosen so K+V is the size of this run's cache). Fetch is timed here
against a `kvpack serve` subprocess: Fetch alone (bytes) and Fetch + decode (what
AsyncKVPackClient.fetch does, on --device), as GB/s of stored and of decoded (kept) K+V bytes.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import torch

from kvpack.bench import data, loopback, service
from kvpack.bench.timing import Timing, gbps, summarize
from kvpack.client import AsyncKVPackClient


def _compress(args: argparse.Namespace, mib: float, store: bool) -> dict[str, Any]:
    opts = argparse.Namespace(
        mib=mib, repeats=args.repeats, workers=args.workers, store=store, return_cache=False
    )
    return service.run(opts)


async def _timed(fn: Any, repeats: int) -> Timing:
    """Async twin of timing.measure: one warm-up, then `repeats` timed awaits."""
    loop = asyncio.get_running_loop()
    await fn()
    samples = []
    for _ in range(max(1, repeats)):
        start = loop.time()
        await fn()
        samples.append(loop.time() - start)
    return summarize(samples)


async def _fetch(args: argparse.Namespace) -> dict[str, Any]:
    keys, values = data.cache(argparse.Namespace(**{**vars(args), "device": "cpu"}))
    size = data.nbytes(keys + values)
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(args.layers, 1, args.q_heads, args.seq, generator=gen).softmax(-1)
    async with (
        loopback.server(workers=args.workers) as address,
        AsyncKVPackClient(address, timeout=600.0) as client,
    ):
        result = await client.compress(
            keys, values, scores=scores, ratio=args.ratio, store=True, return_cache=False
        )
        key, stored, kept = result.key, result.stored_bytes, result.kept_bytes
        fetch = await _timed(lambda: client.fetch_bytes(key), args.repeats)
        decode = await _timed(lambda: client.fetch(key, device=args.device), args.repeats)
    return {
        "cache_bytes": size,
        "kept_bytes": kept,
        "stored_bytes": stored,
        "fetch_bytes": fetch,
        "fetch_decode": decode,
        "fetch_stored_gbps": gbps(stored, fetch),
        "fetch_decode_gbps": gbps(kept, decode),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """{"compress": service figures, "compress_store": same with storing, "fetch": {...}}."""
    keys, values = data.cache(argparse.Namespace(**{**vars(args), "layers": 1, "device": "cpu"}))
    mib = args.layers * data.nbytes(keys + values) / 2**20
    return {
        "compress": _compress(args, mib, store=False),
        "compress_store": _compress(args, mib, store=True),
        "fetch": asyncio.run(_fetch(args)),
    }
