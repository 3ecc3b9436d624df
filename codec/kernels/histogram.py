"""Per-block symbol histograms."""

from __future__ import annotations

import numpy as np

from kvpack.codec.kernels.jit import _kernel


@_kernel
def block_histograms(symbols: np.ndarray, counts: np.ndarray, n_levels: int) -> np.ndarray:
    """Symbol histogram per block: int64 [len(counts), n_levels]; block i holds the next
    counts[i] entries of the 1-D non-negative `symbols`. ValueError if one is >= n_levels."""
    out = np.zeros((len(counts), n_levels), dtype=np.int64)
    pos = 0
    for b in range(len(counts)):
        row = out[b]
        for i in range(pos, pos + counts[b]):
            s = symbols[i]
            if s >= n_levels:
                raise ValueError("symbol outside the alphabet")
            row[s] += 1
        pos += counts[b]
    return out
