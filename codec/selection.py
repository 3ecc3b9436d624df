"""`select`: validate eviction inputs, run a policy, return kept positions per layer.

Padding convention: when batch rows (or heads, unstructured) keep different counts, a layer's
tensor is [B, Hkv, max count] and each head's row is its ascending kept positions followed by -1.
With B = 1 and a structured policy there is never padding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from kvpack.codec.budgets import Budget
from kvpack.codec.policies import DEFAULT_POLICY, POLICIES, EvictionInput, Policy
from kvpack.codec.policy_settings import ANY_LAYOUT, Extent, shown

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _layout_of_scores(scores: object, num_kv_heads: int | None) -> tuple[int, int, int, int]:
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"scores must be a floating tensor, got dtype {scores.dtype}")
    if scores.dim() != 4:
        raise ValueError(f"scores must be [L, B, H, n], got shape {tuple(scores.shape)}")
    layers, batch, heads, n = scores.shape
    if min(layers, batch, heads, n) < 1:
        raise ValueError(f"scores has an empty dimension: shape {tuple(scores.shape)}")
    hkv = heads if num_kv_heads is None else num_kv_heads
    if heads % hkv:
        raise ValueError(f"score heads ({heads}) must be a multiple of num_kv_heads ({hkv})")
    return layers, batch, hkv, n


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t`. min/max reductions propagate NaN and keep +-Inf, and one fused
    aminmax pass costs about a tenth of isfinite().all() on CPU half tensors (profiled: it was
    75% of knorm's select+gather, 16x a copy of the cache)."""
    if t.numel() == 0:
        return True
    lo, hi = t.aminmax()
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _check_cache(
    name: str,
    tensors: object,
    layout: tuple[int, int, int, int],
    device: torch.device,
    used: bool,
) -> list[torch.Tensor]:
    layers, batch, hkv, n = layout
    if not isinstance(tensors, Sequence) or len(tensors) != layers:
        got = len(tensors) if isinstance(tensors, Sequence) else type(tensors).__name__
        raise ValueError(f"{name} must be a list of {layers} layer tensors, got {got}")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}[{i}] must be a floating tensor")
        if t.dim() != 4 or tuple(t.shape[:3]) != (batch, hkv, n):
            raise ValueError(
                f"{name}[{i}] must be [B={batch}, Hkv={hkv}, n={n}, d], got {tuple(t.shape)}"
            )
        if t.device != device:
            raise ValueError(f"{name}[{i}] is on {t.device}, expected {device}")
        # Scanning a cache the policy ignores would cost a full read of it.
        if used and not all_finite(t):
            raise ValueError(f"{name}[{i}] contains NaN or Inf")
    return list(tensors)


def _layout_of_cache(
    tensors: Sequence[torch.Tensor], num_kv_heads: int | None
) -> tuple[int, int, int, int]:
    if not isinstance(tensors, Sequence) or not tensors:
        raise ValueError("keys/values must be a non-empty list of [B, Hkv, n, d] tensors")
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or first.dim() != 4:
        raise ValueError("keys/values must be a non-empty list of [B, Hkv, n, d] tensors")
    batch, hkv, n, _ = first.shape
    if num_kv_heads is not None and num_kv_heads != hkv:
        raise ValueError(f"num_kv_heads={num_kv_heads} but the cache has {hkv} KV heads")
    if min(batch, hkv, n) < 1:
        raise ValueError(f"cache has an empty dimension: shape {tuple(first.shape)}")
    return len(tensors), batch, hkv, n


def _layout_of_shape(shape: object, num_kv_heads: int | None) -> tuple[int, int, int, int]:
    if (
        not isinstance(shape, tuple)
        or len(shape) != 4
        or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in shape)
    ):
        raise ValueError(f"shape must be (L, B, Hkv, n), four positive ints, got {shape!r}")
    if num_kv_heads is not None and num_kv_heads != shape[2]:
        raise ValueError(f"num_kv_heads={num_kv_heads} but shape has {shape[2]} KV heads")
    layers, batch, hkv, n = shape
    return layers, batch, hkv, n


def make_policy(policy: str, settings: dict[str, object], extent: Extent = ANY_LAYOUT) -> Policy:
    """The named policy with its settings parsed from `settings` (values may be strings) and
    checked against the ranges for `extent` (by default the codec's largest layout)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {shown(policy)} (known: {sorted(POLICIES)})")
    cls = POLICIES[policy]
    return cls(cls.settings_type.from_mapping(settings, extent))


def policy_for_layout(policy: str, settings: Mapping[str, object], budget: Budget) -> Policy:
    """The named policy, its settings checked against a cache of `budget.layers` layers of
    `budget.n` tokens kept to `budget`, before any tensor exists.

    This is the one check of a request's policy settings (kvpack.engine's request calls it):
    ValueError naming the first unknown setting, or the first value that does not parse or lies
    outside its range, with the value and the allowed range.
    """
    layer_budget = -(-budget.entries() // budget.layers)  # token slots per layer, rounded up
    pol = make_policy(policy, dict(settings), Extent(budget.n, layer_budget))
    # Defaults were not in `settings`: they are checked (and always allowed) here.
    pol.settings.validate_for_layout(seq_len=budget.n, layer_budget=layer_budget)
    return pol


def layer_shares(policy: Policy, budget: Budget) -> list[int]:
    """Token slots each layer keeps when layers are selected one at a time (`select` on one
    layer with ``n_keep=share``): the policy's own split of `budget` (uniform; PyramidKV's
    pyramid; KVComposeUniform's floor), clamped to [1, n] as `Policy.keep` clamps it, so a
    policy whose split needs no statistics keeps per layer exactly what it keeps over all
    layers at once. KVCompose's global allocation reads every layer's scores: one layer at a
    time its layers share the budget uniformly.

    `Policy.layer_budgets` reads the budget and the layout only, never the tensors.
    """
    bare = EvictionInput(
        layers=budget.layers,
        batch=1,
        num_kv_heads=1,
        n=budget.n,
        device=torch.device("cpu"),
        budget=budget,
    )
    return [min(budget.n, max(1, b)) for b in policy.layer_budgets(bare)]


def select(
    scores: torch.Tensor | None,
    ratio: float | None = None,
    policy: str = DEFAULT_POLICY,
    *,
    n_keep: int | None = None,
    num_kv_heads: int | None = None,
    keys: Sequence[torch.Tensor] | None = None,
    values: Sequence[torch.Tensor] | None = None,
    shape: tuple[int, int, int, int] | None = None,
    **settings: object,
) -> list[torch.Tensor]:
    """Positions each layer keeps, chosen by `policy` (default DEFAULT_POLICY, "kvpack") from
    attention statistics.

    scores: [L, B, H, n] floating, H query heads (then pass num_kv_heads) or KV heads; None only
    for policies that use no statistics (streaming, knorm, random). ratio: fraction of entries
    removed, 0 <= ratio < 1; n_keep: token slots per sequence summed over layers (exactly one of
    the two). keys / values: L tensors [B, Hkv, n, d] on the scores' device, for policies that
    read them. shape: (L, B, Hkv, n) of the cache for a policy that reads no tensor (streaming,
    random), instead of keys or values. settings: the policy's settings by name, values may be
    wire strings.

    Returns L int64 tensors [B, Hkv, b_l] on the scores' device: kept positions ascending per
    head, -1 padded where rows or heads keep fewer (see the module docstring). Batch rows are
    independent. Raises ValueError on any invalid input.
    """
    pol = make_policy(policy, dict(settings))
    if num_kv_heads is not None and (
        isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1
    ):
        raise ValueError(f"num_kv_heads must be a positive integer, got {num_kv_heads!r}")
    if scores is not None:
        layout = _layout_of_scores(scores, num_kv_heads)
        device = scores.device
    elif pol.needs_scores:
        raise ValueError(f"policy {policy!r} needs attention scores")
    elif keys is None and values is None and shape is not None:
        layout = _layout_of_shape(shape, num_kv_heads)
        device = torch.device("cpu")
    else:
        cache = keys if keys is not None else values
        if cache is None:
            raise ValueError(f"policy {policy!r} without scores needs keys or values for shapes")
        layout = _layout_of_cache(cache, num_kv_heads)
        device = cache[0].device
    if pol.needs_keys and keys is None:
        raise ValueError(f"policy {policy!r} needs keys")
    if pol.needs_values and values is None:
        raise ValueError(f"policy {policy!r} needs values")
    layers, batch, hkv, n = layout
    budget = Budget(layers, n, ratio=ratio, n_keep=n_keep)
    scores32 = None
    if scores is not None and pol.needs_scores:
        scores32 = scores.float()
        if not bool(torch.isfinite(scores32).all()):
            raise ValueError("scores contain NaN or Inf")
    # Each cache is checked (and scanned for NaN/Inf, the dominant cost) once.
    if keys is not None:
        keys = _check_cache("keys", keys, layout, device, pol.needs_keys)
    if values is not None:
        values = _check_cache("values", values, layout, device, pol.needs_values)
    inp = EvictionInput(
        layers=layers,
        batch=batch,
        num_kv_heads=hkv,
        n=n,
        device=device,
        budget=budget,
        scores=scores32,
        keys=keys,
        values=values,
    )
    return pol.keep(inp)
