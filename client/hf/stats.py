"""Attention statistics from a causal LM, the input of KVCompose (docs/ALGORITHMS.md §1.1).

``s[l, b, h, i]`` = max over task queries ``t`` of the post-softmax attention probability that
query head ``h`` of layer ``l`` gives context position ``i`` (the softmax runs over every key the
query saw; only the first ``n`` columns are kept). Task queries by mode:

- ``agnostic``: the context fed again after itself (positions ``n .. 2n-1``), as kvpress does;
- ``aware``: question tokens after the context (one or several questions; max over all of them);
- ``window``: the last ``W`` queries of the context itself (SnapKV's observation window).

Probabilities come from eager attention (sdpa never materialises them), reduced per layer inside a
forward hook so that only one layer's ``[B, Hq, q, kv]`` matrix is alive at a time. The model's
attention implementation and hooks are restored in ``finally``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from kvpack.client.hf.cache import (
    cache_argument,
    cache_to_tensors,
    output_cache,
    tensors_to_cache,
)
from kvpack.client.hf.ragged import get_attn_implementation, set_attn_implementation

Mode = Literal["agnostic", "aware", "window"]


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of ``model`` ordered by ``layer_idx`` (one per layer)."""
    found: dict[int, nn.Module] = {}
    for m in model.modules():
        layer_idx = getattr(m, "layer_idx", None)
        if type(m).__name__.endswith("Attention") and isinstance(layer_idx, int):
            found[layer_idx] = m
    if not found or sorted(found) != list(range(len(found))):
        raise TypeError(f"{type(model).__name__}: could not find one attention module per layer")
    return [found[i] for i in range(len(found))]


class _ScoreCollector:
    """Keeps ``scores [L, B, Hq, n]`` = max over selected queries of attention probabilities."""

    def __init__(self, num_layers: int, n: int, last_queries: int | None) -> None:
        self.n = n
        self.last_queries = last_queries  # None: every query of the forward counts
        self.layers: list[torch.Tensor | None] = [None] * num_layers

    def hook(self, module: nn.Module, args: Any, output: Any) -> None:
        probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if probs is None:
            raise RuntimeError(f"{type(module).__name__} returned no attention probabilities")
        if self.last_queries is not None:
            probs = probs[:, :, -self.last_queries :, :]
        # [B, Hq, q, kv] -> [B, Hq, n]; float32 so bf16 models keep full score resolution.
        new = probs[..., : self.n].amax(dim=2).float()
        # getattr: torch types unknown Module attributes as Tensor | Module.
        layer: int = getattr(module, "layer_idx")  # noqa: B009
        old = self.layers[layer]
        self.layers[layer] = new if old is None else torch.maximum(old, new)

    def result(self) -> torch.Tensor:
        if any(s is None for s in self.layers):
            raise RuntimeError("some layers produced no attention statistics")
        return torch.stack([s for s in self.layers if s is not None])


@contextmanager
def _eager_with_hooks(model: Any, collector: _ScoreCollector) -> Iterator[None]:
    """Eager attention and score hooks for the block; both undone on exit, also on error."""
    original = get_attn_implementation(model)
    handles = [m.register_forward_hook(collector.hook) for m in attention_modules(model)]
    try:
        if original != "eager":
            set_attn_implementation(model, "eager")
        yield
    finally:
        for handle in handles:
            handle.remove()
        if get_attn_implementation(model) != original:
            set_attn_implementation(model, original)


def _continue(model: Any, cache: Any, ids: torch.Tensor, start: int) -> None:
    """Run ``ids [B, q]`` after the cache at positions ``start .. start+q-1``."""
    positions = torch.arange(start, start + ids.shape[-1], device=ids.device)
    model(
        input_ids=ids,
        position_ids=positions.unsqueeze(0).expand(ids.shape[0], -1),
        use_cache=True,
        **cache_argument(model, cache),
    )


@torch.no_grad()
def prefill_with_scores(
    model: Any,
    input_ids: torch.Tensor,
    *,
    mode: Mode = "agnostic",
    question_ids: torch.Tensor | Sequence[torch.Tensor] | None = None,
    window: int = 64,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Prefill ``input_ids [B, n]`` and collect attention statistics in the same pass.

    Args:
        mode: ``agnostic``, ``aware`` (needs ``question_ids``: ``[B, m]`` or a list of them) or
            ``window`` (the last ``window`` context queries).

    Returns:
        ``(keys, values, scores)``: the prefill cache as per-layer lists ``[B, Hkv, n, d]``
        (keys after RoPE) and ``scores [L, B, Hq, n]`` float32 on the model's device. The
        statistics forwards never leave tokens in the returned cache.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, n], got {tuple(input_ids.shape)}")
    n = input_ids.shape[-1]
    num_layers = len(attention_modules(model))
    if mode == "window":
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        collector = _ScoreCollector(num_layers, n, last_queries=min(window, n))
        with _eager_with_hooks(model, collector):
            out = model(input_ids=input_ids, use_cache=True)
        keys, values = cache_to_tensors(output_cache(out))
        return keys, values, collector.result()

    if mode == "agnostic":
        tasks = [input_ids]
    elif mode == "aware":
        if question_ids is None:
            raise ValueError("mode='aware' needs question_ids")
        tasks = [question_ids] if isinstance(question_ids, torch.Tensor) else list(question_ids)
        if not tasks or any(q.ndim != 2 or q.shape[0] != input_ids.shape[0] for q in tasks):
            raise ValueError("question_ids must be [B, m] tensors with the context's batch size")
    else:
        raise ValueError(f"mode must be agnostic, aware or window, not {mode!r}")

    out = model(input_ids=input_ids, use_cache=True)
    # DynamicLayer.update concatenates into new tensors, so these stay the context-only cache
    # while the task forwards below grow a separate one.
    keys, values = cache_to_tensors(output_cache(out))
    collector = _ScoreCollector(num_layers, n, last_queries=None)
    with _eager_with_hooks(model, collector):
        for task in tasks:
            _continue(model, tensors_to_cache(keys, values), task.to(input_ids.device), n)
    return keys, values, collector.result()


def collect_scores(
    model: Any,
    input_ids: torch.Tensor,
    mode: Mode = "agnostic",
    question_ids: torch.Tensor | Sequence[torch.Tensor] | None = None,
    window: int = 64,
) -> torch.Tensor:
    """Attention statistics ``[L, B, Hq, n]`` (float32) for context ``input_ids [B, n]``.

    See :func:`prefill_with_scores` for the modes; this drops the prefill cache.
    """
    return prefill_with_scores(
        model, input_ids, mode=mode, question_ids=question_ids, window=window
    )[2]
