"""Shared timing for `kvpack bench`: warm-up, repeats, median and spread of wall-clock seconds.

Timings on a shared machine are noisy, so every figure keeps its spread (min, max and the
inter-quartile range) next to its median instead of a single number.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

Timing = dict[str, float]


def summarize(samples: list[float]) -> Timing:
    """{"median_s", "min_s", "max_s", "q1_s", "q3_s", "n"} of wall-clock samples in seconds."""
    if not samples:
        raise ValueError("no samples")
    if len(samples) > 1:
        q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    else:
        q1 = q3 = samples[0]
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "q1_s": q1,
        "q3_s": q3,
        "n": float(len(samples)),
    }


def measure(
    fn: Callable[[], object],
    repeats: int,
    *,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> Timing:
    """Time `fn` `repeats` times after `warmup` untimed calls (allocator, lazy init, caches).
    `sync` (e.g. torch.cuda.synchronize) runs inside each timed interval so that asynchronous
    device work is counted."""
    for _ in range(warmup):
        fn()
        if sync is not None:
            sync()
    samples = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        samples.append(time.perf_counter() - start)
    return summarize(samples)


def gbps(nbytes: int, timing: Timing) -> dict[str, float]:
    """Throughput in GB/s (1e9 bytes) of `nbytes` per call: median and the min–max spread
    (the fastest call gives the max rate)."""
    return {
        "median": nbytes / timing["median_s"] / 1e9,
        "min": nbytes / timing["max_s"] / 1e9,
        "max": nbytes / timing["min_s"] / 1e9,
    }


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100) of `samples`, linear between closest ranks."""
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("no samples")
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
