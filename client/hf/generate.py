"""Continue generation from a (composite) cache at the original positions.

A composite cache keeps ``b_l <= n`` tokens per layer, but the kept keys carry their original RoPE
phases, so new tokens must sit at positions ``n, n+1, ...`` (not at ``b_0``). Positions are passed
explicitly; the cache-relative ``cache_position`` that transformers 4.5x uses for the causal mask
is passed too where the model's forward takes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvpack.client.api import KVPack
from kvpack.client.hf.cache import accepts, cache_argument, tensors_to_cache
from kvpack.client.hf.ragged import ragged_attention
from kvpack.client.hf.stats import Mode, prefill_with_scores
from kvpack.client.result import CompressResult
from kvpack.codec.policies import DEFAULT_POLICY


@torch.no_grad()
def forward_from(model: Any, cache: Any, input_ids: torch.Tensor, start: int) -> torch.Tensor:
    """Run ``input_ids [B, q]`` after ``cache`` at positions ``start .. start+q-1``.

    The cache may hold different lengths per layer; the forward runs under
    :func:`ragged_attention`. The cache grows by ``q`` tokens in every layer.

    Returns:
        logits ``[B, q, vocab]``.
    """
    q = input_ids.shape[-1]
    device = input_ids.device
    positions = torch.arange(start, start + q, device=device).unsqueeze(0)
    kwargs: dict[str, Any] = {}
    if accepts(model.forward, "cache_position"):
        cached = cache.get_seq_length()
        kwargs["cache_position"] = torch.arange(cached, cached + q, device=device)
    with ragged_attention(model):
        out = model(
            input_ids=input_ids,
            position_ids=positions.expand(input_ids.shape[0], -1),
            use_cache=True,
            **cache_argument(model, cache),
            **kwargs,
        )
    return out.logits


@torch.no_grad()
def generate_from(
    model: Any,
    cache: Any,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    original_length: int,
    *,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Greedy generation continuing a cache of an ``original_length``-token context.

    Args:
        cache: a cache of the context (possibly composite, ragged per layer); it is extended in
            place, as transformers' generation does.
        prompt_ids: ``[B, m]`` tokens that follow the context (a question), fed in one
            multi-token forward; ``m >= 1``.
        original_length: ``n``, the context length before compression.
        eos_token_id: stop once every row has produced it.

    Returns:
        ``[B, <= max_new_tokens]`` generated token ids (int64).
    """
    if prompt_ids.ndim != 2 or prompt_ids.shape[-1] < 1:
        raise ValueError(f"prompt_ids must be [B, m] with m >= 1, got {tuple(prompt_ids.shape)}")
    position = original_length
    step = prompt_ids
    generated: list[torch.Tensor] = []
    done = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    for _ in range(max_new_tokens):
        logits = forward_from(model, cache, step, position)
        position += step.shape[-1]
        step = logits[:, -1, :].argmax(dim=-1, keepdim=True)
        generated.append(step)
        if eos_token_id is not None:
            done |= step.squeeze(-1) == eos_token_id
            if bool(done.all()):
                break
    if not generated:
        return prompt_ids.new_empty((prompt_ids.shape[0], 0))
    return torch.cat(generated, dim=-1)


@dataclass(frozen=True)
class Prefilled:
    """A prefill and its attention statistics, ready to compress any number of times.

    ``keys`` / ``values``: per-layer ``[B, Hkv, n, d]`` (keys after RoPE); ``scores``
    ``[L, B, Hq, n]`` float32; ``length``: ``n``, the position generation continues from.
    Compressing never modifies them, so one prefill serves every ratio and policy.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    scores: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[2])


def prefill(
    model: Any,
    input_ids: torch.Tensor,
    *,
    mode: Mode = "agnostic",
    question_ids: torch.Tensor | None = None,
    window: int = 64,
) -> Prefilled:
    """Prefill ``input_ids [B, n]`` and collect statistics once (see
    :func:`~kvpack.client.hf.prefill_with_scores` for ``mode``/``question_ids``/``window``);
    then :func:`compress_prefilled` as often as needed."""
    keys, values, scores = prefill_with_scores(
        model, input_ids, mode=mode, question_ids=question_ids, window=window
    )
    return Prefilled(keys, values, scores)


def compress_prefilled(
    prefilled: Prefilled,
    client: KVPack,
    *,
    ratio: float | None = None,
    policy: str = DEFAULT_POLICY,
    **compress_kwargs: Any,
) -> tuple[Any, CompressResult]:
    """Compress one :class:`Prefilled` through ``client`` (a ratio/policy sweep reuses it).

    ``compress_kwargs`` go to ``client.compress`` (``n_keep``, ``quant``, ``store``, ``key``,
    ``model``, ``token_ids``, ``policy_settings``); ``store=False`` returns the composite cache
    without encoding or storing a container (``result.key`` is then empty).

    Returns:
        ``(cache, result)``: a ``DynamicCache`` holding the composite cache (ragged per layer;
        continue it with :func:`generate_from` and ``start = prefilled.length``) and the
        :class:`~kvpack.client.result.CompressResult`.
    """
    result = client.compress(
        prefilled.keys,
        prefilled.values,
        scores=None if policy == "none" else prefilled.scores,
        policy=policy,
        ratio=ratio,
        return_cache=True,
        **compress_kwargs,
    )
    if any(bool((idx < 0).any()) for idx in result.indices):
        # Unstructured policies (and batch rows keeping different counts) pad with -1 slots
        # whose zero K/V a DynamicCache would attend to: refuse rather than decode wrongly.
        raise ValueError(
            f"policy {policy!r} returned padded per-head lengths; a transformers cache needs a "
            "structured policy (e.g. kvcompose) with batch rows keeping equal counts"
        )
    return tensors_to_cache(result.keys, result.values), result


def compress_prefill(
    model: Any,
    input_ids: torch.Tensor,
    client: KVPack,
    *,
    ratio: float | None = None,
    policy: str = DEFAULT_POLICY,
    mode: Mode = "agnostic",
    question_ids: torch.Tensor | None = None,
    window: int = 64,
    **compress_kwargs: Any,
) -> tuple[Any, CompressResult]:
    """:func:`prefill` then :func:`compress_prefilled`: prefill ``input_ids [B, n]``, collect
    statistics, compress through ``client``. To try several ratios or policies on one prompt,
    call :func:`prefill` once and :func:`compress_prefilled` per setting instead.

    Returns:
        ``(cache, result)`` as :func:`compress_prefilled` (continue from position ``n``).
    """
    pre = prefill(model, input_ids, mode=mode, question_ids=question_ids, window=window)
    return compress_prefilled(pre, client, ratio=ratio, policy=policy, **compress_kwargs)
