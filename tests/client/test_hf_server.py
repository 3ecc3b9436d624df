"""The Hugging Face path through a real server: prefill, compress, generate, fetch."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvpack.client import KVPackClient, LocalKVPack
from kvpack.client.hf import (
    cache_to_tensors,
    compress_prefill,
    compress_prefilled,
    generate_from,
    prefill,
    tensors_to_cache,
)
from tests.client.client_support import ServerThread

QUESTION = torch.tensor([[7, 8, 9, 10]])


def original_generation(model: Any, context: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        cache = model(input_ids=context, use_cache=True).past_key_values
    return generate_from(model, cache, QUESTION, steps, context.shape[-1])


def test_ratio_zero_generation_equals_original(
    server: ServerThread, tiny_llama: Any, context_ids: torch.Tensor
) -> None:
    n = context_ids.shape[-1]
    with KVPackClient(server.address) as client:
        cache, result = compress_prefill(tiny_llama, context_ids, client, ratio=0.0, key="hf/0")
        assert result.token_ratio == 0.0
        assert [idx.tolist() for idx in result.indices] == [[[list(range(n))] * 2]] * 2
        got = generate_from(tiny_llama, cache, QUESTION, 10, n)
        assert torch.equal(got, original_generation(tiny_llama, context_ids, 10))

        # The stored entry decodes to the same composite cache (lossy within its bound).
        fetched = client.fetch("hf/0")
        for layer in range(2):
            err = (fetched.keys[layer] - result.keys[layer]).abs().max()
            assert err <= result.layers[layer].key_max_abs_error + 1e-6


def test_compressed_cache_generates_from_ragged_layers(
    server: ServerThread, tiny_llama: Any, context_ids: torch.Tensor
) -> None:
    n = context_ids.shape[-1]
    with KVPackClient(server.address) as client:
        cache, result = compress_prefill(
            tiny_llama, context_ids, client, ratio=0.5, mode="aware", question_ids=QUESTION,
            store=False,
        )  # fmt: skip
    kept = [k.shape[2] for k in result.keys]
    assert sum(kept) == n  # half of 2 layers x n tokens
    keys, _ = cache_to_tensors(cache)
    assert [k.shape[2] for k in keys] == kept
    got = generate_from(tiny_llama, cache, QUESTION, 6, n)
    assert got.shape == (1, 6)
    # Local mode selects the same tokens from the same statistics.
    local_cache, local_result = compress_prefill(
        tiny_llama, context_ids, LocalKVPack(), ratio=0.5, mode="aware", question_ids=QUESTION
    )
    for a, b in zip(result.indices, local_result.indices, strict=True):
        assert torch.equal(a, b)
    again = generate_from(tiny_llama, local_cache, QUESTION, 6, n)
    assert torch.equal(got, again)
    assert torch.equal(
        generate_from(tiny_llama, tensors_to_cache(result.keys, result.values), QUESTION, 6, n),
        got,
    )


def test_padded_composite_is_refused(tiny_llama: Any, context_ids: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="padded per-head lengths"):
        compress_prefill(
            tiny_llama, context_ids, LocalKVPack(), ratio=0.5, policy="kvcompose_unstructured",
            store=False,
        )  # fmt: skip


def test_one_prefill_compresses_at_every_ratio(tiny_llama: Any, context_ids: torch.Tensor) -> None:
    """prefill once, compress_prefilled per setting: the same result as a fresh compress_prefill
    per setting, the prefill untouched, and store=False leaves nothing in the store."""
    client = LocalKVPack()
    pre = prefill(tiny_llama, context_ids)
    snapshot = [t.clone() for t in (*pre.keys, *pre.values, pre.scores)]
    assert pre.length == context_ids.shape[-1]
    for policy, ratio in [("kvcompose", 0.5), ("kvcompose_uniform", 0.75), ("snapkv", 0.875)]:
        cache, result = compress_prefilled(pre, client, ratio=ratio, policy=policy, store=False)
        assert result.key == "" and result.stored_bytes == 0
        _, fresh = compress_prefill(tiny_llama, context_ids, client, ratio=ratio, policy=policy)
        assert fresh.key is not None
        for got, want in zip(result.indices, fresh.indices, strict=True):
            assert torch.equal(got, want)
        keys, _ = cache_to_tensors(cache)
        assert [k.shape[2] for k in keys] == [k.shape[2] for k in fresh.keys]
        client.delete(fresh.key)
    assert list(client.list()) == []
    after = [*pre.keys, *pre.values, pre.scores]
    assert all(torch.equal(a, b) for a, b in zip(after, snapshot, strict=True))
