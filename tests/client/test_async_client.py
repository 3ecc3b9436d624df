"""AsyncKVPackClient against a real server: same results and errors, concurrent use."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kvpack import codec, errors
from kvpack.client import AsyncKVPackClient
from tests.client.client_support import ServerThread, make_cache


async def test_methods_and_errors(server: ServerThread) -> None:
    scores, keys, values = make_cache(seed=10)
    async with AsyncKVPackClient(server.address) as client:
        assert "kvcompose" in (await client.info()).policies
        result = await client.compress(keys, values, scores=scores, ratio=0.5, key="a/one")
        expected = codec.select(scores, 0.5, num_kv_heads=2)
        for layer in range(3):
            assert torch.equal(result.indices[layer], expected[layer])
        decoded = await client.fetch("a/one", layers=(0, 2))
        assert decoded.layers == [0, 1]
        blob = await client.fetch_bytes("a/one")
        assert await client.put(blob, key="a/two") == "a/two"
        assert (await client.stat("a/two")).stored_bytes == len(blob)
        assert [e.key async for e in client.list("a/", page_size=1)] == ["a/one", "a/two"]
        await client.delete("a/two")
        with pytest.raises(errors.NotFound, match="a/two"):
            await client.fetch("a/two")
        with pytest.raises(errors.InvalidArgument):
            await client.compress(keys, values, ratio=0.5)  # kvcompose without statistics
        with pytest.raises(errors.InvalidArgument):
            await client.put(b"garbage")


async def test_concurrent_compress_and_fetch(server: ServerThread) -> None:
    caches = [make_cache(seed=100 + i) for i in range(8)]
    async with AsyncKVPackClient(server.address) as client:

        async def roundtrip(i: int) -> None:
            scores, keys, values = caches[i]
            result = await client.compress(keys, values, scores=scores, ratio=0.5, key=f"c/{i}")
            decoded = await client.fetch(f"c/{i}")
            expected = codec.select(scores, 0.5, num_kv_heads=2)
            for layer in range(3):
                assert torch.equal(result.indices[layer], expected[layer])
                assert torch.equal(decoded.indices[layer], expected[layer])

        await asyncio.gather(*(roundtrip(i) for i in range(8)))
        assert len([e async for e in client.list("c/")]) == 8
