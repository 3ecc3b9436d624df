"""`gather`: build the composite cache from kept positions."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _gather_one(cache: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    batch, heads, n, d = cache.shape
    padded = idx < 0
    # Whole d-vectors via index_select on a [B*Hkv*n, d] view: an order of magnitude faster on
    # CPU than an element-wise gather with an expanded index.
    base = torch.arange(batch * heads, device=idx.device).view(batch, heads, 1) * n
    rows = (idx.clamp(min=0) + base).reshape(-1)
    picked = cache.reshape(-1, d).index_select(0, rows).view(batch, heads, -1, d)
    if bool(padded.any()):
        picked = picked.masked_fill(padded.unsqueeze(-1), 0)
    return picked


def gather(
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    indices: Sequence[torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Composite cache: the kept rows of every layer, in the order of `indices`.

    keys / values: L tensors [B, Hkv, n, d]; indices: L int64 tensors [B, Hkv, b_l] as returned
    by `select` (positions in [0, n), or -1 for padding), on the cache's device. Returns
    (keys, values), L tensors [B, Hkv, b_l, d] each, in the cache dtype; -1 slots are zeros.
    Raises ValueError on mismatched lengths, shapes, devices or out-of-range positions.
    """
    if not (len(keys) == len(values) == len(indices)):
        raise ValueError(
            f"keys, values and indices must have one entry per layer, got "
            f"{len(keys)}, {len(values)}, {len(indices)}"
        )
    out_k: list[torch.Tensor] = []
    out_v: list[torch.Tensor] = []
    for layer, (k, v, idx) in enumerate(zip(keys, values, indices, strict=True)):
        if k.dim() != 4 or k.shape[:3] != v.shape[:3]:
            raise ValueError(
                f"layer {layer}: keys {tuple(k.shape)} and values {tuple(v.shape)} must be "
                "[B, Hkv, n, d] with equal B, Hkv, n"
            )
        if idx.dtype != torch.int64 or idx.dim() != 3 or idx.shape[:2] != k.shape[:2]:
            raise ValueError(
                f"layer {layer}: indices must be int64 [B, Hkv, b], got {idx.dtype} "
                f"{tuple(idx.shape)} for a cache {tuple(k.shape)}"
            )
        if not (idx.device == k.device == v.device):
            raise ValueError(f"layer {layer}: keys, values and indices on different devices")
        if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= k.shape[2]):
            raise ValueError(f"layer {layer}: positions must be in [-1, {k.shape[2]})")
        out_k.append(_gather_one(k, idx))
        out_v.append(_gather_one(v, idx))
    return out_k, out_v
