"""Attention statistics: hand cases and a naive per-query loop for the window scores."""

from __future__ import annotations

import math

import pytest
import torch

from kvpack.codec import reduce_gqa, scores_from_attention, scores_from_window


def test_reduce_gqa_mean_and_max_by_hand() -> None:
    s = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [5.0, 0.0], [7.0, 8.0]]])  # [B=1, Hq=4, n=2]
    assert reduce_gqa(s, 2).tolist() == [[[2.0, 4.0], [6.0, 4.0]]]
    assert reduce_gqa(s, 2, "max").tolist() == [[[3.0, 6.0], [7.0, 8.0]]]
    assert reduce_gqa(s, 4).tolist() == s.tolist()
    assert reduce_gqa(s, 1).tolist() == [[[4.0, 4.0]]]


def test_reduce_gqa_rejects_indivisible_heads_and_bad_agg() -> None:
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        reduce_gqa(torch.rand(1, 3, 4), 2)
    with pytest.raises(ValueError, match="agg_group"):
        reduce_gqa(torch.rand(1, 4, 4), 2, "median")


def test_scores_from_attention_keeps_context_columns_and_aggregates_queries() -> None:
    probs = torch.tensor([[[[0.1, 0.2, 0.7], [0.5, 0.4, 0.1]]]])  # [B=1, Hq=1, Tq=2, 3]
    assert torch.allclose(scores_from_attention(probs, 2), torch.tensor([[[0.5, 0.4]]]))
    got = scores_from_attention(probs.half(), 2, "mean")
    assert got.dtype == torch.float32
    assert torch.allclose(got, torch.tensor([[[0.3, 0.3]]]), atol=1e-3)
    with pytest.raises(ValueError, match="n must be"):
        scores_from_attention(probs, 4)
    with pytest.raises(ValueError, match="agg"):
        scores_from_attention(probs, 2, "sum")
    with pytest.raises(ValueError, match="floating"):
        scores_from_attention(probs.long(), 2)


def _window_loop(q: torch.Tensor, k: torch.Tensor, agg: str) -> torch.Tensor:
    """One query at a time: softmax over the keys it may see, zeros beyond."""
    b, hq, w, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    out = torch.zeros(b, hq, n)
    for bi in range(b):
        for h in range(hq):
            kh = k[bi, h // (hq // hkv)]
            rows = []
            for i in range(w):
                visible = n - w + i + 1
                p = torch.softmax(kh[:visible] @ q[bi, h, i] / math.sqrt(d), dim=0)
                rows.append(torch.cat([p, torch.zeros(n - visible)]))
            r = torch.stack(rows)
            out[bi, h] = r.amax(0) if agg == "max" else r.mean(0)
    return out


@pytest.mark.parametrize("agg", ["max", "mean"])
@pytest.mark.parametrize(("hq", "hkv", "w", "n"), [(4, 2, 3, 7), (2, 2, 1, 5), (6, 3, 5, 5)])
def test_scores_from_window_matches_per_query_loop(
    agg: str, hq: int, hkv: int, w: int, n: int
) -> None:
    gen = torch.Generator().manual_seed(hq * 100 + n)
    q = torch.randn(2, hq, w, 8, generator=gen)
    k = torch.randn(2, hkv, n, 8, generator=gen)
    got = scores_from_window(q, k, agg)
    assert got.shape == (2, hq, n)
    assert torch.allclose(got, _window_loop(q, k, agg), atol=1e-6)


def test_scores_from_window_is_causal_inside_the_window() -> None:
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 1, 3, 4, generator=gen)
    k = torch.randn(1, 1, 6, 4, generator=gen)
    s = scores_from_window(q, k, "mean")[0, 0]
    # Position 5 is visible to the last window query only, position 4 to the last two.
    last = torch.softmax(k[0, 0] @ q[0, 0, 2] / 2.0, dim=0)
    assert torch.allclose(s[5] * 3, last[5], atol=1e-6)
    assert torch.allclose(s.sum(), torch.tensor(1.0), atol=1e-6)


def test_scores_from_window_validates() -> None:
    with pytest.raises(ValueError, match="multiple of KV heads"):
        scores_from_window(torch.rand(1, 3, 2, 4), torch.rand(1, 2, 5, 4))
    with pytest.raises(ValueError, match="window W"):
        scores_from_window(torch.rand(1, 2, 6, 4), torch.rand(1, 2, 5, 4))
    with pytest.raises(ValueError, match="disagree"):
        scores_from_window(torch.rand(1, 2, 2, 4), torch.rand(1, 2, 5, 8))
