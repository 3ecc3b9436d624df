"""Memory copy of the benchmark cache: the physical reference every other figure is divided by.

Each call clones every K and V tensor (read + write of the whole cache) on the chosen device.
"""

from __future__ import annotations

import argparse
from typing import Any

from kvpack.bench import data
from kvpack.bench.timing import gbps, measure


def run(args: argparse.Namespace) -> dict[str, Any]:
    """{"bytes": cache bytes, "timing": Timing, "gbps": {median, min, max}} (GB/s of cache)."""
    ks, vs = data.cache(args)
    tensors = ks + vs
    size = data.nbytes(tensors)
    sync = data.sync_for(args.device)
    timing = measure(lambda: [t.clone() for t in tensors], args.repeats, sync=sync)
    return {"bytes": size, "timing": timing, "gbps": gbps(size, timing)}
