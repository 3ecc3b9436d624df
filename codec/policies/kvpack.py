"""kvpack's own policy (docs/ALGORITHMS.md §1.6): KVCompose's structure with pooled scores and
budgets that cannot starve a layer.

Like KVCompose, every KV head ranks its own positions and every layer keeps the same number of
tokens in each head, so each layer is one dense tensor [B, Hkv, b_l, d]. It differs in three
places, each measured in docs/QUALITY.md:

1. scores are max-pooled over neighbouring positions (SnapKV's kernel) before ranking, so the
   tokens next to a position the statistics found (the rest of a needle, of a word, of a value)
   are kept with it;
2. no layer can be starved: by default every layer keeps the same number of tokens (measured
   best on the reference model); with allocation="mass" or "scores" each layer keeps at least
   `floor` times its uniform share and only the rest is allocated across layers, by each
   layer's normalised attention mass or by KVCompose's raw composite scores;
3. the first `n_sink` positions and the last `window_size` are always kept.

Ties: per head the lower position wins; across layers the lower layer, then the better rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvpack.codec.budgets import top_counts, uniform_split
from kvpack.codec.policies.base import EvictionInput, Policy, positions_from_order
from kvpack.codec.policy_settings import Extent, PolicySettings, Range, slots

# Widest pooling kernel: pooling costs O(n * kernel_size) per head (as SnapKV's bound).
MAX_KERNEL_SIZE = 63
# Added to the scores of the ranks every layer keeps anyway (its floor), above any weight.
_FLOOR_BONUS = 1e9
ALLOCATIONS = ("mass", "uniform", "scores")


@dataclass(frozen=True)
class KVPackSettings(PolicySettings):
    """Settings of the kvpack policy.

    kernel_size: odd width of the pooling over positions, 1 (none) .. min(seq_len, 63).
    pooling: "max" (a position scores as its best neighbour) or "avg".
    agg_group: GQA group reduction ("mean" or "max"). add_mean_across_heads: add the mean over
    KV heads of a position's score to each head's (KVCompose's stabilisation).
    allocation: how the budget reaches the layers: "uniform" (evenly, the default), "mass"
    (floors, then the rest by each layer's normalised composite scores) or "scores" (floors,
    then the rest by KVCompose's raw composite scores across layers). floor: with "mass" or
    "scores", every layer keeps at least floor x its uniform share of the budget, 0..1 (1:
    uniform).
    n_sink: first positions always kept; window_size: last positions always kept; each at most
    the token slots a layer keeps on average.
    """

    kernel_size: int = 3
    pooling: str = "max"
    agg_group: str = "mean"
    add_mean_across_heads: bool = True
    allocation: str = "uniform"
    floor: float = 0.5
    n_sink: int = 4
    window_size: int = 0

    choices: ClassVar = {
        "pooling": ("max", "avg"),
        "agg_group": ("max", "mean"),
        "allocation": ALLOCATIONS,
    }

    @classmethod
    def ranges(cls, extent: Extent) -> dict[str, Range]:
        # The kernel is bounded by the sequence and MAX_KERNEL_SIZE so pooling stays a small
        # multiple of the scores received; protected positions are paid from every layer's
        # budget, so they are bounded by what a layer keeps on average.
        widest = min(extent.seq_len, MAX_KERNEL_SIZE)
        widest -= 1 - widest % 2  # the largest odd width
        kernel = Range(1, widest, f"odd, at most {MAX_KERNEL_SIZE} and seq_len={extent.seq_len}")
        return {
            "kernel_size": kernel,
            "floor": Range(0.0, 1.0, "a fraction of the uniform share"),
            "n_sink": slots(extent),
            "window_size": slots(extent),
        }

    def validate(self) -> None:
        if self.kernel_size % 2 == 0:
            raise ValueError(f"setting 'kernel_size' must be odd, got {self.kernel_size}")


class KVPack(Policy):
    """Pooled per-head ranking, composite tokens, floored allocation, protected sinks/window."""

    name = "kvpack"
    settings_type = KVPackSettings
    settings: KVPackSettings

    @property
    def agg_group(self) -> str:
        return self.settings.agg_group

    def score(self, inp: EvictionInput) -> torch.Tensor:
        """GQA reduction, pooling over positions, head-mean stabilisation: [L, B, Hkv, n]
        float32 (protected positions not raised yet)."""
        s = inp.kv_scores(self.agg_group)
        k = min(self.settings.kernel_size, 2 * ((inp.n - 1) // 2) + 1)
        if k > 1:
            flat = s.reshape(-1, 1, inp.n)
            if self.settings.pooling == "max":
                flat = F.max_pool1d(flat, k, stride=1, padding=k // 2)
            else:
                # Edges average over the positions that exist, not over zero padding.
                flat = F.avg_pool1d(flat, k, stride=1, padding=k // 2, count_include_pad=False)
            s = flat.reshape(s.shape)
        if self.settings.add_mean_across_heads:
            s = s + s.mean(dim=2, keepdim=True)
        return s

    def keep(self, inp: EvictionInput) -> list[torch.Tensor]:
        s = self.score(inp)
        if self.uniform:
            # Budgets known before ranking: a partial top-k per layer, not a full sort.
            split = uniform_split(inp.budget.entries(), inp.layers)
            protected = self.protect(s, inp.n)
            return [
                top_positions(protected[layer], min(inp.n, max(1, b)))
                for layer, b in enumerate(split)
            ]
        # One sort serves both the ranking and the allocation: protected positions are +inf,
        # so they take the first `protected` ranks of every head.
        ranked, order = self.protect(s, inp.n).sort(dim=-1, descending=True, stable=True)
        per_layer = self.layer_counts(ranked, inp)
        counts = per_layer.unsqueeze(-1).expand(-1, -1, inp.num_kv_heads)
        return positions_from_order(order, counts)

    @property
    def uniform(self) -> bool:
        """Whether every layer keeps the same share (allocation "uniform", or a floor of 1)."""
        return self.settings.allocation == "uniform" or self.settings.floor >= 1

    def protected(self, n: int) -> int:
        """How many positions of an n-token sequence are always kept (sinks and window)."""
        return min(n, min(self.settings.n_sink, n) + min(self.settings.window_size, n))

    def protect(self, s: torch.Tensor, n: int) -> torch.Tensor:
        """s [..., n] with the sinks and the window raised to +inf, above every score."""
        sinks, window = min(self.settings.n_sink, n), min(self.settings.window_size, n)
        if not sinks and not window:
            return s
        s = s.clone()
        # The stable sort ranks equal +inf by position: the sinks (earliest first) before the
        # window, so a budget smaller than what is protected keeps the first sinks.
        if window:
            s[..., n - window :] = torch.inf
        if sinks:
            s[..., :sinks] = torch.inf
        return s

    def floor_slots(self, inp: EvictionInput) -> int:
        """Slots every layer keeps before any allocation: floor x the uniform share, at least 1
        and at most n (the floor of 1 every policy has)."""
        share = inp.budget.entries() / inp.layers
        return min(inp.n, max(1, math.floor(self.settings.floor * share)))

    def layer_counts(self, ranked: torch.Tensor, inp: EvictionInput) -> torch.Tensor:
        """Slots per layer and batch row, [L, B] int64, summing to the budget (to L when the
        budget is smaller than one slot per layer).

        ranked: [L, B, Hkv, n] each head's protected scores sorted descending (the protected
        positions first, +inf). Every layer keeps max(floor_slots, protected) ranks; the rest of
        the budget goes to the best composite ranks of all layers: by the ranks' share of their
        layer's unprotected composite mass ("mass") or by their raw composite score ("scores").
        """
        total = inp.budget.entries()
        if self.uniform:
            split = torch.tensor(uniform_split(total, inp.layers), device=ranked.device)
            return split.clamp(min=1, max=inp.n).view(-1, 1).expand(-1, inp.batch).contiguous()
        protected = self.protected(inp.n)
        c = ranked.mean(dim=2)  # composite token scores [L, B, n], non-increasing along n
        c[..., :protected] = 0.0  # kept anyway (below); their +inf must not enter the mass
        if self.settings.allocation == "mass":
            # A rank's weight is the share of its layer's attention it adds: comparable across
            # layers whatever their scale, and an attention sink's mass is left out.
            c = c.clamp(min=0)
            c = c / c.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(c.dtype).tiny)
        # Protected ranks join the floor as far as an even split of the budget pays for them.
        floor = max(self.floor_slots(inp), min(protected, total // inp.layers))
        c[..., :floor] += _FLOOR_BONUS
        counts = top_counts(c.transpose(0, 1).reshape(inp.batch, -1), total, inp.n)
        return counts.transpose(0, 1).clamp(min=1, max=inp.n)

    def layer_budgets(self, inp: EvictionInput) -> list[int]:
        """Per-layer shares when layers are selected one at a time: uniform (the adaptive part
        of the allocation needs every layer's scores)."""
        return uniform_split(inp.budget.entries(), inp.layers)


def top_positions(s: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` best positions of every row of s [..., n], ascending: what a stable
    descending sort keeps (among equal scores the lower position), from a partial top-k.

    s must hold no NaN (+inf is fine). Returns [..., count] int64.
    """
    threshold = s.topk(count, dim=-1).values[..., -1:]  # each row's count-th best score
    above = s > threshold
    tied = s == threshold
    # Of the positions tied at the threshold, the lowest fill what `above` leaves.
    missing = count - above.sum(dim=-1, keepdim=True)
    keep = above | (tied & (tied.cumsum(dim=-1) <= missing))
    return keep.nonzero()[:, -1].view(*s.shape[:-1], count)
