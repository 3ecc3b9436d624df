"""Fixtures for the client tests: a tiny random Llama (2 layers, hidden 64, 4 q / 2 kv heads)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")


def build_tiny_llama(attn_implementation: str = "sdpa") -> Any:
    """A deterministic 2-layer Llama with GQA (4 query heads, 2 KV heads, head_dim 16)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attn_implementation=attn_implementation,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    return model


@pytest.fixture(scope="session")
def tiny_llama() -> Any:
    return build_tiny_llama()


@pytest.fixture
def context_ids() -> torch.Tensor:
    """``[1, 24]`` context token ids."""
    return torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(1))
