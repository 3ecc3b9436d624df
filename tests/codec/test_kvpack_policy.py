"""The kvpack policy (docs/ALGORITHMS.md §1.6): structure invariants, floors, protected positions,
pooling, and a token-for-token check against a loop re-implementation of its steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvpack.codec import POLICIES, select
from kvpack.codec.budgets import Budget
from kvpack.codec.policies.kvpack import KVPackSettings, top_positions
from kvpack.codec.selection import layer_shares, policy_for_layout

F32 = np.float32


def reference(
    scores: np.ndarray,
    num_kv_heads: int,
    total: int,
    kernel_size: int = 3,
    allocation: str = "uniform",
    floor: float = 0.5,
    n_sink: int = 4,
    window_size: int = 0,
) -> list[list[list[int]]]:
    """scores [L, Hq, n] float32 (batch 1) -> kept positions [layer][kv head], one position and
    one layer at a time (max pooling, GQA mean, head mean, composite mean, floors, then the
    global top of the rest: higher weight, then lower layer, then better rank; the protected
    positions take each head's first ranks and stay out of the weights)."""
    layers, hq, n = scores.shape
    g = hq // num_kv_heads
    s = np.zeros((layers, num_kv_heads, n), dtype=F32)
    for layer in range(layers):
        for k in range(num_kv_heads):
            acc = np.zeros(n, dtype=F32)
            for h in range(k * g, (k + 1) * g):
                acc = acc + scores[layer, h]
            grouped = acc / F32(g)
            half = kernel_size // 2
            s[layer, k] = [grouped[max(0, i - half) : i + half + 1].max() for i in range(n)]
        s[layer] = s[layer] + s[layer].mean(axis=0, dtype=F32)
    protected = [*range(min(n_sink, n)), *range(n - min(window_size, n), n)]
    p = len(set(protected))
    free = [i for i in range(n) if i not in protected]
    # Composite rank j >= p: the heads' mean (j - p)-th best unprotected score.
    composite = np.zeros((layers, n), dtype=np.float64)
    composite[:, p:] = (-np.sort(-s[:, :, free], axis=-1)).mean(axis=1, dtype=F32)
    if allocation == "uniform":
        base, extra = divmod(total, layers)
        counts = [base + (layer < extra) for layer in range(layers)]
    else:
        w = composite
        if allocation == "mass":
            w = w / w.sum(axis=1, keepdims=True)
        f = max(min(n, max(1, math.floor(floor * total / layers))), min(p, total // layers))
        counts = [f] * layers
        rest = sorted(
            ((layer, j) for layer in range(layers) for j in range(f, n)),
            key=lambda lj: (-w[lj[0], lj[1]], lj[0], lj[1]),
        )
        for layer, _ in rest[: total - f * layers]:
            counts[layer] += 1
    kept = []
    for layer in range(layers):
        heads = []
        for k in range(num_kv_heads):
            rest = sorted(set(range(n)) - set(protected), key=lambda i: (-s[layer, k, i], i))
            ranking = list(dict.fromkeys(protected)) + rest
            heads.append(sorted(ranking[: counts[layer]]))
        kept.append(heads)
    return kept


def _scores(layers: int, hq: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(layers, 1, hq, n, generator=gen).pow(4).softmax(-1)


@pytest.mark.parametrize(
    ("settings", "ratio"),
    [
        ({}, 0.5),
        ({}, 0.875),
        ({"allocation": "mass"}, 0.75),
        ({"allocation": "mass", "floor": "0.9", "window_size": 2}, 0.875),
        ({"allocation": "scores", "floor": "0.25", "kernel_size": "5"}, 0.8),
        ({"allocation": "mass", "floor": 0.0, "n_sink": 0, "window_size": 3}, 0.9),
        ({"kernel_size": 1, "n_sink": 2}, 0.6),
    ],
)
def test_matches_loop_reference(settings: dict[str, object], ratio: float) -> None:
    s = _scores(3, 4, 37, seed=int(ratio * 1000))
    kept = select(s, ratio, "kvpack", num_kv_heads=2, **settings)
    typed = KVPackSettings.from_mapping(settings)
    total = Budget(3, 37, ratio=ratio).entries()
    want = reference(
        s[:, 0].numpy(),
        2,
        total,
        kernel_size=typed.kernel_size,
        allocation=typed.allocation,
        floor=typed.floor,
        n_sink=typed.n_sink,
        window_size=typed.window_size,
    )
    assert [t[0].tolist() for t in kept] == want


@pytest.mark.parametrize(("layers", "n", "ratio"), [(4, 64, 0.5), (5, 33, 0.875), (3, 7, 0.95)])
def test_dense_layers_per_head_tokens_and_exact_budget(layers: int, n: int, ratio: float) -> None:
    s = _scores(layers, 4, n, seed=n)
    kept = select(s, ratio, "kvpack", num_kv_heads=2, n_sink=0)
    budget = Budget(layers, n, ratio=ratio).entries()
    assert sum(t.shape[-1] for t in kept) == max(budget, layers)
    for t in kept:
        assert t.shape[:2] == (1, 2) and t.dtype == torch.int64
        assert bool((t >= 0).all()) and bool((t < n).all())  # dense: no -1 padding
        assert bool((t[..., 1:] > t[..., :-1]).all())  # ascending, no repeats
    # Heads rank on their own: somewhere the two heads of a layer keep different positions.
    assert n < 32 or any(not torch.equal(t[0, 0], t[0, 1]) for t in kept)


def test_n_keep_budget_and_tiny_budgets() -> None:
    s = _scores(4, 2, 20, seed=1)
    assert sum(t.shape[-1] for t in select(s, n_keep=23, policy="kvpack")) == 23
    assert sum(t.shape[-1] for t in select(s, n_keep=23, policy="kvpack", allocation="mass")) == 23
    # Fewer slots than layers: every layer still keeps one (the floor of every policy).
    for allocation in ("uniform", "mass", "scores"):
        tiny = select(s, n_keep=2, policy="kvpack", allocation=allocation)
        assert [t.shape[-1] for t in tiny] == [1, 1, 1, 1]


def test_floor_holds_where_kvcompose_starves_a_layer() -> None:
    s = _scores(4, 2, 128, seed=2)
    s[2] *= 1e-4  # a layer whose attention is tiny in absolute terms
    budget = Budget(4, 128, ratio=0.875).entries()
    kvcompose = [t.shape[-1] for t in select(s, 0.875, "kvcompose")]
    assert kvcompose[2] == 1  # raw scores compared across layers starve it
    for floor in (0.25, 0.5, 0.9):
        widths = [t.shape[-1] for t in select(s, 0.875, "kvpack", allocation="mass", floor=floor)]
        assert sum(widths) == budget
        assert min(widths) >= math.floor(floor * budget / 4)


def test_mass_allocation_ignores_each_layers_scale() -> None:
    s = _scores(3, 2, 64, seed=3)
    scaled = s.clone()
    scaled[1] *= 1000.0
    a = select(s, 0.8, "kvpack", allocation="mass")
    b = select(scaled, 0.8, "kvpack", allocation="mass")
    assert [t.shape[-1] for t in a] == [t.shape[-1] for t in b]
    raw_a = [t.shape[-1] for t in select(s, 0.8, "kvpack", allocation="scores")]
    raw_b = [t.shape[-1] for t in select(scaled, 0.8, "kvpack", allocation="scores")]
    assert raw_a != raw_b


def test_uniform_allocation_and_full_floor_split_evenly() -> None:
    s = _scores(3, 2, 50, seed=4)
    for settings in ({}, {"allocation": "mass", "floor": 1.0}):
        assert [t.shape[-1] for t in select(s, n_keep=40, policy="kvpack", **settings)] == [
            14,
            13,
            13,
        ]


def test_sinks_and_window_kept_in_every_head() -> None:
    s = _scores(3, 4, 60, seed=5)
    s[..., :6] = 0.0  # no attention at all on the sinks
    s[..., -5:] = 0.0
    for allocation in ("uniform", "mass"):
        # 16 slots per layer on average: the floor (8) pays for the 8 protected positions.
        kept = select(
            s, n_keep=3 * 16, policy="kvpack", num_kv_heads=2, n_sink=3, window_size=5,
            allocation=allocation,
        )  # fmt: skip
        for t in kept:
            for h in range(2):
                row = set(t[0, h].tolist())
                assert {0, 1, 2} <= row and set(range(55, 60)) <= row
    # A budget smaller than what is protected keeps the first sinks first.
    few = select(s, n_keep=3 * 2, policy="kvpack", num_kv_heads=2, n_sink=3, window_size=5)
    assert all(t[0].tolist() == [[0, 1], [0, 1]] for t in few)


def test_pooling_keeps_the_neighbours_of_a_peak() -> None:
    n = 40
    s = torch.full((2, 1, 2, n), 1e-3)
    s[:, :, :, 20] = 1.0  # one strong position; its neighbours got nothing
    s[:, :, :, 5] = 0.5
    kept = select(s, n_keep=2 * 6, policy="kvpack", n_sink=0)
    assert all(t[0, h].tolist() == [4, 5, 6, 19, 20, 21] for t in kept for h in range(2))
    bare = select(s, n_keep=2 * 6, policy="kvpack", n_sink=0, kernel_size=1)
    assert bare[0][0, 0].tolist()[:2] == [0, 1]  # without pooling, ties fill the rest


def test_deterministic_and_ties_keep_lower_positions() -> None:
    s = _scores(3, 4, 45, seed=6)
    a = select(s, 0.7, "kvpack", num_kv_heads=2)
    b = select(s.clone(), 0.7, "kvpack", num_kv_heads=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    flat = torch.ones(2, 1, 2, 10)
    even = select(flat, n_keep=2 * 3, policy="kvpack", n_sink=0)
    assert all(t[0].tolist() == [[0, 1, 2], [0, 1, 2]] for t in even)
    # Equal weights across layers: the lower layer wins everything above the floors.
    mass = select(flat, n_keep=6, policy="kvpack", n_sink=0, allocation="mass")
    assert [t.shape[-1] for t in mass] == [5, 1]


def test_batch_rows_are_independent() -> None:
    s = torch.cat([_scores(3, 2, 30, seed=7), _scores(3, 2, 30, seed=8)], dim=1)
    both = select(s, 0.75, "kvpack")
    for row in range(2):
        alone = select(s[:, row : row + 1], 0.75, "kvpack")
        for t, a in zip(both, alone, strict=True):
            got = t[row]
            width = a.shape[-1]
            assert torch.equal(got[:, :width], a[0])
            assert bool((got[:, width:] == -1).all())


def test_settings_parse_and_errors() -> None:
    s = KVPackSettings.from_mapping(
        {"kernel_size": "5", "pooling": "avg", "floor": "0.75", "allocation": "uniform"}
    )
    assert (s.kernel_size, s.pooling, s.floor, s.allocation) == (5, "avg", 0.75, "uniform")
    assert POLICIES["kvpack"].settings_type is KVPackSettings
    for mapping, message in [
        ({"kernel_size": "4"}, "'kernel_size' must be odd"),
        ({"kernel_size": "65"}, r"'kernel_size'=65 is out of range"),
        ({"floor": "1.5"}, r"'floor'=1.5 is out of range: allowed \[0, 1\]"),
        ({"floor": "nan"}, "'floor'=nan is out of range"),
        ({"allocation": "pyramid"}, "'allocation' must be one of"),
        ({"pooling": "median"}, "'pooling' must be one of"),
        ({"sinks": "4"}, "unknown setting 'sinks'"),
    ]:
        with pytest.raises(ValueError, match=message):
            KVPackSettings.from_mapping(mapping)
    budget = Budget(4, 64, ratio=0.9)  # 26 slots per layer on average, rounded up: 7
    policy_for_layout("kvpack", {"n_sink": "7", "window_size": "7"}, budget)
    with pytest.raises(ValueError, match=r"'window_size'=8 is out of range: allowed \[0, 7\]"):
        policy_for_layout("kvpack", {"window_size": "8"}, budget)
    with pytest.raises(ValueError, match=r"'kernel_size'=9 is out of range"):
        policy_for_layout("kvpack", {"kernel_size": "9"}, Budget(2, 8, ratio=0.5))


def test_layer_by_layer_shares_are_uniform() -> None:
    policy = policy_for_layout("kvpack", {}, Budget(3, 41, ratio=0.5))
    assert layer_shares(policy, Budget(3, 41, ratio=0.5)) == [21, 20, 20]
    # One layer selected alone keeps exactly its share.
    s = _scores(1, 2, 41, seed=9)
    assert select(s, n_keep=21, policy="kvpack")[0].shape[-1] == 21


@pytest.mark.parametrize("count", [1, 2, 7, 19, 20])
def test_top_positions_equal_a_stable_sort(count: int) -> None:
    gen = torch.Generator().manual_seed(count)
    s = torch.randint(0, 4, (3, 2, 20), generator=gen).float()  # many ties
    s[0, 0, [3, 9, 15]] = torch.inf  # protected positions, tied among themselves
    want = s.sort(dim=-1, descending=True, stable=True).indices[..., :count].sort(dim=-1).values
    assert torch.equal(top_positions(s, count), want)
