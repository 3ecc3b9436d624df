"""Eviction benchmark: select + gather on a Llama-3-8B-shaped cache, against a plain copy.

    python -m kvpack.bench.eviction [--layers 32 --kv-heads 8 --q-heads 32 --head-dim 128
        --seq 4096 --dtype fp16 --ratio 0.75 --repeats 5 --policies kvpack,kvcompose,snapkv]

Times are wall-clock seconds on the current device (CPU unless --device cuda), median over
`repeats` after one warm-up; `vs_copy` divides by the median time to clone the same cache.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kvpack.codec import POLICIES, gather, select

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to `parser`."""
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seq", type=int, default=4096, help="context length n")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--ratio", type=float, default=0.75, help="fraction of entries removed")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--policies", default=",".join(POLICIES), help="comma-separated policy names"
    )


def _time(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    fn()  # warm-up: allocator, kernels, lazy init
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; returns the figures (also what `main` prints).

    Result: {"shape": {...}, "cache_bytes": int, "copy": timing, "policies": {name: timing
    plus "vs_copy" and "kept_fraction"}}, timing = {"median_s", "min_s", "max_s"}.
    """
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    shape = (1, args.kv_heads, args.seq, args.head_dim)
    gen = torch.Generator().manual_seed(0)
    keys = [torch.randn(shape, generator=gen).to(device, dtype) for _ in range(args.layers)]
    values = [torch.randn(shape, generator=gen).to(device, dtype) for _ in range(args.layers)]
    logits = torch.randn(args.layers, 1, args.q_heads, args.seq, generator=gen)
    scores = torch.softmax(logits, dim=-1).to(device)
    cache_bytes = 2 * sum(k.numel() * k.element_size() for k in keys)

    copy = _time(lambda: ([k.clone() for k in keys], [v.clone() for v in values]), args.repeats)
    results: dict[str, dict[str, float]] = {}
    for name in [p for p in args.policies.split(",") if p]:

        def step(name: str = name) -> list[torch.Tensor]:
            kept = select(
                scores,
                args.ratio,
                name,
                num_kv_heads=args.kv_heads,
                keys=keys,
                values=values,
            )
            gather(keys, values, kept)
            return kept

        timing = _time(step, args.repeats)
        kept_rows = sum(int((t >= 0).sum()) for t in step())
        timing["vs_copy"] = timing["median_s"] / copy["median_s"]
        timing["kept_fraction"] = kept_rows / (args.layers * args.kv_heads * args.seq)
        results[name] = timing
    return {
        "shape": {
            "layers": args.layers,
            "kv_heads": args.kv_heads,
            "q_heads": args.q_heads,
            "head_dim": args.head_dim,
            "seq": args.seq,
            "dtype": args.dtype,
            "ratio": args.ratio,
            "device": str(device),
            "threads": torch.get_num_threads(),
        },
        "cache_bytes": cache_bytes,
        "copy": copy,
        "policies": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvpack.bench.eviction", description=__doc__)
    configure(parser)
    out = run(parser.parse_args(argv))
    copy = out["copy"]
    print(f"shape {out['shape']}  cache {out['cache_bytes'] / 2**20:.0f} MiB")
    print(
        f"{'copy (clone K+V)':<24} median {copy['median_s'] * 1e3:8.1f} ms  "
        f"[{copy['min_s'] * 1e3:.1f}, {copy['max_s'] * 1e3:.1f}]"
    )
    for name, t in out["policies"].items():
        print(
            f"{name + ' select+gather':<40} median {t['median_s'] * 1e3:8.1f} ms  "
            f"[{t['min_s'] * 1e3:.1f}, {t['max_s'] * 1e3:.1f}]  {t['vs_copy']:.2f}x copy  "
            f"kept {t['kept_fraction']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
