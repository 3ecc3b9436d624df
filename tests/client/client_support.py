"""Client test helpers: a tiny random Llama, a server on loopback in a background thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
import torch

T = TypeVar("T")


def build_tiny_llama(attn_implementation: str = "sdpa") -> Any:
    """A deterministic 2-layer Llama with GQA (4 query heads, 2 KV heads, head_dim 16)."""
    transformers = pytest.importorskip("transformers")
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


class ServerThread:
    """A KVPackServer on 127.0.0.1:0 running on its own event loop in a background thread, so
    that blocking clients in the test thread can call it."""

    def __init__(self, **overrides: Any) -> None:
        from kvpack.server.app import KVPackServer
        from kvpack.server.config import ServerConfig

        config = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "workers": 2, **overrides}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start() -> KVPackServer:
            server = KVPackServer(ServerConfig(**config))
            await server.start()
            return server

        self.server = self.run(start())
        self.address = f"127.0.0.1:{self.server.port}"

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        # A hang guard only: start-up compiles the codec kernels (warm_up), which takes minutes
        # on a loaded 2-core machine with an empty numba cache.
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=600)

    def stop(self) -> None:
        self.run(self.server.stop(grace=0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def make_cache(
    layers: int = 3, batch: int = 1, hkv: int = 2, hq: int = 4, n: int = 48, d: int = 16,
    dtype: torch.dtype = torch.float16, seed: int = 0,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
    """``(scores [L, B, Hq, n], keys, values: L tensors [B, Hkv, n, d])``, random."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(layers, batch, hq, n, generator=g).softmax(-1)
    keys = [torch.randn(batch, hkv, n, d, generator=g).to(dtype) for _ in range(layers)]
    values = [torch.randn(batch, hkv, n, d, generator=g).to(dtype) for _ in range(layers)]
    return scores, keys, values
