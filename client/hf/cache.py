"""Conversion between transformers caches and per-layer K/V tensor lists.

Since transformers 4.56 a ``DynamicCache`` is a list of per-layer objects holding ``.keys`` and
``.values`` ``[B, Hkv, n_l, d]``; ``from_legacy_cache`` is gone in 5.x, so caches are built by
feeding each layer's tensors through the public ``update``. Layers may hold different lengths
(``n_l``), as a KVCompose composite cache does.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache


def cache_to_tensors(cache: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer keys and values of ``cache``.

    Args:
        cache: a transformers ``Cache`` with ``.layers`` (>= 4.56) or a legacy tuple of
            ``(key, value)`` pairs.

    Returns:
        ``(keys, values)``: lists of ``L`` tensors ``[B, Hkv, n_l, d]`` (the cache's own tensors,
        not copies).
    """
    layers = getattr(cache, "layers", None)
    if layers is not None:
        keys = [layer.keys for layer in layers]
        values = [layer.values for layer in layers]
    else:
        keys = [kv[0] for kv in cache]
        values = [kv[1] for kv in cache]
    if any(k is None or k.ndim != 4 for k in keys):
        raise ValueError("cache has uninitialised layers; run a forward pass first")
    return keys, values


def tensors_to_cache(
    keys: Sequence[torch.Tensor] | torch.Tensor,
    values: Sequence[torch.Tensor] | torch.Tensor,
    *,
    config: Any = None,
) -> DynamicCache:
    """A ``DynamicCache`` holding ``keys[l]`` / ``values[l]`` ``[B, Hkv, n_l, d]`` for layer ``l``.

    Args:
        keys, values: per-layer lists (lengths may differ across layers) or stacked
            ``[L, B, Hkv, n, d]`` tensors.
        config: the model config; when given, layer types (e.g. sliding window) follow it.

    Lengths may differ across layers; run multi-token forwards over such a cache inside
    :func:`kvpack.client.hf.ragged_attention`.
    """
    if len(keys) != len(values):
        raise ValueError(f"{len(keys)} key layers but {len(values)} value layers")
    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
        if k.shape != v.shape or k.ndim != 4:
            raise ValueError(
                f"layer {layer}: keys {tuple(k.shape)} and values {tuple(v.shape)} must both be "
                "[B, Hkv, n, d]"
            )
        cache.update(k, v, layer)
    return cache


def accepts(fn: Any, name: str) -> bool:
    """True when ``fn`` takes a parameter called ``name``."""
    return name in inspect.signature(fn).parameters


def cache_argument(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword that hands ``cache`` to ``model``'s forward: ``cache`` since transformers
    5.24 (``past_key_values`` still works there with a FutureWarning, until 5.40), and
    ``past_key_values`` before."""
    return {"cache" if accepts(model.forward, "cache") else "past_key_values": cache}


def output_cache(out: Any) -> Any:
    """The cache a forward returned: ``out.cache`` since transformers 5.24 (reading
    ``out.past_key_values`` there warns), ``out.past_key_values`` before."""
    return out["cache"] if "cache" in out else out["past_key_values"]
