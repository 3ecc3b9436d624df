"""The benchmark's input cache: synthetic K/V shaped like a real model's, on a chosen device.

The generator is bench/lossy.py's `synthetic_kv` (per-channel scaled keys with outlier channels,
smooth values), so the copy, zstd and lossy figures all see the same bytes.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from kvpack.bench.lossy import synthetic_kv
from kvpack.codec import dtype_from_name


def cache(
    args: argparse.Namespace, dtype: str | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer K, V: `args.layers` tensors [1, kv_heads, seq, head_dim] of `dtype` (default
    `args.dtype`) on `args.device`."""
    torch_dtype = dtype_from_name(dtype or args.dtype)
    ks, vs = synthetic_kv(args.layers, args.kv_heads, args.head_dim, args.seq, torch_dtype)
    device = torch.device(args.device)
    return [k.to(device) for k in ks], [v.to(device) for v in vs]


def nbytes(tensors: list[torch.Tensor]) -> int:
    """Total bytes of `tensors`."""
    return sum(t.numel() * t.element_size() for t in tensors)


def sync_for(device: str) -> Callable[[], None] | None:
    """torch.cuda.synchronize for CUDA devices (so timings include the kernels), else None."""
    if torch.device(device).type != "cuda":
        return None
    return lambda: torch.cuda.synchronize(device)
