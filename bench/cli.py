"""`kvpack bench`: codec, eviction and service figures on this machine, against references
measured in the same run (memory copy, plain zstd, a bare gRPC byte stream).

    kvpack bench [--layers 2 --kv-heads 8 --q-heads 32 --head-dim 128 --seq 4096 --dtype fp16
        --repeats 3 --only copy,eviction,lossy,codec,zstd,service,concurrency --json out.json]

The shape is Llama-3-8B's (32 layers, 8 KV heads, head_dim 128, 4k tokens) scaled to fit: by
default 2 of the 32 layers, so the whole run takes a few minutes on 2 cores; every figure is
per byte, so the full cache costs 16x the times shown. Codec figures run on one thread
(--threads) because the targets are per core.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kvpack.bench import codec_speed, eviction, machine, report

SECTIONS = ("copy", "eviction", "lossy", "codec", "zstd", "service", "concurrency")
# Run only when named in --only: it needs LMCache's own environment (bench/lmcache.py).
EXTRA_SECTIONS = ("lmcache",)
# section -> module exposing run(args) -> dict
MODULES = {
    "lmcache": "kvpack.bench.lmcache",
    "copy": "kvpack.bench.memcopy",
    "eviction": "kvpack.bench.eviction",
    "lossy": "kvpack.bench.lossy",
    "codec": "kvpack.bench.codec_speed",
    "zstd": "kvpack.bench.zstd_baselines",
    "service": "kvpack.bench.endtoend",
    "concurrency": "kvpack.bench.concurrency",
}
FULL_LAYERS = 32


def configure(parser: argparse.ArgumentParser) -> None:
    """Shape and eviction options come from bench/eviction.py; defaults scaled to fit."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    eviction.configure(parser)
    codec_speed.configure(parser)
    parser.set_defaults(layers=2, seq=4096, repeats=3)
    parser.epilog = (
        "defaults: --layers 2 --kv-heads 8 --q-heads 32 --head-dim 128 --seq 4096 --dtype fp16 "
        "--ratio 0.75 --repeats 3 --threads 1 --workers 2 --conc-seq 512 --requests 4"
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run, from {','.join(SECTIONS + EXTRA_SECTIONS)} "
        f"({','.join(EXTRA_SECTIONS)} only when named)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = per core)")
    parser.add_argument("--workers", type=int, default=2, help="server codec threads")
    parser.add_argument("--conc-seq", type=int, default=512, help="tokens per concurrency call")
    parser.add_argument("--requests", type=int, default=4, help="calls per concurrency client")
    parser.add_argument("--profile", action="store_true", help="cProfile lossy encode/decode")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument(
        "--lmcache-chunks", type=int, default=8, help="chunks per round of the lmcache section"
    )
    parser.add_argument(
        "--lmcache-python",
        default=None,
        help="python of an environment with LMCache (default: one built once from the checkout)",
    )


def _sections(only: str) -> list[str]:
    names = [s.strip() for s in only.split(",") if s.strip()]
    known = SECTIONS + EXTRA_SECTIONS
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise SystemExit(f"kvpack bench: unknown section(s) {unknown}; known: {list(known)}")
    return [s for s in known if s in names]


def _shape_line(args: argparse.Namespace) -> str:
    cache = 2 * args.layers * args.kv_heads * args.seq * args.head_dim
    cache_mib = cache * torch.empty(0, dtype=eviction.DTYPES[args.dtype]).element_size() / 2**20
    scale = (
        f"{args.layers} of Llama-3-8B's {FULL_LAYERS} layers"
        if args.layers < FULL_LAYERS
        else f"{args.layers} layers"
    )
    return (
        f"shape: {args.layers} layers x {args.kv_heads} KV heads ({args.q_heads} query heads) x "
        f"{args.seq} tokens x head_dim {args.head_dim}, {args.dtype}, {cache_mib:.0f} MiB K+V "
        f"({scale}, scaled to fit); {args.repeats} repeats after 1 warm-up, "
        f"{args.threads} torch thread(s), device {args.device}"
    )


def run(args: argparse.Namespace) -> int:
    """Run the chosen sections, print machine line, shape, table and targets; 0 on success."""
    sections = _sections(args.only)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("kvpack bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    info = machine.describe(args.device)
    print(machine.line(info), flush=True)
    print(_shape_line(args), flush=True)
    results: dict[str, Any] = {}
    missing: list[str] = []
    seconds: dict[str, float] = {}
    for name in sections:
        try:
            module = importlib.import_module(MODULES[name])
        except ModuleNotFoundError as e:
            if not (e.name or "").startswith("kvpack.bench."):
                raise
            missing.append(name)
            print(f"[{name}] skipped: {e.name} is not in this tree yet", flush=True)
            continue
        print(f"[{name}] running ...", flush=True)
        start = time.perf_counter()
        results[name] = module.run(args)
        seconds[name] = time.perf_counter() - start
        torch.set_num_threads(args.threads)  # a section may change it (lossy pins 1 thread)
    profile = results.get("lossy", {}).pop("profile", None)
    copy = report.copy_gbps(results)
    print(report.table({n: report.rows(n, r, copy) for n, r in results.items()}))
    checks = report.targets(results)
    if checks:
        print("targets:\n" + report.target_lines(checks))
    load_end = machine.load_average()
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in load_end)}")
    if isinstance(profile, dict):
        for name, text in profile.items():
            print(f"--- lossy {name} (cProfile, by own time)\n{text}")
    if args.json is not None:
        doc = {
            "machine": info,
            "load_average_end": load_end,
            "command": sys.argv,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "section_seconds": seconds,
            "missing": missing,
            "results": results,
            "targets": checks,
        }
        args.json.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0
