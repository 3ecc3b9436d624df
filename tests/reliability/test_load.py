"""Load: 16 concurrent clients doing compress/store/fetch cycles against a `kvpack serve`
subprocess on loopback. Zero errors, every fetched entry within the codec's error bound, server
RSS bounded, latency percentiles reported (``-s`` shows them; also junit properties)."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kvpack.client import AsyncKVPackClient
from kvpack.codec import QuantSettings
from tests.codec.test_quant import check_bound
from tests.deploy.deploy_support import Served, Servers
from tests.server.server_support import make_cache

CLIENTS = 16
CYCLES = 6
#: ``KVPACK_SOAK_SECONDS=60`` turns the test into a soak: every client cycles until that many
#: seconds have passed (keys reused, so the store stays the same size) and server RSS is sampled
#: every few seconds; the run must stay error-free with flat RSS after warm-up.
SOAK_SECONDS = float(os.environ.get("KVPACK_SOAK_SECONDS", "0"))
#: Small realistic shape: 4 layers, GQA 8/2 heads, 256 tokens, head_dim 64, bf16 (512 KiB K+V).
SHAPE: dict[str, Any] = {"layers": 4, "hkv": 2, "hq": 8, "n": 256, "d": 64}
#: Windows small enough that most kept tokens go through the lossy path.
QUANT = QuantSettings(k_window=16, v_window=16, block_tokens=32)
#: Documented cap on server RSS growth over the measured cycles (after warm-up). The entries
#: themselves are ~7 MB; the rest is allocator slack under concurrency.
RSS_GROWTH_CAP_MIB = 200


def rss_mib(pid: int) -> float:
    """VmRSS of process ``pid`` in MiB (from /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def cycle(
    client: AsyncKVPackClient, cache: Any, key: str, lat: dict[str, list[float]]
) -> None:
    """One compress(store) + fetch + verify cycle."""
    scores, keys, values = cache
    start = time.perf_counter()
    result = await client.compress(
        keys, values, scores=scores, ratio=0.5, key=key, quant=QUANT, return_cache=True
    )
    mid = time.perf_counter()
    decoded = await client.fetch(key)
    end = time.perf_counter()
    lat["compress"].append(mid - start)
    lat["fetch"].append(end - mid)
    lat["cycle"].append(end - start)
    assert decoded.layers == list(range(SHAPE["layers"]))
    for layer in range(SHAPE["layers"]):
        assert decoded.indices[layer] is not None
        assert torch.equal(decoded.indices[layer], result.indices[layer])
        # |x - x̂| <= bound for every kept element, windows exact (docs of kvpack.codec.quant).
        check_bound(result.keys[layer], decoded.keys[layer], "k", QUANT)
        check_bound(result.values[layer], decoded.values[layer], "v", QUANT)


@pytest.mark.slow
async def test_sixteen_concurrent_clients(tmp_path: Path, record_property: Any) -> None:
    servers = Servers(tmp_path)
    try:
        (served,) = await asyncio.to_thread(servers, "--store", "memory", "--workers", "2")
        await run_load(served, record_property)
    finally:
        await asyncio.to_thread(servers.stop)
    log = served.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


async def run_load(served: Served, record_property: Any) -> None:
    pid = served.proc.pid
    caches = [make_cache(**SHAPE, seed=1000 + c) for c in range(CLIENTS)]
    clients = [AsyncKVPackClient(served.target, timeout=60) for _ in range(CLIENTS)]
    try:
        rss_idle = rss_mib(pid)
        warm: dict[str, list[float]] = {"compress": [], "fetch": [], "cycle": []}
        await asyncio.gather(
            *(cycle(clients[c], caches[c], f"warm/{c}", warm) for c in range(CLIENTS))
        )
        rss_warm = rss_mib(pid)

        lat: dict[str, list[float]] = {"compress": [], "fetch": [], "cycle": []}
        done = [0] * CLIENTS
        start = time.perf_counter()
        end = start + SOAK_SECONDS

        async def worker(c: int) -> None:
            while done[c] < CYCLES or time.perf_counter() < end:
                await cycle(clients[c], caches[c], f"load/{c}/{done[c] % CYCLES}", lat)
                done[c] += 1

        samples: list[float] = []

        async def sample_rss() -> None:
            while True:
                samples.append(rss_mib(pid))
                await asyncio.sleep(5)

        sampler = asyncio.create_task(sample_rss())
        outcomes = await asyncio.gather(
            *(worker(c) for c in range(CLIENTS)), return_exceptions=True
        )
        sampler.cancel()
        wall = time.perf_counter() - start
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        assert not errors, f"{len(errors)} clients failed, first: {errors[0]!r}"
        assert len(lat["cycle"]) == sum(done)
        listed = [e.key async for e in clients[0].list("load/")]
        assert len(listed) == CLIENTS * CYCLES
        rss_after = rss_mib(pid)
        samples.append(rss_after)
    finally:
        await asyncio.gather(*(c.close() for c in clients))

    figures = {
        "cycles": len(lat["cycle"]),
        "wall_s": round(wall, 2),
        "cycles_per_s": round(len(lat["cycle"]) / wall, 2),
        "rss_idle_mib": round(rss_idle, 1),
        "rss_warm_mib": round(rss_warm, 1),
        "rss_after_mib": round(rss_after, 1),
        "rss_max_mib": round(max(samples), 1),
        "cpus": os.cpu_count() or 0,
    }
    for op in ("compress", "fetch", "cycle"):
        figures[f"{op}_p50_ms"] = round(1000 * statistics.median(lat[op]), 1)
        figures[f"{op}_p99_ms"] = round(1000 * percentile(lat[op], 0.99), 1)
    for name, value in figures.items():
        record_property(name, value)
    print("\nkvpack load:", " ".join(f"{k}={v}" for k, v in figures.items()))
    growth = max(samples) - rss_warm
    assert growth < RSS_GROWTH_CAP_MIB, f"server RSS grew {growth:.0f} MiB under load"
