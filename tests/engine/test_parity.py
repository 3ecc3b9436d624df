"""LocalKVPack and a real server run one engine: for every policy (window statistics and
per-layer policies included) x quant mode x budget form, the same input keeps the same tokens,
writes the same container bytes under the same content key, and Stat reports the same entry.

The cache is sized so that budgets split unevenly across layers (3 layers of 41 tokens: ratio 0.5
keeps 61 token slots, n_keep 50), where per-layer rounding used to differ between the two.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvpack import codec
from kvpack.client import KVPackClient, LocalKVPack
from kvpack.client.result import CompressResult

L, B, HKV, HQ, N, D, W = 3, 1, 2, 4, 41, 16, 8
_g = torch.Generator().manual_seed(19)
SCORES = torch.rand(L, B, HQ, N, generator=_g).softmax(-1)
QUERIES = torch.randn(L, B, HQ, W, D, generator=_g).half()
KEYS = [torch.randn(B, HKV, N, D, generator=_g).half() for _ in range(L)]
VALUES = [torch.randn(B, HKV, N, D, generator=_g).half() for _ in range(L)]
TOKENS = list(range(100, 100 + N))

# (policy, policy settings, statistics sent): every policy with the statistics it reads;
# window queries for the score policies (selected layer by layer); per-layer policies (keys or
# values read); policies without statistics both without and with scores (ignored).
SCORE_POLICIES = [p for p in sorted(codec.POLICIES) if codec.POLICIES[p]().needs_scores]
CASES: list[tuple[str, dict[str, Any], str | None]] = [
    *[(p, {}, "scores") for p in SCORE_POLICIES],
    *[(p, {}, "window_queries") for p in SCORE_POLICIES],
    ("kvcompose", {"add_v_norm": True}, "scores"),
    ("kvcompose", {"keep_token_lower_bound": 3, "agg_group": "max"}, "scores"),
    ("snapkv", {"kernel_size": 3, "window_size": 4}, "scores"),
    ("knorm", {}, None),
    ("streaming", {"n_sink": 2}, None),
    ("streaming", {}, "scores"),
    ("random", {"seed": 7}, None),
    ("none", {}, None),
    ("none", {}, "scores"),
]
BUDGETS: list[dict[str, Any]] = [{"ratio": 0.5}, {"n_keep": 50}]
QUANTS: list[dict[str, Any]] = [
    {"mode": "lossy", "block_tokens": 8, "k_window": 4, "v_window": 4},
    {"mode": "fixed", "block_tokens": 8, "k_window": 4, "v_window": 4},
    {"mode": "lossless"},
]


def _args(policy: str, settings: dict[str, Any], stats: str | None, budget: dict[str, Any],
          quant: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    args: dict[str, Any] = {
        "policy": policy,
        "quant": quant,
        "model": "parity@1",
        "token_ids": TOKENS,
        **({} if policy == "none" else {**budget, "policy_settings": settings}),
    }
    if stats == "scores":
        args["scores"] = SCORES
    elif stats == "window_queries":
        args["window_queries"] = QUERIES
    return args


def _same_result(here: CompressResult, there: CompressResult) -> None:
    assert here.key == there.key and here.key.startswith("sha256:")
    for a, b in zip(here.indices, there.indices, strict=True):
        assert torch.equal(a, b)
    for a, b in zip([*here.keys, *here.values], [*there.keys, *there.values], strict=True):
        assert torch.equal(a, b)
    assert here.layers == there.layers  # kept tokens, bytes, reconstruction errors
    for name in ("input_bytes", "kept_bytes", "stored_bytes", "token_ratio", "compression_ratio"):
        assert getattr(here, name) == getattr(there, name), name


# policy "none" takes no budget: one budget form is enough for it.
PARAMS = [
    pytest.param(*case, budget, quant, id=f"{case[0]}-{case[2]}-{'+'.join(case[1])}-{b}-{q}")
    for case in CASES
    for b, budget in zip(("ratio", "n_keep"), BUDGETS, strict=True)
    for q, quant in zip(("lossy", "fixed", "lossless"), QUANTS, strict=True)
    if case[0] != "none" or b == "ratio"
]


@pytest.mark.parametrize(("policy", "settings", "stats", "budget", "quant"), PARAMS)
def test_local_and_server_store_the_same(
    remote: KVPackClient,
    policy: str,
    settings: dict[str, Any],
    stats: str | None,
    budget: dict[str, Any],
    quant: dict[str, Any],
) -> None:
    args = _args(policy, settings, stats, budget, quant)
    with LocalKVPack() as local:
        here = local.compress(KEYS, VALUES, **args)
        there = remote.compress(KEYS, VALUES, **args)
        _same_result(here, there)
        assert local.fetch_bytes(here.key) == remote.fetch_bytes(there.key)
        mine, theirs = local.stat(here.key), remote.stat(there.key)
        assert mine.settings == theirs.settings and mine.settings["policy.policy"] == policy
        for name in ("stored_bytes", "original_bytes", "num_layers", "dtype", "codec"):
            assert getattr(mine, name) == getattr(theirs, name), name
    remote.delete(there.key)


def test_same_answers_without_storing_or_a_key(remote: KVPackClient) -> None:
    """store=False returns the same composite cache; without token ids the key is the
    container's sha256, the same on both."""
    with LocalKVPack() as local:
        args = {"scores": SCORES, "ratio": 0.5, "store": False}
        here, there = local.compress(KEYS, VALUES, **args), remote.compress(KEYS, VALUES, **args)
        _same_result_unstored(here, there)
        here = local.compress(KEYS, VALUES, scores=SCORES, ratio=0.5)
        there = remote.compress(KEYS, VALUES, scores=SCORES, ratio=0.5)
        assert here.key == there.key and local.fetch_bytes(here.key) == remote.fetch_bytes(
            there.key
        )
    remote.delete(there.key)


def _same_result_unstored(here: CompressResult, there: CompressResult) -> None:
    assert here.key == there.key == "" and here.stored_bytes == there.stored_bytes == 0
    for a, b in zip(here.indices, there.indices, strict=True):
        assert torch.equal(a, b)
    assert here.layers == there.layers


def test_put_entries_stat_alike_and_info_agrees(remote: KVPackClient) -> None:
    blob = codec.encode(KEYS, VALUES, settings=codec.QuantSettings(mode="lossless"))
    with LocalKVPack() as local:
        assert local.put(blob) == remote.put(blob)
        key = local.put(blob, "parity/put")
        remote.put(blob, "parity/put")
        assert local.stat(key).settings == remote.stat(key).settings
        mine, theirs = local.info(), remote.info()
        assert mine.container_version == theirs.container_version >= 1
        for name in ("policies", "quant_modes", "entropy_coders"):
            assert getattr(mine, name) == getattr(theirs, name), name
    remote.delete("parity/put")
