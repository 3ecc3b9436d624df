"""Attention statistics: per-position importance scores that eviction policies rank.

All functions return float32 scores (the precision kvpress accumulates its statistics in) on the
input's device. Stack per-layer results to `[L, B, H, n]` for `kvpack.codec.select`.
"""

from __future__ import annotations

import math

import torch

AGGREGATIONS = ("max", "mean")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_agg(agg: str, what: str) -> None:
    if agg not in AGGREGATIONS:
        raise ValueError(f"{what} must be one of {list(AGGREGATIONS)}, got {agg!r}")


def _check_float(t: torch.Tensor, name: str, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def _reduce(t: torch.Tensor, dim: int, agg: str) -> torch.Tensor:
    return t.amax(dim=dim) if agg == "max" else t.mean(dim=dim)


def scores_from_attention(probs: torch.Tensor, n: int, agg: str = "max") -> torch.Tensor:
    """Scores from post-softmax attention of task queries (KVCompose steps 1-2).

    probs: [B, Hq, Tq, n_total] attention probabilities; the softmax ran over all n_total keys
    the queries saw; only the first `n` columns (the context) are kept. agg: "max" or "mean"
    over the Tq task queries. Returns [B, Hq, n] float32.
    """
    _check_float(probs, "probs", 4)
    _check_agg(agg, "agg")
    n_total = probs.shape[-1]
    if not 1 <= n <= n_total:
        raise ValueError(f"n must be in [1, {n_total}] (the probs width), got {n}")
    if probs.shape[2] < 1:
        raise ValueError("probs has no task queries (Tq = 0)")
    return _reduce(probs[..., :n].float(), 2, agg)


def scores_from_window(
    queries: torch.Tensor,
    keys: torch.Tensor,
    agg: str = "max",
    scale: float | None = None,
) -> torch.Tensor:
    """Scores from the context's own last W queries (SnapKV's observation window).

    queries: [B, Hq, W, d], the last W queries of the context after RoPE; keys: [B, Hkv, n, d]
    after RoPE, Hq a multiple of Hkv (query head h reads KV head h // (Hq/Hkv)). Query i of the
    window sits at position n - W + i and attends causally (keys 0 .. n - W + i). The softmax
    runs in float32 over all n keys with `scale` (default 1/sqrt(d)); `agg` ("max" or "mean")
    then reduces over the W queries. Returns [B, Hq, n] float32.
    """
    _check_float(queries, "queries", 4)
    _check_float(keys, "keys", 4)
    _check_agg(agg, "agg")
    b, hq, w, d = queries.shape
    bk, hkv, n, dk = keys.shape
    if (b, d) != (bk, dk):
        raise ValueError(
            f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} disagree on batch or "
            "head dim"
        )
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if not 1 <= w <= n:
        raise ValueError(f"window W must be in [1, n={n}], got {w}")
    if queries.device != keys.device:
        raise ValueError(f"queries on {queries.device} but keys on {keys.device}")
    g = hq // hkv
    # Group query heads by KV head so the matmul broadcasts keys instead of repeating them.
    q = queries.float().reshape(b, hkv, g, w, d)
    k = keys.float().unsqueeze(2)
    logits = torch.matmul(q, k.transpose(-1, -2))
    logits = logits * (1.0 / math.sqrt(d) if scale is None else float(scale))
    pos = torch.arange(n, device=keys.device)
    qpos = torch.arange(n - w, n, device=keys.device)
    future = pos.unsqueeze(0) > qpos.unsqueeze(1)
    logits = logits.masked_fill(future, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return _reduce(probs, 3, agg).reshape(b, hq, n)


def reduce_gqa(scores: torch.Tensor, num_kv_heads: int, agg: str = "mean") -> torch.Tensor:
    """Reduce query-head scores to KV-head scores (KVCompose step 3).

    scores: [..., Hq, n] with Hq a multiple of num_kv_heads; query heads h*g .. h*g+g-1 share KV
    head h (the grouping of transformers' repeat_kv). agg: "mean" or "max" over each group.
    Returns [..., num_kv_heads, n] in the input dtype.
    """
    _check_agg(agg, "agg_group")
    if not isinstance(scores, torch.Tensor) or scores.dim() < 2:
        raise ValueError("scores must be a tensor [..., H, n]")
    hq, n = scores.shape[-2], scores.shape[-1]
    if num_kv_heads < 1 or hq % num_kv_heads:
        raise ValueError(f"heads ({hq}) must be a multiple of num_kv_heads ({num_kv_heads})")
    g = hq // num_kv_heads
    grouped = scores.reshape(*scores.shape[:-2], num_kv_heads, g, n)
    return _reduce(grouped, -2, agg)
