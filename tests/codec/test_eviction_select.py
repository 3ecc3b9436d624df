"""`select` and `gather`: input validation, output properties over random shapes, batches, CUDA."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack.codec import POLICIES, gather, select

NEEDS_KEYS_OR_VALUES = {"knorm"}


def _cache(layers: int, batch: int, hkv: int, n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, hkv, n, 4, generator=gen) for _ in range(layers)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 1.0}, r"\[0, 1\)"),
        ({"ratio": -0.1}, r"\[0, 1\)"),
        ({"ratio": float("nan")}, "ratio must be a number"),
        ({"ratio": True}, "ratio must be a number"),
        ({}, "exactly one of ratio and n_keep"),
        ({"ratio": 0.5, "n_keep": 3}, "exactly one of ratio and n_keep"),
        ({"n_keep": 0}, "n_keep must be in"),
        ({"n_keep": 2 * 8 + 1}, "n_keep must be in"),
        ({"n_keep": 2.0}, "n_keep must be an integer"),
        ({"ratio": 0.5, "num_kv_heads": 3}, "multiple of num_kv_heads"),
        ({"ratio": 0.5, "num_kv_heads": 0}, "positive integer"),
    ],
)
def test_select_rejects_bad_budgets_and_heads(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        select(torch.rand(2, 1, 4, 8), **kwargs)  # type: ignore[arg-type]


def test_select_rejects_bad_scores() -> None:
    s = torch.rand(2, 1, 2, 8)
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = s.clone()
        t[1, 0, 1, 3] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            select(t, 0.5)
    with pytest.raises(ValueError, match="floating"):
        select(torch.ones(2, 1, 2, 8, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match=r"\[L, B, H, n\]"):
        select(torch.rand(2, 2, 8), 0.5)
    with pytest.raises(ValueError, match="empty dimension"):
        select(torch.rand(2, 1, 2, 0), 0.5)
    with pytest.raises(ValueError, match=r"torch\.Tensor"):
        select([[0.1]], 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs attention scores"):
        select(None, 0.5)


def test_select_rejects_mismatched_cache() -> None:
    s = torch.rand(2, 1, 4, 8)
    with pytest.raises(ValueError, match="list of 2 layer tensors"):
        select(s, 0.5, "kvcompose", num_kv_heads=2, add_v_norm=True, values=_cache(3, 1, 2, 8, 0))
    with pytest.raises(ValueError, match=r"values\[0\] must be \[B=1, Hkv=2, n=8, d\]"):
        select(s, 0.5, "kvcompose", num_kv_heads=2, add_v_norm=True, values=_cache(2, 1, 4, 8, 0))
    with pytest.raises(ValueError, match="needs values"):
        select(s, 0.5, "kvcompose", num_kv_heads=2, add_v_norm="true")
    bad = _cache(2, 1, 2, 8, 0)
    bad[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"values\[1\] contains NaN"):
        select(s, 0.5, "kvcompose", num_kv_heads=2, add_v_norm=True, values=bad)


def _check_layer(t: torch.Tensor, batch: int, hkv: int, n: int) -> list[list[int]]:
    """Assert the padding convention; return each head's kept count."""
    assert t.dtype == torch.int64 and t.shape[:2] == (batch, hkv)
    counts = []
    for row in t.tolist():
        per_head = []
        for head in row:
            kept = [p for p in head if p >= 0]
            assert head == kept + [-1] * (len(head) - len(kept)), head
            assert kept == sorted(set(kept)) and all(0 <= p < n for p in kept)
            per_head.append(len(kept))
        counts.append(per_head)
    return counts


shapes = st.tuples(
    st.integers(1, 4),  # L
    st.integers(1, 3),  # B
    st.integers(1, 3),  # Hkv
    st.integers(1, 3),  # GQA group
    st.integers(1, 40),  # n
    st.integers(0, 2**20),  # seed
)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, ratio=st.floats(0.0, 0.99), policy=st.sampled_from(sorted(POLICIES)))
def test_select_properties(
    shape: tuple[int, int, int, int, int, int], ratio: float, policy: str
) -> None:
    layers, batch, hkv, g, n, seed = shape
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(layers, batch, hkv * g, n, generator=gen)
    cache = _cache(layers, batch, hkv, n, seed)
    kept = select(scores, ratio, policy, num_kv_heads=hkv, keys=cache, values=cache)
    assert len(kept) == layers
    total = max(1, int(layers * n * (1 - ratio)))
    counts = [_check_layer(t, batch, hkv, n) for t in kept]
    for b in range(batch):
        slots = [counts[layer][b] for layer in range(layers)]
        if policy == "kvcompose_unstructured":
            assert sum(sum(c) for c in slots) == max(1, int(layers * hkv * n * (1 - ratio)))
        else:
            widths = [c[0] for c in slots]
            assert all(c == [c[0]] * hkv for c in slots)  # uniform inside a layer
            assert all(1 <= w <= n for w in widths)
            assert sum(widths) >= total
            if min(widths) > 1:
                assert sum(widths) == total
        if batch == 1 and policy != "kvcompose_unstructured":
            assert all(bool((t >= 0).all()) for t in kept)  # never padded


@settings(max_examples=40, deadline=None)
@given(shape=shapes, ratio=st.floats(0.0, 0.99), policy=st.sampled_from(sorted(POLICIES)))
def test_batch_rows_equal_single_row_results(
    shape: tuple[int, int, int, int, int, int], ratio: float, policy: str
) -> None:
    layers, batch, hkv, g, n, seed = shape
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(layers, batch, hkv * g, n, generator=gen)
    cache = _cache(layers, batch, hkv, n, seed)
    kept = select(scores, ratio, policy, num_kv_heads=hkv, keys=cache, values=cache)
    for b in range(batch):
        row_cache = [c[b : b + 1] for c in cache]
        alone = select(
            scores[:, b : b + 1], ratio, policy, num_kv_heads=hkv, keys=row_cache, values=row_cache
        )
        for t, a in zip(kept, alone, strict=True):
            row = t[b : b + 1]
            width = a.shape[-1]
            assert torch.equal(row[..., :width], a)
            assert bool((row[..., width:] == -1).all())


def test_gather_picks_rows_and_zeroes_padding() -> None:
    keys = [torch.arange(2 * 5 * 3, dtype=torch.float16).reshape(1, 2, 5, 3)]
    values = [-keys[0]]
    idx = [torch.tensor([[[0, 3, 4], [2, -1, -1]]])]
    k, v = gather(keys, values, idx)
    assert k[0].dtype == torch.float16 and k[0].shape == (1, 2, 3, 3)
    assert torch.equal(k[0][0, 0], keys[0][0, 0, [0, 3, 4]])
    assert torch.equal(k[0][0, 1, 0], keys[0][0, 1, 2])
    assert not bool(k[0][0, 1, 1:].any()) and not bool(v[0][0, 1, 1:].any())
    assert torch.equal(v[0], -k[0])


def test_gather_validates() -> None:
    keys = _cache(2, 1, 2, 6, 0)
    good = select(torch.rand(2, 1, 2, 6), 0.5)
    with pytest.raises(ValueError, match="one entry per layer"):
        gather(keys, keys, good[:1])
    with pytest.raises(ValueError, match="positions must be in"):
        gather(keys[:1], keys[:1], [good[0] + 6])
    with pytest.raises(ValueError, match="int64"):
        gather(keys[:1], keys[:1], [good[0].int()])
    k, _v = gather(keys, keys, good)
    assert [t.shape for t in k] == [(1, 2, g.shape[-1], 4) for g in good]


def test_select_then_gather_round_trip() -> None:
    gen = torch.Generator().manual_seed(9)
    scores = torch.rand(3, 2, 4, 32, generator=gen)
    cache = _cache(3, 2, 2, 32, 9)
    kept = select(scores, 0.6, "kvcompose_unstructured", num_kv_heads=2)
    k, _ = gather(cache, cache, kept)
    for layer in range(3):
        for b in range(2):
            for h in range(2):
                pos = [p for p in kept[layer][b, h].tolist() if p >= 0]
                assert torch.equal(k[layer][b, h, : len(pos)], cache[layer][b, h, pos])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_cuda_selects_the_same_as_cpu(policy: str) -> None:
    gen = torch.Generator().manual_seed(11)
    scores = torch.rand(4, 2, 8, 257, generator=gen)
    cache = _cache(4, 2, 4, 257, 11)
    cpu = select(scores, 0.7, policy, num_kv_heads=4, keys=cache, values=cache)
    gpu_cache = [c.cuda() for c in cache]
    gpu = select(scores.cuda(), 0.7, policy, num_kv_heads=4, keys=gpu_cache, values=gpu_cache)
    for a, b in zip(cpu, gpu, strict=True):
        assert b.device.type == "cuda"
        assert torch.equal(a, b.cpu())
    k, _ = gather(gpu_cache, gpu_cache, gpu)
    k_cpu, _ = gather(cache, cache, cpu)
    assert all(torch.equal(x, y.cpu()) for x, y in zip(k_cpu, k, strict=True))
