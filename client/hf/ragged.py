"""Multi-token forwards over a cache whose layers hold different lengths (KVCompose output).

transformers builds one attention mask per forward, sized from the first full-attention layer's
cache length, and hands the same mask to every layer. With a composite cache layer ``l`` holds
``b_l`` tokens, so the mask is ``[B, 1, q, b_0 + q]`` while layer ``l`` attends over ``b_l + q``
keys: sdpa and eager fail (or, if sliced, would let queries see later new tokens).

The fix sizes the mask per layer inside the attention call, where the layer's key length is known.
The shared mask's last ``q`` columns (the new tokens: causal order plus any padding of the new
tokens) are valid for every layer; the columns before them stand for cached tokens, and a composite
cache holds no padding, so every cached column is visible. Layer ``l`` therefore gets
``[visible] * b_l ++ mask[..., -q:]``. This wrapper is registered through transformers'
``AttentionInterface`` (its documented extension point) around the model's own sdpa or eager
function, and :func:`ragged_attention` switches the model to it for the duration of a ``with``
block only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

_PREFIX = "kvpack_ragged_"
SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager")
_registered = False


def layer_mask(
    mask: torch.Tensor | None, q_len: int, kv_len: int, *, additive_dtype: torch.dtype | None
) -> torch.Tensor | None:
    """The attention mask for one layer with ``kv_len`` keys, the last ``q_len`` of them new.

    Args:
        mask: the forward's shared mask ``[B or 1, 1, q_len, W]`` (bool: True = attend; or
            additive float: 0 = attend), sized for some other layer, or None (sdpa skipped it).
        additive_dtype: dtype of the additive mask to build when ``mask`` is None and one is
            needed (eager); None builds a bool mask (sdpa).

    Returns:
        ``[B or 1, 1, q_len, kv_len]``: every cached column visible, the new-token block taken
        from ``mask``; or None when no mask is needed (one query sees everything).
    """
    if mask is not None:
        if mask.shape[-1] == kv_len:
            return mask
        visible = torch.ones if mask.dtype == torch.bool else torch.zeros
        cached = visible((*mask.shape[:-1], kv_len - q_len), dtype=mask.dtype, device=mask.device)
        return torch.cat([cached, mask[..., -q_len:]], dim=-1)
    if q_len == 1:
        return None
    # Bottom-right aligned causal mask: new token i sees all cached tokens and new tokens <= i.
    # sdpa's own is_causal is top-left aligned, which is wrong once the cache is non-empty.
    rows = torch.arange(q_len).unsqueeze(1)
    cols = torch.arange(kv_len).unsqueeze(0)
    allowed = (cols <= rows + (kv_len - q_len))[None, None]
    if additive_dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=additive_dtype).masked_fill(
        ~allowed, torch.finfo(additive_dtype).min
    )


def _inner_function(module: nn.Module, name: str) -> Callable[..., Any]:
    if name == "eager":
        # Every transformers modeling file defines its own eager_attention_forward (soft-capping,
        # sinks, ... differ per model), so take the one that belongs to this attention module.
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise TypeError(f"{type(module).__name__} has no eager_attention_forward")
        return eager
    return ALL_ATTENTION_FUNCTIONS[name]


def _ragged(name: str) -> Callable[..., Any]:
    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> Any:
        """``query [B, Hq, q, d]``, ``key``/``value`` ``[B, Hkv, b_l + q, d]`` of this layer."""
        mask = layer_mask(
            attention_mask,
            query.shape[-2],
            key.shape[-2],
            additive_dtype=query.dtype if name == "eager" else None,
        )
        if mask is not None:
            mask = mask.to(query.device)
        return _inner_function(module, name)(module, query, key, value, mask, **kwargs)

    attention.__name__ = f"{_PREFIX}{name}"
    return attention


def _register() -> None:
    global _registered
    if _registered:
        return
    for name in SUPPORTED_IMPLEMENTATIONS:
        AttentionInterface.register(_PREFIX + name, _ragged(name))
        AttentionMaskInterface.register(_PREFIX + name, ALL_MASK_ATTENTION_FUNCTIONS[name])
    _registered = True


def get_attn_implementation(model: Any) -> str:
    """The attention implementation name the model's config currently selects."""
    return str(model.config._attn_implementation)


def set_attn_implementation(model: Any, name: str) -> None:
    """Switch the model (and its sub-configs) to the registered attention ``name``."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # transformers releases before set_attn_implementation
        model.config._attn_implementation = name


@contextmanager
def ragged_attention(model: Any) -> Iterator[None]:
    """Within the block, multi-token forwards work over caches with ragged per-layer lengths.

    The model keeps its own attention maths (sdpa or eager); only the mask is sized per layer.
    The model's attention implementation is restored on exit, also after an exception.
    """
    original = get_attn_implementation(model)
    base = original.removeprefix(_PREFIX)
    if base not in SUPPORTED_IMPLEMENTATIONS:
        raise ValueError(
            f"ragged caches need attn_implementation sdpa or eager, not {original!r} "
            "(model.set_attn_implementation('sdpa'))"
        )
    if original.startswith(_PREFIX):  # nested use: already ragged
        yield
        return
    _register()
    set_attn_implementation(model, _PREFIX + base)
    try:
        yield
    finally:
        set_attn_implementation(model, original)
