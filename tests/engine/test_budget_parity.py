"""Budget mode: LocalKVPack and a real server (layers encoded in parallel, later layers waiting
for layer 0's plan) make the same choice and store the same bytes under the same key."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvpack.client import KVPackClient, LocalKVPack

L, B, HKV, HQ, N, D = 3, 1, 2, 4, 200, 16
_g = torch.Generator().manual_seed(23)
SCORES = (torch.randn(L, B, HQ, N, generator=_g) * 3).softmax(-1)
KEYS = [torch.randn(B, HKV, N, D, generator=_g).half() for _ in range(L)]
VALUES = [torch.randn(B, HKV, N, D, generator=_g).half() for _ in range(L)]


@pytest.mark.parametrize(
    "args",
    [
        {"target_ratio": 8.0},
        {"target_bytes": 9000, "max_error_bound": 0.2},
        {"target_ratio": 3.0, "policy": "streaming"},
        {"target_ratio": 2.0, "policy": "none"},
        {"target_ratio": 6.0, "model": "parity@1", "token_ids": list(range(N))},
        {"target_ratio": 5.0, "quant": {"mode": "fixed", "block_tokens": 16}},
    ],
    ids=["ratio", "bytes-floor", "streaming", "none", "content-key", "fixed"],
)
def test_local_and_server_choose_alike(remote: KVPackClient, args: dict[str, Any]) -> None:
    scores = None if args.get("policy") in ("streaming", "none") else SCORES
    with LocalKVPack() as local:
        here = local.compress(KEYS, VALUES, scores=scores, **args)
        there = remote.compress(KEYS, VALUES, scores=scores, **args)
        assert here.budget is not None and here.budget == there.budget
        assert here.budget.stored_bytes <= here.budget.budget_bytes
        assert here.key == there.key and here.layers == there.layers
        for a, b in zip(here.indices, there.indices, strict=True):
            assert torch.equal(a, b)
        assert local.fetch_bytes(here.key) == remote.fetch_bytes(there.key)
        assert local.stat(here.key).settings == remote.stat(there.key).settings
    remote.delete(there.key)
