"""Attention statistics from a model equal those computed from its attention probabilities."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from kvpack.client.hf import collect_scores, prefill_with_scores


@contextmanager
def eager(model: Any) -> Iterator[None]:
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")


def reference_probs(model: Any, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per-layer post-softmax attention ``[B, Hq, T, T]`` of one plain forward over ``ids``."""
    with eager(model), torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    return [a.float() for a in out.attentions]


def hook_snapshot(model: Any) -> list[tuple[Any, ...]]:
    """Every module's hooks and forward method (transformers installs its own capture hooks)."""
    return [
        (name, dict(m._forward_hooks), dict(m._forward_pre_hooks), m.forward.__func__)
        for name, m in model.named_modules()
    ]


@contextmanager
def unpatched(model: Any) -> Iterator[None]:
    """Asserts the block leaves hooks, forwards and attention implementation as found."""
    tiny_forward = model(input_ids=torch.tensor([[1, 2]]))  # let transformers install its hooks
    del tiny_forward
    before = hook_snapshot(model)
    try:
        yield
    finally:
        assert model.config._attn_implementation == "sdpa"
        assert model.model.config._attn_implementation == "sdpa"
        assert hook_snapshot(model) == before


def test_agnostic_is_context_fed_again(tiny_llama: Any, context_ids: torch.Tensor) -> None:
    n = context_ids.shape[-1]
    with unpatched(tiny_llama):
        scores = collect_scores(tiny_llama, context_ids, mode="agnostic")
    probs = reference_probs(tiny_llama, torch.cat([context_ids, context_ids], dim=-1))
    expected = torch.stack([p[:, :, n:, :n].amax(dim=2) for p in probs])
    assert scores.shape == (2, 1, 4, n)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)


def test_aware_uses_question_queries(tiny_llama: Any, context_ids: torch.Tensor) -> None:
    n = context_ids.shape[-1]
    q1 = torch.tensor([[5, 6, 7]])
    q2 = torch.tensor([[9, 10]])
    with unpatched(tiny_llama):
        scores = collect_scores(tiny_llama, context_ids, mode="aware", question_ids=[q1, q2])
    expected = []
    for layer in range(2):
        per_question = [
            reference_probs(tiny_llama, torch.cat([context_ids, q], dim=-1))[layer][:, :, n:, :n]
            for q in (q1, q2)
        ]
        expected.append(torch.cat(per_question, dim=2).amax(dim=2))
    torch.testing.assert_close(scores, torch.stack(expected), atol=1e-5, rtol=1e-4)


def test_window_uses_last_queries(tiny_llama: Any, context_ids: torch.Tensor) -> None:
    with unpatched(tiny_llama):
        keys, _, scores = prefill_with_scores(tiny_llama, context_ids, mode="window", window=4)
    probs = reference_probs(tiny_llama, context_ids)
    expected = torch.stack([p[:, :, -4:, :].amax(dim=2) for p in probs])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)
    assert [k.shape for k in keys] == [(1, 2, 24, 16)] * 2


def test_prefill_cache_is_context_only(tiny_llama: Any, context_ids: torch.Tensor) -> None:
    keys, values, _ = prefill_with_scores(tiny_llama, context_ids, mode="agnostic")
    with torch.no_grad():
        plain = tiny_llama(input_ids=context_ids, use_cache=True).past_key_values
    for layer in range(2):
        torch.testing.assert_close(keys[layer], plain.layers[layer].keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(values[layer], plain.layers[layer].values, atol=1e-5, rtol=1e-4)


def test_restored_after_error(tiny_llama: Any, context_ids: torch.Tensor) -> None:
    bad_question = torch.tensor([[1000]])  # out of vocabulary: the embedding lookup fails
    with unpatched(tiny_llama), pytest.raises(IndexError):
        collect_scores(tiny_llama, context_ids, mode="aware", question_ids=bad_question)


def test_aware_needs_questions(tiny_llama: Any, context_ids: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="question_ids"):
        collect_scores(tiny_llama, context_ids, mode="aware")
