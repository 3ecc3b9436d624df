"""The driver's ``bench`` command: the kvpack plugin vs LMCache's local disk backend.

Runs in LMCache's environment (see lmcache_driver.py). For each backend config (e.g. the kvpack
plugin, and ``local_disk`` with the same chunk size) one LMCache StorageManager is built from
the config and the same chunks (same shapes, same synthetic KV, same seeds) are stored and read
back through it, ``repeats`` times with fresh keys:

- put: ``batched_put`` of ``chunks`` chunks until LMCache finds every one (its puts are
  asynchronous; polled every 2 ms), GB/s of raw chunk bytes;
- get: the same chunks the way LMCacheEngine.retrieve reads them (``get_block_mapping``, then
  ``batched_get`` per backend; every one must hit), GB/s of raw chunk bytes;
- stored bytes: for kvpack what the service stores (``EntryInfo.stored_bytes``), for the disk
  backend the files' sizes.

Chunk allocation and filling are not timed. Command: ``{"op": "bench", "model": {...},
"backends": {"kvpack": config, "local_disk": config}, "chunks": 8, "repeats": 3,
"disk_path": path}``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _stored_bytes(name: str, engine: Any, cmd: dict[str, Any]) -> int:
    if name == "kvpack":
        connector = engine.connection().getWrappedConnector()
        prefix = connector.settings.key_prefix
        return sum(e.stored_bytes for e in connector.client.list(prefix))
    path = Path(cmd["disk_path"])
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(driver: Any, cmd: dict[str, Any]) -> dict[str, Any]:
    from kvpack.bench.lmcache_driver import Engine

    chunks, repeats = int(cmd.get("chunks", 8)), int(cmd.get("repeats", 3))
    out: dict[str, Any] = {}
    for b, (name, config) in enumerate(cmd["backends"].items()):
        engine = Engine(config, cmd["model"], driver.workdir)
        put_gbps, get_gbps = [], []
        raw = 0
        try:
            for r in range(repeats + 1):  # the first round warms up (JIT, connections, files)
                specs = [{"hash": (b << 40) + (r << 20) + i + 1, "seed": i} for i in range(chunks)]
                objs = [engine.allocate(s) for s in specs]
                keys = [engine.key(s) for s in specs]
                raw = sum(o.get_size() for o in objs)
                t0 = time.perf_counter()
                engine.manager.batched_put(keys, objs)
                if not engine.wait_stored(keys):
                    raise RuntimeError(f"{name}: chunks not stored after 120 s")
                t1 = time.perf_counter()
                got = engine.retrieve(keys)
                t2 = time.perf_counter()
                misses = sum(g is None for g in got)
                for g in got:
                    if g is not None:
                        g.ref_count_down()
                if misses:
                    raise RuntimeError(
                        f"{name}: {misses} of {chunks} chunks missed right after put"
                    )
                if r:
                    put_gbps.append(raw / (t1 - t0) / 1e9)
                    get_gbps.append(raw / (t2 - t1) / 1e9)
            stored = _stored_bytes(name, engine, cmd)
        finally:
            engine.manager.close()
        out[name] = {
            "put_gbps": _summary(put_gbps),
            "get_gbps": _summary(get_gbps),
            "raw_bytes_per_round": raw,
            "stored_bytes_all_rounds": stored,
            "rounds": repeats + 1,
        }
    return {"backends": out, "chunks": chunks, "repeats": repeats}
