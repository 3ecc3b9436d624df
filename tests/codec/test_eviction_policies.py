"""Baseline policies' defining properties, settings parsing and the registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvpack.codec import POLICIES, select
from kvpack.codec.budgets import pyramid_split, uniform_split
from kvpack.codec.policies import DEFAULT_POLICY
from kvpack.codec.policies.kvcompose import KVComposeSettings
from kvpack.codec.policy_settings import PolicySettings


def test_registry_names() -> None:
    assert set(POLICIES) == {
        "kvpack",
        "kvcompose",
        "kvcompose_unstructured",
        "kvcompose_uniform",
        "streaming",
        "snapkv",
        "tova",
        "pyramidkv",
        "knorm",
        "random",
    }
    for name, cls in POLICIES.items():
        assert cls.name == name
        assert issubclass(cls.settings_type, PolicySettings)


def test_default_policy_is_kvpack() -> None:
    s = torch.rand(3, 1, 4, 40)
    assert DEFAULT_POLICY == "kvpack" and DEFAULT_POLICY in POLICIES
    default = select(s, 0.75, num_kv_heads=2)
    named = select(s, 0.75, "kvpack", num_kv_heads=2)
    assert all(torch.equal(a, b) for a, b in zip(default, named, strict=True))


def test_settings_from_wire_strings() -> None:
    s = KVComposeSettings.from_mapping(
        {"agg_head": "max", "keep_token_lower_bound": "64", "add_v_norm": "TRUE", "structured": "0"}
    )
    assert (s.agg_head, s.keep_token_lower_bound, s.add_v_norm, s.structured) == (
        "max",
        64,
        True,
        False,
    )
    assert KVComposeSettings.from_mapping({}) == KVComposeSettings()


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"agg_heads": "max"}, "unknown setting 'agg_heads'"),
        ({"agg_head": "median"}, "'agg_head' must be one of"),
        ({"keep_token_lower_bound": "6.5"}, "'keep_token_lower_bound' must be an integer"),
        ({"keep_token_lower_bound": True}, "must be an integer"),
        (
            {"keep_token_lower_bound": "-1"},
            r"'keep_token_lower_bound'=-1 is out of range: allowed \[0, ",
        ),
        ({"keep_token_lower_bound": "99999999999999999999"}, "'keep_token_lower_bound'=.* allowed"),
        ({"add_v_norm": "maybe"}, "'add_v_norm' must be a boolean"),
        ({"agg_task": 3}, "'agg_task' must be a string"),
        # A megabyte off the wire is shown cut to 40 characters, not echoed whole.
        ({"keep_token_lower_bound": "x" * (1 << 20)}, r"integer, got 'x{36}\.\.\.$"),
    ],
)
def test_settings_errors_name_the_setting(mapping: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KVComposeSettings.from_mapping(mapping)


def test_select_rejects_unknown_setting_and_policy() -> None:
    with pytest.raises(ValueError, match="unknown setting 'window'"):
        select(torch.rand(1, 1, 1, 8), 0.5, "snapkv", window="4")
    with pytest.raises(ValueError, match="unknown policy 'h2o'"):
        select(torch.rand(1, 1, 1, 8), 0.5, "h2o")
    with pytest.raises(ValueError, match="kernel_size"):
        select(torch.rand(1, 1, 1, 8), 0.5, "snapkv", kernel_size="4")


def test_uniform_and_pyramid_splits_sum_exactly() -> None:
    for total, layers, n in [(1, 3, 5), (10, 3, 5), (15, 3, 5), (1000, 32, 128), (4096, 32, 128)]:
        u = uniform_split(total, layers)
        assert sum(u) == total and max(u) - min(u) <= 1
        for beta in (1.0, 2.0, 20.0):
            p = pyramid_split(total, layers, n, beta)
            assert sum(p) == total, (total, layers, n, beta, p)
            assert all(0 <= b <= n for b in p)
            assert p == sorted(p, reverse=True)


def test_streaming_keeps_sinks_and_recent() -> None:
    kept = select(None, n_keep=2 * 10, policy="streaming", keys=[torch.rand(1, 2, 20, 4)] * 2)
    assert kept[0].tolist() == [[[0, 1, 2, 3, 14, 15, 16, 17, 18, 19]] * 2]
    small = select(torch.rand(1, 1, 2, 20), n_keep=3, policy="streaming", n_sink="4")
    assert small[0].tolist() == [[[0, 1, 2]] * 2]
    no_sink = select(torch.rand(1, 1, 1, 20), n_keep=3, policy="streaming", n_sink=0)
    assert no_sink[0].tolist() == [[[17, 18, 19]]]


def test_snapkv_keeps_top_of_max_pooled_group_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    s = torch.rand(2, 1, 4, 30, generator=gen)
    kept = select(s, n_keep=2 * 6, policy="snapkv", num_kv_heads=2)
    pooled = F.max_pool1d(s.reshape(-1, 1, 30), 5, stride=1, padding=2).reshape(2, 1, 4, 30)
    grouped = pooled.reshape(2, 1, 2, 2, 30).mean(3)
    for layer in range(2):
        for h in range(2):
            row = grouped[layer, 0, h].tolist()
            # Max pooling makes plateaus; ties keep the lower position.
            want = sorted(sorted(range(30), key=lambda i: (-row[i], i))[:6])
            assert kept[layer][0, h].tolist() == want
    window = select(s, n_keep=2 * 6, policy="snapkv", num_kv_heads=2, window_size=4)
    assert all(set(range(26, 30)) <= set(t[0, h].tolist()) for t in window for h in range(2))


def test_pyramidkv_budgets_decrease_and_sum() -> None:
    s = torch.rand(8, 1, 2, 64)
    kept = select(s, 0.75, "pyramidkv")
    widths = [t.shape[-1] for t in kept]
    assert sum(widths) == int(8 * 64 * 0.25)
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]


def test_tova_heads_share_positions_and_keep_last() -> None:
    gen = torch.Generator().manual_seed(2)
    s = torch.rand(3, 1, 4, 16, generator=gen)
    s[..., -1] = 0.0  # even a last token with no attention stays
    kept = select(s, n_keep=3 * 5, policy="tova", num_kv_heads=2)
    for layer, t in enumerate(kept):
        assert torch.equal(t[0, 0], t[0, 1])
        assert t[0, 0, -1].item() == 15
        head_mean = s[layer, 0].mean(0)
        assert sorted([*head_mean[:15].topk(4).indices.tolist(), 15]) == t[0, 0].tolist()


def test_knorm_keeps_lowest_key_norms() -> None:
    gen = torch.Generator().manual_seed(3)
    keys = [torch.randn(1, 2, 12, 8, generator=gen) for _ in range(2)]
    kept = select(None, n_keep=2 * 4, policy="knorm", keys=keys)
    for k, t in zip(keys, kept, strict=True):
        for h in range(2):
            want = sorted((-k[0, h].norm(dim=-1)).topk(4).indices.tolist())
            assert t[0, h].tolist() == want
    with pytest.raises(ValueError, match="needs keys"):
        select(torch.rand(2, 1, 2, 12), 0.5, "knorm")


def test_random_is_seeded_and_seed_matters() -> None:
    s = torch.rand(2, 1, 2, 100)
    a = select(s, 0.7, "random", seed="7")
    b = select(s, 0.7, "random", seed=7)
    c = select(s, 0.7, "random", seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert [t.shape[-1] for t in a] == [30, 30]


def test_kvcompose_uniform_spends_equal_budget_per_layer() -> None:
    s = torch.rand(4, 1, 2, 40)
    kept = select(s, 0.5, "kvcompose_uniform")
    assert [t.shape[-1] for t in kept] == [20] * 4
    # Same per-head ranking as kvcompose: the narrower of the two selections nests in the other.
    full = select(s, 0.5, "kvcompose")
    for u, f in zip(kept, full, strict=True):
        for h in range(2):
            a, b = set(u[0, h].tolist()), set(f[0, h].tolist())
            assert a <= b or b <= a


def test_unstructured_pads_heads_with_minus_one() -> None:
    s = torch.zeros(1, 1, 2, 6)
    s[0, 0, 0] = torch.tensor([9.0, 8, 7, 6, 5, 4])  # head 0 dominates the global top-N
    kept = select(s, n_keep=2, policy="kvcompose_unstructured", add_mean_across_heads=False)
    assert kept[0].tolist() == [[[0, 1, 2, 3], [-1, -1, -1, -1]]]
