"""Budget mode: store a cache within a byte budget, choosing eviction and precision together.

A request with ``target_ratio`` / ``target_bytes`` leaves three choices to kvpack: the eviction
ratio ``rho`` (with the request's policy, which splits it over layers as it always does), the K
and V error bounds and the quantisation block. The pipeline
(:class:`~kvpack.engine.pipeline.Compression`) makes them once, when layer 0's K/V arrive (a
sample of real data is needed to know what a bound costs), with :func:`choose` over the
:func:`trial_model` of every candidate; it trims each layer to whole blocks
(:func:`whole_blocks`), encodes a layer over its share coarser, and enforces the budget on the
assembled container (coarser bounds, then further eviction, never a larger container).

The damage estimate (docs/ALGORITHMS.md, "Budget mode"), in units of attention mass:

- eviction: ``E(rho) = (m(rho) + rho) / 2``, ``m(rho)`` the attention mass of the ``rho``
  lowest-scored entries of the request's statistics (per KV head: query heads averaged). The
  statistics are task-agnostic and miss what a later question needs, so ``E`` is averaged with
  the uniform prior ``rho`` (every token equally likely to be needed). Without statistics
  (policies that read none) ``E(rho) = rho``.
- quantisation: ``(1 - rho) * QUANT_WEIGHT * (eK^2 + eV^2) / 12``: a uniform quantiser's mean
  squared error relative to the group range, on the kept entries. ``QUANT_WEIGHT`` is small
  because lossy encoding measured no accuracy loss at any tested bound on the reference model
  (docs/QUALITY.md) while eviction did: bounds coarsen before any eviction.

Sizes are predicted from a trial encoding of (a token sample of) layer 0 at every candidate bound
and block: bytes per token in quantised blocks, bytes per token left in the full-precision tail,
per-layer and per-block container overhead; the chosen model is then scaled by what layer 0's
real composite costs (:meth:`SizeModel.calibrated`). Predictions steer the choice; the final
check on the real container decides.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvpack import codec
from kvpack.codec import QuantSettings
from kvpack.errors import InvalidArgument

#: Candidate (K, V) error bounds, finest first, up to the coarsest bound measured without an
#: accuracy loss on the reference model with container v2 (K0.1/V0.2, docs/QUALITY.md). Coarser
#: ones are outside what the damage estimate's light quantisation weight was measured for:
#: K0.2/V0.4 alone (no eviction) cost 5-7.5 points with v2's quantiser, K0.25/V0.5 cost 2.5
#: points at ratios 0.5 and 0.75, and a ladder to K0.5/V1.0 collapsed accuracy to 8-18 %.
LADDER: tuple[tuple[float, float], ...] = (
    (0.0125, 0.025),
    (0.025, 0.05),
    (0.05, 0.1),
    (0.1, 0.2),
)
#: Candidate quantisation blocks (tokens) when the request does not set ``block_tokens``:
#: short blocks cost more K metadata, long ones leave more tokens in the full-precision tail.
BLOCKS: tuple[int, ...] = (32, 64)
#: Weight of the quantisation term against evicted attention mass (see the module docstring).
QUANT_WEIGHT = 0.2
#: The plan aims this fraction below the budget: room for layers that compress worse than the
#: trial; the final check handles the rest.
MARGIN = 0.03
#: Layer-0 tokens the trial encodes (evenly strided sample).
TRIAL_TOKENS = 512
#: Estimated bytes per kept position (zstd of int64 deltas) and per block record in the header.
INDEX_BYTES = 1.5
BLOCK_RECORD_BYTES = 40
#: Attempts of the final check before giving up (each re-encodes the held composite cache).
MAX_ENCODES = 8
#: Selections the plan runs to land the real per-layer split within the goal.
SETTLE_STEPS = 5


@dataclass(frozen=True)
class Target:
    """A request's budget: ``budget_bytes`` (the smaller of ``target_bytes`` and
    ``fp16_bytes / target_ratio``), the quality floor (``max_ratio``: the most eviction allowed;
    ``max_error_bound``: the coarsest bound) and what was asked, for keys and meta."""

    budget_bytes: int
    fp16_bytes: int
    max_ratio: float
    max_error_bound: float | None
    target_ratio: float | None
    target_bytes: int | None

    def key_fields(self) -> dict[str, object]:
        """What was asked (content keys, container meta): the unset fields left out."""
        asked = {
            "target_ratio": self.target_ratio,
            "target_bytes": self.target_bytes,
            "max_ratio": self.max_ratio,
            "max_error_bound": self.max_error_bound,
        }
        return {k: v for k, v in asked.items() if v is not None}


def fp16_bytes(num_layers: int, batch: int, kv_heads: int, seq_len: int, head_dim: int) -> int:
    """K+V bytes of the cache in fp16 (target_ratio's reference whatever the upload dtype)."""
    return 2 * num_layers * batch * kv_heads * seq_len * head_dim * 2


def make_target(
    *,
    fp16: int,
    target_ratio: float | None,
    target_bytes: int | None,
    max_ratio: float | None,
    max_error_bound: float | None,
    most_ratio: float,
) -> Target:
    """The checked :class:`Target` (InvalidArgument naming the field). ``most_ratio``: the most
    eviction the policy can do (1 - its fewest kept tokens / n; 0 for policy "none")."""
    if target_ratio is not None:
        r = target_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 1:
            raise InvalidArgument(
                f"target_ratio is how many times smaller than fp16 the container must be, a "
                f"number > 1, got {r!r}"
            )
    if target_bytes is not None and (
        isinstance(target_bytes, bool) or not isinstance(target_bytes, int) or target_bytes < 1
    ):
        raise InvalidArgument(f"target_bytes must be a positive integer, got {target_bytes!r}")
    if max_ratio is not None and (
        isinstance(max_ratio, bool)
        or not isinstance(max_ratio, (int, float))
        or not 0 <= max_ratio < 1
    ):
        raise InvalidArgument(f"max_ratio must be a fraction in [0, 1), got {max_ratio!r}")
    if max_error_bound is not None:
        e = max_error_bound
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not 2.0**-12 <= e <= 1:
            raise InvalidArgument(f"max_error_bound must be in [2^-12, 1], got {e!r}")
    budgets = [b for b in (target_bytes,) if b is not None]
    if target_ratio is not None:
        budgets.append(int(fp16 / target_ratio))
    cap = most_ratio if max_ratio is None else min(float(max_ratio), most_ratio)
    return Target(
        budget_bytes=min(budgets),
        fp16_bytes=fp16,
        max_ratio=cap,
        max_error_bound=None if max_error_bound is None else float(max_error_bound),
        target_ratio=None if target_ratio is None else float(target_ratio),
        target_bytes=target_bytes,
    )


def ladder(max_error_bound: float | None) -> list[tuple[float, float]]:
    """The candidate (K, V) bounds under the floor, finest first (each bound capped by it)."""
    if max_error_bound is None:
        return list(LADDER)
    out: list[tuple[float, float]] = []
    for k, v in LADDER:
        pair = (min(k, max_error_bound), min(v, max_error_bound))
        if pair not in out:
            out.append(pair)
    return out


def blocks_of(base: QuantSettings, block_set: bool) -> tuple[int, ...]:
    return (base.block_tokens,) if block_set else BLOCKS


def settings_for(base: QuantSettings, bounds: tuple[float, float], block: int) -> QuantSettings:
    return dataclasses.replace(
        base, k_error_bound=float(bounds[0]), v_error_bound=float(bounds[1]), block_tokens=block
    )


def lower_bound(
    shape: tuple[int, int, int, int, int],
    dtype: torch.dtype,
    base: QuantSettings,
    candidates: Sequence[QuantSettings],
    fewest_tokens: int,
    meta: dict[str, str],
) -> int:
    """A size no container of this layout can go below: every layer at its fewest kept tokens
    and all-zero K/V (constant groups carry no symbols; zeros compress best), at the candidate
    settings that store that smallest. ``shape``: ``(L, B, Hkv, n, d)``."""
    layers, batch, heads, n, d = shape
    zeros = torch.zeros(batch, heads, max(1, fewest_tokens), d, dtype=dtype)
    best = None
    for settings in candidates:
        enc = codec.encode_layer(zeros, zeros, None, settings)
        size = len(codec.assemble([enc] * layers, settings, dtype=dtype, meta=meta, seq_len=n))
        best = size if best is None else min(best, size)
    assert best is not None
    return best


def describe(nbytes: int, fp16: int) -> str:
    return f"{nbytes} bytes ({fp16 / max(1, nbytes):.2f}x smaller than fp16)"


# -- damage ----------------------------------------------------------------------------------


def eviction_damage(scores: torch.Tensor | None, num_kv_heads: int) -> Callable[[float], float]:
    """``E(rho)`` of the module docstring from SCORES ``[L, B, H, n]`` (H query or KV heads;
    None: no statistics, ``E(rho) = rho``)."""
    if scores is None:
        return lambda rho: float(rho)
    s = scores.detach().to("cpu", torch.float64).clamp_min(0)
    layers, batch, heads, n = s.shape
    if heads != num_kv_heads:  # GQA: a KV head's score is its query heads' mean
        s = s.reshape(layers, batch, num_kv_heads, heads // num_kv_heads, n).mean(dim=3)
    flat = s.reshape(-1).sort().values
    total = float(flat.sum())
    cum = flat.cumsum(0)
    count = flat.numel()

    def damage(rho: float) -> float:
        k = int(rho * count)
        mass = float(cum[k - 1]) / total if k > 0 and total > 0 else 0.0
        return 0.5 * (mass + rho)

    return damage


def quant_damage(bounds: tuple[float, float]) -> float:
    k, v = bounds
    return QUANT_WEIGHT * (k * k + v * v) / 12


# -- size model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SizeModel:
    """Predicted container bytes of one (bounds, block) candidate, from a trial encoding.

    ``k_token`` / ``v_token``: bytes per token slot in quantised blocks; ``tail_token``: bytes
    per token slot left in full precision (K and V together); ``layer_bytes``: fixed bytes per
    layer (empty sections, header entry); ``fixed``: the container's prefix and header.
    """

    settings: QuantSettings
    k_token: float
    v_token: float
    tail_token: float
    layer_bytes: float
    fixed: float
    index_bytes: float  # per kept slot (B * Hkv positions)

    def layer(self, kept: float, with_indices: bool = True, expected: bool = False) -> float:
        """Bytes of a layer keeping ``kept`` token slots; ``expected``: ``kept`` is a mean
        over layers, so the tail left out of whole blocks is its mean, ``(T - 1) / 2``."""
        s = self.settings
        t = s.block_tokens

        def in_blocks(window: int) -> float:
            if expected:  # the selection is trimmed to whole blocks: (t - 1) / 2 fewer slots
                if kept - window < t:
                    return 0.0
                return max(0.0, kept - window - (t - 1) / 2)
            return float(max(0, int(kept) - window) // t * t)

        kb, vb = in_blocks(s.k_window), in_blocks(s.v_window)
        if expected and kept >= t:  # trimmed: nothing past the windows is left over
            tail = float(min(kept, s.k_window) + min(kept, s.v_window))
            kept = kb + min(kept, s.k_window)
        else:
            tail = (kept - kb) + (kept - vb)
        blocks = (kb + vb) / t
        return (
            self.k_token * kb
            + self.v_token * vb
            + self.tail_token * tail / 2
            + BLOCK_RECORD_BYTES * blocks
            + self.layer_bytes
            + (self.index_bytes * kept if with_indices else 0.0)
        )

    def data(self, kept: int) -> float:
        """Section bytes (no header) of a layer keeping ``kept`` token slots."""
        s = self.settings
        kb = max(0, kept - s.k_window) // s.block_tokens * s.block_tokens
        vb = max(0, kept - s.v_window) // s.block_tokens * s.block_tokens
        tail = (kept - kb) + (kept - vb)
        return (
            self.k_token * kb
            + self.v_token * vb
            + self.tail_token * tail / 2
            + (self.index_bytes * kept)
        )

    def calibrated(self, factor: float) -> SizeModel:
        """This model with its per-token section bytes scaled by ``factor``."""
        return dataclasses.replace(
            self,
            k_token=self.k_token * factor,
            v_token=self.v_token * factor,
            tail_token=self.tail_token * factor,
            index_bytes=self.index_bytes * factor,
        )

    def total(self, kept: Sequence[int], with_indices: bool = True) -> float:
        """Predicted container bytes for layers keeping ``kept`` token slots each."""
        return self.fixed + sum(self.layer(b, with_indices) for b in kept)

    def mean_total(self, slots: int, layers: int, n: int, with_indices: bool = True) -> float:
        """Predicted bytes for ``slots`` token slots spread over ``layers`` (a smooth,
        non-increasing function of the ratio, for the search)."""
        per_layer = min(float(n), slots / layers)
        return self.fixed + layers * self.layer(per_layer, with_indices, expected=True)


def trial_model(
    k: torch.Tensor, v: torch.Tensor, settings: QuantSettings, num_layers: int, meta: dict[str, str]
) -> SizeModel:
    """The :class:`SizeModel` of ``settings`` from layer 0's ``k``, ``v`` ``[B, Hkv, n, d]``."""
    n = k.shape[2]
    stride = max(1, -(-n // TRIAL_TOKENS))
    ks, vs = k[:, :, ::stride].contiguous(), v[:, :, ::stride].contiguous()
    m = ks.shape[2]
    enc = codec.encode_layer(ks, vs, None, settings)
    t = settings.block_tokens

    def block_tokens(blocks: Sequence[Any]) -> int:
        # A v2 short last block records its own token count.
        return sum(t if b.tokens is None else b.tokens for b in blocks)

    def per_token(kind: str, blocks: Sequence[Any]) -> float | None:
        # Blocks and the stream's group metadata (v2 keeps it in one section per stream).
        return enc.stream_bytes(kind) / block_tokens(blocks) if blocks else None

    raw_token = 2 * k.shape[0] * k.shape[1] * k.shape[3] * k.element_size()  # K+V, uncompressed
    windowed = [
        (enc.k_window, m - block_tokens(enc.k_blocks)),
        (enc.v_window, m - block_tokens(enc.v_blocks)),
    ]
    tail_bytes = sum(len(sec.data) for sec, tokens in windowed if tokens > 0)
    tail_tokens = sum(tokens for _, tokens in windowed if tokens > 0)
    empty = sum(len(sec.data) for sec, tokens in windowed if tokens == 0)
    # Both streams of a token in the tail: twice the per-stream bytes; raw size when unmeasured.
    tail_token = 2 * tail_bytes / tail_tokens if tail_tokens else float(raw_token)
    k_token = per_token("k", enc.k_blocks)
    v_token = per_token("v", enc.v_blocks)
    half_raw = raw_token / 2
    one = len(codec.assemble([enc], settings, dtype=k.dtype, meta=meta, seq_len=n))
    two = len(codec.assemble([enc, enc], settings, dtype=k.dtype, meta=meta, seq_len=n))
    header_layer = (two - 2 * enc.nbytes) - (one - enc.nbytes)
    blocks = len(enc.k_blocks) + len(enc.v_blocks)
    return SizeModel(
        settings=settings,
        k_token=half_raw if k_token is None else k_token,
        v_token=half_raw if v_token is None else v_token,
        tail_token=tail_token,
        layer_bytes=max(0.0, header_layer - BLOCK_RECORD_BYTES * blocks) + empty,
        fixed=float(one - enc.nbytes - header_layer),
        index_bytes=INDEX_BYTES * k.shape[0] * k.shape[1],
    )


# -- the choice ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """One candidate: eviction ratio, settings, the token slots kept (uniform split over
    layers, for the prediction), predicted bytes and damage."""

    ratio: float
    settings: QuantSettings
    model: SizeModel
    predicted: float
    damage: float


def slots_for_ratio(ratio: float, layers: int, n: int) -> int:
    """Token slots kept at ``ratio`` (kvpress's compute_n_kept, as codec.budgets.Budget)."""
    return max(1, int(layers * n * (1 - ratio)))


def fit_ratio(
    model: SizeModel, goal: float, layers: int, n: int, most: float, evicts: bool
) -> tuple[float, float] | None:
    """The smallest ratio in ``[0, most]`` whose predicted size (uniform split) is at most
    ``goal``, with that size; None when even ``most`` is predicted over it."""

    def size(ratio: float) -> float:
        if ratio == 0.0:
            return model.total([n] * layers, evicts)
        return model.mean_total(slots_for_ratio(ratio, layers, n), layers, n, evicts)

    if size(0.0) <= goal:
        return 0.0, size(0.0)
    if not evicts or size(most) > goal:
        return None
    lo, hi = 0.0, most  # size(lo) > goal >= size(hi); the size never grows with the ratio
    for _ in range(40):
        mid = (lo + hi) / 2
        if size(mid) <= goal:
            hi = mid
        else:
            lo = mid
    return hi, size(hi)


def choose(
    models: Sequence[SizeModel],
    budget: int,
    layers: int,
    n: int,
    most: float,
    evicts: bool,
    damage: Callable[[float], float],
) -> Choice | None:
    """The candidate of least estimated damage predicted within ``budget * (1 - MARGIN)``
    (ties: the smaller prediction); None when none is."""
    goal = budget * (1 - MARGIN)
    best: Choice | None = None
    for model in models:
        fit = fit_ratio(model, goal, layers, n, most, evicts)
        if fit is None:
            continue
        ratio, predicted = fit
        s = model.settings
        d = damage(ratio) + (1 - ratio) * quant_damage((s.k_error_bound, s.v_error_bound))
        if best is None or (d, predicted) < (best.damage, best.predicted):
            best = Choice(ratio, s, model, predicted, d)
    return best


def coarsest(models: Sequence[SizeModel]) -> SizeModel:
    """The candidate with the smallest predicted size per kept token (the fallback)."""
    return min(models, key=lambda m: m.layer(1024, expected=True))


def total_damage(ratio: float, settings: QuantSettings, damage: Callable[[float], float]) -> float:
    return damage(ratio) + (1 - ratio) * quant_damage(
        (settings.k_error_bound, settings.v_error_bound)
    )


def whole_blocks(kept: int, settings: QuantSettings, fewest: int) -> int:
    """The tokens a layer keeps once trimmed to whole quantisation blocks past its window:
    the tokens a block does not take stay in full precision (8-16x the bytes of a quantised
    one), so budget mode evicts them instead. Unchanged when the K and V windows differ or no
    whole block fits; never below ``fewest``."""
    t, w = settings.block_tokens, settings.k_window
    if settings.k_window != settings.v_window or kept - w < t:
        return kept
    return max(min(fewest, kept), w + (kept - w) // t * t)


def nearest_blocks(kept: int, settings: QuantSettings, fewest: int, n: int) -> int:
    """The whole-block count nearest ``kept`` (past the window; ties down, at most ``n``, at
    least ``fewest``): the plan's per-layer count, so that no token is left in full precision
    without evicting more than half a block to get there. Unchanged when the K and V windows
    differ or less than half a block is past the window."""
    t, w = settings.block_tokens, settings.k_window
    if settings.k_window != settings.v_window or 2 * (kept - w) < t:
        return kept
    down = w + (kept - w) // t * t
    up = down + t
    best = up if up <= n and (up - kept) < (kept - down) else down
    return max(min(fewest, kept), best)


def subset_slots(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor | None:
    """Where each kept position of ``new`` sits in ``old`` (both ``[B, Hkv, b]`` ascending
    kept positions, -1 padded): ``[B, Hkv, b_new]`` composite slots, or None when ``new`` keeps
    a position ``old`` does not (or has padding)."""
    if bool((new < 0).any()):
        return None
    big = old.masked_fill(old < 0, torch.iinfo(torch.int64).max).contiguous()
    pos = torch.searchsorted(big, new.contiguous()).clamp_max(old.shape[-1] - 1)
    if not bool((old.gather(-1, pos) == new).all()):
        return None
    return pos


def shrink_indices(indices: torch.Tensor, keep: int, scores: torch.Tensor | None) -> torch.Tensor:
    """Positions into a layer's composite ``[B, Hkv, b]`` (kept positions, ascending, -1 pad)
    that keep ``keep`` of them per head: the highest-scored (``scores`` ``[B, Hkv, n]`` per KV
    head), else the most recent. Returns ``[B, Hkv, keep]`` int64 composite slots, ascending."""
    b = indices.shape[-1]
    keep = max(1, min(keep, b))
    pos = indices.clamp_min(0)
    if scores is not None:
        rank = scores.to(indices.device).gather(-1, pos).to(torch.float64)
    else:
        rank = pos.to(torch.float64)
    rank = rank.masked_fill(indices < 0, -math.inf)
    slots = rank.sort(dim=-1, descending=True, stable=True).indices[..., :keep]
    return slots.sort(dim=-1).values
