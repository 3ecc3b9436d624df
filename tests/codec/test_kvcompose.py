"""KVCompose: hand-computed steps and a token-for-token check against a loop re-implementation.

The reference below is written from docs/ALGORITHMS.md §1 / kvpress's KVComposePress data flow, one
head and one token at a time, in float32 like the press, with kvpack's documented tie break
(per head: lower position first; globally: lower layer, then better rank).
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import numpy as np
import pytest
import torch

from kvpack.codec import select as codec_select
from kvpack.codec.budgets import Budget, top_counts
from kvpack.codec.policies.base import EvictionInput
from kvpack.codec.policies.kvcompose import KVCompose, KVComposeSettings

F32 = np.float32


def select(
    scores: torch.Tensor, ratio: float | None = None, policy: str = "kvcompose", **kwargs: Any
) -> list[torch.Tensor]:
    """codec.select with policy kvcompose unless told (whatever codec's default policy is)."""
    return codec_select(scores, ratio, policy, **kwargs)


def reference(
    scores: np.ndarray,
    num_kv_heads: int,
    ratio: float,
    values: list[np.ndarray] | None,
    agg_group: str = "mean",
    agg_head: str = "mean",
    add_v_norm: bool = False,
    add_mean_across_heads: bool = True,
    keep_token_lower_bound: int = 0,
    structured: bool = True,
) -> list[list[list[int]]]:
    """scores [L, Hq, n] float32 (batch 1) -> kept positions [layer][kv head] ascending."""
    layers, hq, n = scores.shape
    g = hq // num_kv_heads
    s = np.zeros((layers, num_kv_heads, n), dtype=F32)
    for layer in range(layers):
        for k in range(num_kv_heads):
            acc = np.zeros(n, dtype=F32) if agg_group == "mean" else np.full(n, -np.inf, F32)
            for h in range(k * g, (k + 1) * g):
                acc = (
                    acc + scores[layer, h]
                    if agg_group == "mean"
                    else np.maximum(acc, scores[layer, h])
                )
            s[layer, k] = acc / F32(g) if agg_group == "mean" else acc
            if add_v_norm:
                assert values is not None
                s[layer, k] = s[layer, k] * values[layer][k]
        if add_mean_across_heads:
            s[layer] = s[layer] + s[layer].mean(axis=0, dtype=F32)
    ranked = -np.sort(-s, axis=-1)
    bonus = np.zeros(n, dtype=F32)
    bonus[:keep_token_lower_bound] = F32(1e9)

    if structured:
        c = np.zeros((layers, n), dtype=F32)
        for layer in range(layers):
            acc = np.zeros(n, dtype=F32) if agg_head == "mean" else np.full(n, -np.inf, F32)
            for k in range(num_kv_heads):
                r = ranked[layer, k]
                acc = acc + r if agg_head == "mean" else np.maximum(acc, r)
            c[layer] = acc / F32(num_kv_heads) if agg_head == "mean" else acc
            c[layer] = c[layer] + bonus
        c[0] = c.max(axis=0)
        total = max(1, int(layers * n * (1 - ratio)))
        entries = sorted(
            ((float(c[layer, j]), layer, j) for layer in range(layers) for j in range(n)),
            key=lambda e: (-e[0], e[1], e[2]),
        )[:total]
        per_layer = [sum(1 for e in entries if e[1] == layer) for layer in range(layers)]
        floor = max(1, keep_token_lower_bound)
        budgets = [[min(n, max(floor, b))] * num_kv_heads for b in per_layer]
    else:
        per_head = ranked + bonus
        total = max(1, int(layers * num_kv_heads * n * (1 - ratio)))
        keyed = sorted(
            (
                (float(per_head[layer, k, j]), layer, k, j)
                for layer in range(layers)
                for k in range(num_kv_heads)
                for j in range(n)
            ),
            key=lambda e: (-e[0], e[1], e[2], e[3]),
        )[:total]
        budgets = [
            [sum(1 for e in keyed if e[1] == layer and e[2] == k) for k in range(num_kv_heads)]
            for layer in range(layers)
        ]
    out = []
    for layer in range(layers):
        heads = []
        for k in range(num_kv_heads):
            best = sorted(range(n), key=lambda i: (-float(s[layer, k, i]), i))
            heads.append(sorted(best[: budgets[layer][k]]))
        out.append(heads)
    return out


def as_lists(kept: list[torch.Tensor]) -> list[list[list[int]]]:
    """Batch row 0 of select's output with -1 padding stripped."""
    return [[[p for p in row if p >= 0] for row in t[0].tolist()] for t in kept]


# Hand example: L=2, Hkv=2, n=4, scores in eighths so every sum and mean is exact.
HAND = torch.tensor(
    [
        [[1, 4, 2, 3], [5, 0, 1, 2]],
        [[7, 6, 0, 0], [6, 5, 1, 0]],
    ],
    dtype=torch.float32,
).div(8)[:, None]  # [L=2, B=1, Hkv=2, n=4]


def _inp(scores: torch.Tensor, ratio: float = 0.5) -> EvictionInput:
    layers, batch, heads, n = scores.shape
    return EvictionInput(
        layers=layers,
        batch=batch,
        num_kv_heads=heads,
        n=n,
        device=scores.device,
        budget=Budget(layers, n, ratio=ratio),
        scores=scores,
    )


def test_composite_scores_and_layer0_envelope_by_hand() -> None:
    pol = KVCompose(KVComposeSettings(add_mean_across_heads=False))
    ranked = pol.score(_inp(HAND)).sort(dim=-1, descending=True).values
    c = pol.composite_scores(ranked)[:, 0] * 8
    # Layer 1's own composite [6.5, 5.5, 0.5, 0] beats layer 0's [4.5, 2.5, 1.5, 0.5] early on;
    # the envelope lifts layer 0 to the element-wise max.
    assert c.tolist() == [[6.5, 5.5, 1.5, 0.5], [6.5, 5.5, 0.5, 0.0]]
    pol_max = KVCompose(KVComposeSettings(add_mean_across_heads=False, agg_head="max"))
    assert (pol_max.composite_scores(ranked)[:, 0] * 8).tolist() == [
        [7.0, 6.0, 2.0, 1.0],
        [7.0, 6.0, 1.0, 0.0],
    ]


def test_head_mean_stabilisation_by_hand() -> None:
    s = KVCompose().score(_inp(HAND))[:, 0] * 8
    # Layer 0 head mean [3, 2, 1.5, 2.5] is added to each head.
    assert s[0].tolist() == [[4, 6, 3.5, 5.5], [8, 2, 2.5, 4.5]]
    assert s[1].tolist() == [[13.5, 11.5, 0.5, 0], [12.5, 10.5, 1.5, 0]]


def test_budgets_and_per_head_positions_by_hand() -> None:
    # ratio 0.375: N = int(8 * 0.625) = 5 slots: 6.5 (l0), 6.5 (l1), 5.5 (l0), 5.5 (l1), 1.5 (l0).
    kept = select(HAND, 0.375, add_mean_across_heads=False)
    assert [tuple(t.shape) for t in kept] == [(1, 2, 3), (1, 2, 2)]
    # Layer 0 head 0 scores [1,4,2,3]/8 -> top 3 = {1, 3, 2}; head 1 [5,0,1,2]/8 -> {0, 3, 2}.
    assert kept[0][0].tolist() == [[1, 2, 3], [0, 2, 3]]
    assert kept[1][0].tolist() == [[0, 1], [0, 1]]


def test_global_tie_goes_to_lower_layer() -> None:
    # n_keep=3: 6.5 (l0), 6.5 (l1), then 5.5 ties between l0 and l1 -> l0.
    kept = select(HAND, n_keep=3, add_mean_across_heads=False)
    assert [t.shape[-1] for t in kept] == [2, 1]
    # n_keep=1: the 6.5 tie goes to layer 0; layer 1 gets the floor of one slot.
    kept = select(HAND, n_keep=1, add_mean_across_heads=False)
    assert [t.shape[-1] for t in kept] == [1, 1]


def test_per_head_tie_keeps_lower_position() -> None:
    flat = torch.zeros(1, 1, 1, 6)
    assert select(flat, n_keep=2)[0].tolist() == [[[0, 1]]]
    assert select(flat, n_keep=2, policy="kvcompose_unstructured")[0].tolist() == [[[0, 1]]]


def test_keep_token_lower_bound_floors_every_layer() -> None:
    kept = select(HAND, n_keep=1, add_mean_across_heads=False, keep_token_lower_bound=3)
    assert [t.shape[-1] for t in kept] == [3, 3]
    kept = select(HAND, n_keep=1, keep_token_lower_bound=9)
    assert [t.shape[-1] for t in kept] == [4, 4]  # capped at n


def test_ratio_zero_keeps_everything_and_n_one() -> None:
    s = torch.rand(3, 1, 2, 5)
    assert all(t.tolist() == [[list(range(5))] * 2] for t in select(s, 0.0))
    one = select(torch.rand(2, 1, 2, 1), 0.9)
    assert [t.tolist() for t in one] == [[[[0], [0]]]] * 2


@pytest.mark.parametrize("seed", range(6))
def test_top_counts_sum_exactly(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    blocks, n = 5, 7
    flat = torch.randint(0, 4, (3, blocks * n), generator=gen).float()  # many ties
    for total in (1, 9, 17, blocks * n):
        counts = top_counts(flat, total, n)
        assert counts.sum(dim=1).tolist() == [total] * 3
        assert bool((counts >= 0).all()) and bool((counts <= n).all())


def test_layer_budgets_sum_to_requested_total_before_floor() -> None:
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(6, 2, 4, 50, generator=gen)
    pol = KVCompose()
    ranked = pol.score(_inp(scores)).sort(dim=-1, descending=True).values
    for ratio in (0.0, 0.3, 0.75, 0.9, 0.999):
        total = Budget(6, 50, ratio=ratio).entries()
        c = pol.composite_scores(ranked)
        raw = top_counts(c.transpose(0, 1).reshape(2, -1), total, 50)
        assert raw.sum(dim=1).tolist() == [total, total]
        kept = select(scores, ratio)
        widths = torch.tensor([t.shape[-1] for t in kept])
        assert int(widths.sum()) >= total


SETTINGS = list(
    itertools.product(
        ("mean", "max"), ("mean", "max"), (False, True), (True, False), (0, 2), (True, False)
    )
)


def _random_case(rng: random.Random, ties: bool) -> tuple[torch.Tensor, int, list[torch.Tensor]]:
    layers = rng.randint(1, 4)
    hkv = rng.choice((1, 2, 4)) if ties else rng.randint(1, 3)
    g = rng.choice((1, 2)) if ties else rng.randint(1, 3)
    n = rng.randint(1, 24)
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    if ties:
        # Few levels, power-of-two group sizes: every float32 sum is exact, so ties are real.
        scores = torch.randint(0, 4, (layers, 1, hkv * g, n), generator=gen).float() / 4
        values = [
            torch.randint(0, 2, (1, hkv, n, 4), generator=gen).float() + 1 for _ in range(layers)
        ]
    else:
        scores = torch.rand(layers, 1, hkv * g, n, generator=gen)
        values = [torch.randn(1, hkv, n, 4, generator=gen) for _ in range(layers)]
    return scores, hkv, values


@pytest.mark.parametrize("ties", [False, True])
def test_matches_loop_reference_over_random_inputs(ties: bool) -> None:
    rng = random.Random(1234 + ties)
    for case in range(192):
        scores, hkv, values = _random_case(rng, ties)
        agg_group, agg_head, v_norm, head_mean, floor, structured = SETTINGS[case % len(SETTINGS)]
        ratio = rng.choice((0.0, 0.1, 0.5, 0.75, 0.9, rng.random() * 0.999))
        settings: dict[str, object] = {
            "agg_group": agg_group,
            "agg_head": agg_head,
            "add_v_norm": v_norm,
            "add_mean_across_heads": head_mean,
            "keep_token_lower_bound": floor,
            "structured": structured,
        }
        got = select(scores, ratio, num_kv_heads=hkv, values=values, **settings)
        norms = [v[0].norm(dim=-1).numpy() for v in values]
        want = reference(scores[:, 0].numpy(), hkv, ratio, norms, **settings)  # type: ignore[arg-type]
        assert as_lists(got) == want, (case, settings, ratio, tuple(scores.shape))


def test_structured_output_has_no_padding_and_uniform_width() -> None:
    gen = torch.Generator().manual_seed(3)
    kept = select(torch.rand(4, 1, 8, 64, generator=gen), 0.8, num_kv_heads=4)
    for t in kept:
        assert t.shape[:2] == (1, 4)
        assert bool((t >= 0).all())
        assert bool((t[..., 1:] > t[..., :-1]).all())


def test_wire_strings_select_the_same_as_typed_settings() -> None:
    gen = torch.Generator().manual_seed(4)
    s = torch.rand(3, 1, 4, 20, generator=gen)
    typed = select(s, 0.6, num_kv_heads=2, agg_head="max", keep_token_lower_bound=2)
    wire = select(
        s, 0.6, num_kv_heads=2, agg_head="max", keep_token_lower_bound="2", structured="true"
    )
    assert all(torch.equal(a, b) for a, b in zip(typed, wire, strict=True))
