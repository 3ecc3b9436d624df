"""`kvpack bench --only lmcache`: kvpack behind LMCache, against LMCache's own storage and serdes.

Not in the default sections: it needs LMCache's environment (bench/lmcache_env.py; built once,
minutes, or --lmcache-python). In that environment, through LMCache 0.5.6's own loading path
(bench/lmcache_driver.py), on the same chunks of this run's shape (--layers x --kv-heads x
--head-dim, --dtype, 256-token chunks; synthetic K/V as the lossy section's):

- put / get throughput (GB/s of raw chunk bytes, --lmcache-chunks per round, --repeats rounds)
  of the kvpack plugin (a `kvpack serve` subprocess on loopback, memory store, default lossy
  settings) and of LMCache's local disk backend, each behind a StorageManager;
- bytes stored per chunk: LMCache's naive serde (raw), its fp8 serde, kvpack's serde (lossy and
  fixed) through LMCache's serde factory, and the kvpack plugin (what the service stores).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path
from typing import Any

from kvpack.bench import loopback
from kvpack.bench.eviction import DTYPES
from kvpack.bench.lmcache_env import Driver, build_seconds, lmcache_python

CHUNK_TOKENS = 256
PLUGIN = "remote_storage_plugin.kvpack."


def _configs(target: str, disk: Path) -> dict[str, dict[str, Any]]:
    common = {"chunk_size": CHUNK_TOKENS, "local_cpu": False, "max_local_cpu_size": 1.0}
    plugin = {
        **common,
        "remote_serde": "naive",
        "remote_storage_plugins": ["kvpack"],
        "extra_config": {
            PLUGIN + "module_path": "kvpack.client.lmcache.connector",
            PLUGIN + "class_name": "KVPackConnector",
            PLUGIN + "target": target,
        },
    }
    local_disk = {**common, "local_disk": str(disk), "max_local_disk_size": 4.0}
    return {"kvpack": plugin, "local_disk": local_disk}


def _torch_dtype(args: argparse.Namespace) -> str:
    """torch's name of --dtype (the driver's model spec names torch dtypes)."""
    return str(DTYPES[args.dtype]).removeprefix("torch.")


async def _run(args: argparse.Namespace, python: Path) -> dict[str, Any]:
    model = {
        "model_name": "bench/synthetic",
        "dtype": _torch_dtype(args),
        "kv_shape": [args.layers, 2, CHUNK_TOKENS, args.kv_heads, args.head_dim],
    }
    case = {
        "name": "chunk",
        "dtype": model["dtype"],
        "layers": args.layers,
        "heads": args.kv_heads,
        "head_dim": args.head_dim,
        "tokens": CHUNK_TOKENS,
        "seed": 1,
    }
    serdes = [
        {"label": "kvpack lossy", "type": "kvpack", "head_dim": args.head_dim},
        {"label": "kvpack fixed", "type": "kvpack", "head_dim": args.head_dim, "mode": "fixed"},
        {"label": "fp8", "type": "fp8"},
    ]
    with tempfile.TemporaryDirectory(prefix="kvpack-bench-lmcache-") as tmp:
        work = Path(tmp)
        async with loopback.server(workers=args.workers) as target:
            with Driver(python, work / "lmcache.log") as driver:
                versions = driver.send("versions")
                serde = driver.send("serde", cases=[case], serdes=serdes)["cases"][0]
                timing = driver.send(
                    "bench",
                    model=model,
                    backends=_configs(target, work / "disk"),
                    chunks=args.lmcache_chunks,
                    repeats=args.repeats,
                    disk_path=str(work / "disk"),
                )
    return {"versions": versions, "serde": serde, "timing": timing}


def run(args: argparse.Namespace) -> dict[str, Any]:
    python = lmcache_python(getattr(args, "lmcache_python", None))
    out = asyncio.run(_run(args, python))
    out["environment"] = {"python": str(python), "build": build_seconds(python)}
    return out


def rows(res: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """bench/report.py rows: throughput vs LMCache's local disk, bytes vs its naive serde."""
    out: list[tuple[str, str, str, str]] = []
    backends = res["timing"]["backends"]
    disk = backends["local_disk"]
    for name, label in (("kvpack", "kvpack plugin"), ("local_disk", "LMCache local disk")):
        b = backends[name]
        for way in ("put", "get"):
            r = b[f"{way}_gbps"]
            versus = f"{r['median'] / disk[f'{way}_gbps']['median']:.3f}x local disk"
            out.append(
                (
                    f"{label}: {way} ({res['timing']['chunks']} chunks)",
                    f"{r['median']:.3f} GB/s",
                    f"{r['min']:.3f}–{r['max']:.3f}",
                    versus,
                )
            )
    serde = res["serde"]
    raw = serde["raw_bytes"]
    out.append(("LMCache naive: bytes/chunk", f"{raw}", "", "1x (reference)"))
    for label in ("fp8", "kvpack lossy", "kvpack fixed"):
        stored = serde[label]["stored_bytes"]
        out.append((f"serde {label}: bytes/chunk", f"{stored}", "", f"{raw / stored:.2f}x smaller"))
    kv = backends["kvpack"]
    per_chunk = kv["stored_bytes_all_rounds"] / (kv["rounds"] * res["timing"]["chunks"])
    out.append(
        (
            "kvpack plugin: stored bytes/chunk",
            f"{per_chunk:.0f}",
            "",
            f"{raw / per_chunk:.2f}x smaller",
        )
    )
    return out
