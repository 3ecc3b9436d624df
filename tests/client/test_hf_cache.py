"""DynamicCache <-> tensors, ragged caches in multi-token forwards, generation from a cache."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvpack.client.hf import cache_to_tensors, generate_from, ragged_attention, tensors_to_cache
from kvpack.client.hf.generate import forward_from


def prefill(model: Any, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    with torch.no_grad():
        return cache_to_tensors(model(input_ids=ids, use_cache=True).past_key_values)


def evict(
    keys: list[torch.Tensor], values: list[torch.Tensor], kept: list[int], seed: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keep ``kept[l]`` random positions per head of layer ``l`` (original order): ragged cache."""
    g = torch.Generator().manual_seed(seed)
    out_k, out_v = [], []
    for k, v, b in zip(keys, values, kept, strict=True):
        batch, heads, n, d = k.shape
        idx = torch.stack([torch.randperm(n, generator=g)[:b].sort().values for _ in range(heads)])
        idx = idx[None, :, :, None].expand(batch, heads, b, d)
        out_k.append(k.gather(2, idx))
        out_v.append(v.gather(2, idx))
    return out_k, out_v


@torch.no_grad()
def reference_logits(
    model: Any, keys: list[torch.Tensor], values: list[torch.Tensor], ids: torch.Tensor, start: int
) -> torch.Tensor:
    """Llama forward of ``ids [B, q]`` at positions ``start..``, attention written out per layer.

    Each layer attends over its own ``b_l`` cached tokens plus the new tokens causally.
    """
    inner = model.model
    batch, q = ids.shape
    hidden = inner.embed_tokens(ids)
    cos, sin = inner.rotary_emb(hidden, torch.arange(start, start + q)[None])
    for layer, block in enumerate(inner.layers):
        attn = block.self_attn
        d = attn.head_dim
        x = block.input_layernorm(hidden)
        qs = attn.q_proj(x).view(batch, q, -1, d).transpose(1, 2)
        ks = attn.k_proj(x).view(batch, q, -1, d).transpose(1, 2)
        vs = attn.v_proj(x).view(batch, q, -1, d).transpose(1, 2)
        qs, ks = apply_rotary_pos_emb(qs, ks, cos, sin)
        group = qs.shape[1] // ks.shape[1]
        k_all = torch.cat([keys[layer], ks], dim=2).repeat_interleave(group, dim=1)
        v_all = torch.cat([values[layer], vs], dim=2).repeat_interleave(group, dim=1)
        b = keys[layer].shape[2]
        allowed = torch.arange(b + q)[None, :] <= b + torch.arange(q)[:, None]
        logits = (qs @ k_all.transpose(-1, -2)) * d**-0.5
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        out = (probs @ v_all).transpose(1, 2).reshape(batch, q, -1)
        hidden = hidden + attn.o_proj(out)
        hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
    return model.lm_head(inner.norm(hidden))  # type: ignore[no-any-return]


def test_round_trip_ragged() -> None:
    keys = [torch.randn(1, 2, n, 16) for n in (7, 3, 5)]
    values = [torch.randn(1, 2, n, 16) for n in (7, 3, 5)]
    k2, v2 = cache_to_tensors(tensors_to_cache(keys, values))
    for a, b in zip(keys + values, k2 + v2, strict=True):
        torch.testing.assert_close(a, b)


def test_rejects_mismatched_layers() -> None:
    with pytest.raises(ValueError, match="layer 0"):
        tensors_to_cache([torch.zeros(1, 2, 3, 4)], [torch.zeros(1, 2, 2, 4)])


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("kept", [[18, 9], [9, 18]])
def test_ragged_multi_token_forward_matches_reference(
    tiny_llama: Any, context_ids: torch.Tensor, implementation: str, kept: list[int]
) -> None:
    n = context_ids.shape[-1]
    keys, values = evict(*prefill(tiny_llama, context_ids), kept)
    question = torch.tensor([[3, 14, 15, 92, 65]])
    expected = reference_logits(tiny_llama, keys, values, question, start=n)
    tiny_llama.set_attn_implementation(implementation)
    try:
        cache = tensors_to_cache(keys, values)
        logits = forward_from(tiny_llama, cache, question, start=n)
        assert tiny_llama.config._attn_implementation == implementation
    finally:
        tiny_llama.set_attn_implementation("sdpa")
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
    assert [cache.layers[i].keys.shape[2] for i in range(2)] == [b + 5 for b in kept]


def test_ragged_attention_restores_on_error(tiny_llama: Any) -> None:
    with pytest.raises(RuntimeError, match="boom"), ragged_attention(tiny_llama):
        assert tiny_llama.config._attn_implementation != "sdpa"
        raise RuntimeError("boom")
    assert tiny_llama.config._attn_implementation == "sdpa"


def test_generate_from_full_cache_equals_generate(
    tiny_llama: Any, context_ids: torch.Tensor
) -> None:
    n = context_ids.shape[-1]
    question = torch.tensor([[7, 8, 9]])
    full = torch.cat([context_ids, question], dim=-1)
    with torch.no_grad():
        expected = tiny_llama.generate(
            full, max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=None
        )[:, full.shape[-1] :]
    cache = tensors_to_cache(*prefill(tiny_llama, context_ids))
    got = generate_from(tiny_llama, cache, question, max_new_tokens=8, original_length=n)
    assert torch.equal(got, expected)


def test_generate_from_ragged_cache_continues_positions(
    tiny_llama: Any, context_ids: torch.Tensor
) -> None:
    """Every step's logits equal the explicit reference over the same ragged cache."""
    n = context_ids.shape[-1]
    keys, values = evict(*prefill(tiny_llama, context_ids), [12, 6])
    question = torch.tensor([[7, 8, 9]])
    got = generate_from(
        tiny_llama, tensors_to_cache(keys, values), question, max_new_tokens=4, original_length=n
    )
    ids = torch.cat([question, got[:, :-1]], dim=-1)
    expected = reference_logits(tiny_llama, keys, values, ids, start=n)[:, 2:].argmax(-1)
    assert torch.equal(got, expected)
