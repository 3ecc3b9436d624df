"""Baseline eviction policies under the KVCompose interface (for comparison).

Each ranks positions per head and keeps a per-layer budget (uniform unless stated) in every
head; ties keep the lower position. Positions a method always keeps (sinks, the observation
window, the last token) are ranked above every scored position with +inf.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvpack.codec.budgets import pyramid_split
from kvpack.codec.policies.base import EvictionInput, Policy
from kvpack.codec.policy_settings import Extent, PolicySettings, Range, positions, slots
from kvpack.codec.stats import reduce_gqa

# Widest SnapKV / PyramidKV pooling kernel (their papers and kvpress use 5 to 13).
MAX_KERNEL_SIZE = 63
# Steepest PyramidKV pyramid (see PyramidKVSettings.ranges).
MAX_BETA = float(1 << 24)


def _protect_last(scores: torch.Tensor, count: int) -> torch.Tensor:
    """scores [..., n] with the last `count` positions raised to +inf."""
    if count == 0:
        return scores
    scores = scores.clone()
    scores[..., -count:] = torch.inf
    return scores


@dataclass(frozen=True)
class StreamingSettings(PolicySettings):
    """n_sink: leading attention-sink positions always kept (StreamingLLM uses 4), 0..seq_len."""

    n_sink: int = 4

    @classmethod
    def ranges(cls, extent: Extent) -> dict[str, Range]:
        # More sinks than tokens keep every token: nothing a caller can mean.
        return {"n_sink": positions(extent)}


class Streaming(Policy):
    """StreamingLLM: the first `n_sink` positions plus the most recent ones; no scores needed.

    With a budget b < n_sink a layer keeps the first b positions.
    """

    name = "streaming"
    settings_type = StreamingSettings
    settings: StreamingSettings

    @property
    def needs_scores(self) -> bool:
        return False

    def score(self, inp: EvictionInput) -> torch.Tensor:
        pos = torch.arange(inp.n, device=inp.device, dtype=torch.float32)
        # Sinks above every recent position (earliest sink first), then newest first.
        s = torch.where(pos < self.settings.n_sink, 2.0 * inp.n - pos, pos)
        return s.expand(inp.layers, inp.batch, inp.num_kv_heads, inp.n)


@dataclass(frozen=True)
class SnapKVSettings(PolicySettings):
    """kernel_size: odd pooling width over positions, 1..min(seq_len, MAX_KERNEL_SIZE);
    pooling: "max" (SnapKV paper) or "avg" (kvpress); window_size: last positions always kept
    (the observation window), 0 for none, at most the token slots a layer keeps on average.
    """

    kernel_size: int = 5
    pooling: str = "max"
    window_size: int = 0

    choices: ClassVar = {"pooling": ("max", "avg")}

    @classmethod
    def ranges(cls, extent: Extent) -> dict[str, Range]:
        # Pooling costs O(n * kernel_size) per head (torch pools naively), so the kernel is
        # bounded by the sequence and by MAX_KERNEL_SIZE: the work stays a small multiple of the
        # scores received. The observation window is kept in every layer: the budget pays for it.
        widest = min(extent.seq_len, MAX_KERNEL_SIZE)
        widest -= 1 - widest % 2  # the largest odd width
        kernel = Range(1, widest, f"odd, at most {MAX_KERNEL_SIZE} and seq_len={extent.seq_len}")
        return {"kernel_size": kernel, "window_size": slots(extent)}

    def validate(self) -> None:
        if self.kernel_size % 2 == 0:
            raise ValueError(f"setting 'kernel_size' must be odd, got {self.kernel_size}")


class SnapKV(Policy):
    """SnapKV: window-attention scores pooled over positions, GQA-averaged, top-k per head.

    Expects scores from `scores_from_window` (query heads or KV heads); budget uniform per layer.
    """

    name = "snapkv"
    settings_type: ClassVar[type[PolicySettings]] = SnapKVSettings
    settings: SnapKVSettings

    def score(self, inp: EvictionInput) -> torch.Tensor:
        assert inp.scores is not None
        shape = inp.scores.shape
        k = self.settings.kernel_size
        flat = inp.scores.reshape(-1, 1, inp.n)
        if self.settings.pooling == "max":
            pooled = F.max_pool1d(flat, k, stride=1, padding=k // 2)
        else:
            pooled = F.avg_pool1d(flat, k, stride=1, padding=k // 2)
        # Pool per query head before the group mean, as SnapKV does.
        s = reduce_gqa(pooled.reshape(shape), inp.num_kv_heads, self.agg_group)
        return _protect_last(s, min(self.settings.window_size, inp.n))


@dataclass(frozen=True)
class PyramidKVSettings(SnapKVSettings):
    """SnapKV's settings plus beta: pyramid steepness, last layer gets mean budget / beta
    (finite, 1..MAX_BETA)."""

    beta: float = 20.0

    @classmethod
    def ranges(cls, extent: Extent) -> dict[str, Range]:
        # Finite: NaN or inf would reach pyramid_split's floor(). Past MAX_BETA the last layer's
        # share (mean / beta) is below one slot for any budget a container holds.
        return {**super().ranges(extent), "beta": Range(1, MAX_BETA)}


class PyramidKV(SnapKV):
    """PyramidKV: SnapKV scores with linearly decreasing per-layer budgets summing to the total."""

    name = "pyramidkv"
    settings_type = PyramidKVSettings
    settings: PyramidKVSettings

    def layer_budgets(self, inp: EvictionInput) -> list[int]:
        return pyramid_split(inp.budget.entries(), inp.layers, inp.n, self.settings.beta)


@dataclass(frozen=True)
class NoSettings(PolicySettings):
    """The policy has no settings."""


class TOVA(Policy):
    """TOVA: attention of the last query averaged over all heads; every head keeps the same
    positions, and the last position is always kept (as kvpress does).

    Expects scores from `scores_from_window` with W = 1 (or the last query's attention row).
    """

    name = "tova"
    settings_type = NoSettings

    def score(self, inp: EvictionInput) -> torch.Tensor:
        assert inp.scores is not None
        s = inp.scores.mean(dim=2, keepdim=True)
        s = s.expand(inp.layers, inp.batch, inp.num_kv_heads, inp.n)
        return _protect_last(s, 1)


class KNorm(Policy):
    """Key norm (kvpress KnormPress): keys with the lowest L2 norm are kept; needs keys only."""

    name = "knorm"
    settings_type = NoSettings

    @property
    def needs_scores(self) -> bool:
        return False

    @property
    def needs_keys(self) -> bool:
        return True

    def score(self, inp: EvictionInput) -> torch.Tensor:
        assert inp.keys is not None
        return -torch.stack([k.norm(dim=-1) for k in inp.keys]).float()


@dataclass(frozen=True)
class RandomSettings(PolicySettings):
    """seed: the draw depends only on (seed, L, Hkv, n), so every batch row keeps the same;
    0..2^64-1."""

    seed: int = 0

    @classmethod
    def ranges(cls, extent: Extent) -> dict[str, Range]:
        # What torch.Generator.manual_seed takes (it maps negative seeds onto this range).
        return {"seed": Range(0, 2**64 - 1)}


class Random(Policy):
    """Uniformly random positions per head; draws on the CPU so every device keeps the same."""

    name = "random"
    settings_type = RandomSettings
    settings: RandomSettings

    @property
    def needs_scores(self) -> bool:
        return False

    def score(self, inp: EvictionInput) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.settings.seed)
        s = torch.rand((inp.layers, 1, inp.num_kv_heads, inp.n), generator=gen)
        return s.to(inp.device).expand(inp.layers, inp.batch, inp.num_kv_heads, inp.n)
