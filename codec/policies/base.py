"""The eviction-policy interface and the selection machinery every policy shares.

A policy turns validated statistics (`EvictionInput`) into kept positions. Score-based policies
(the kvpress ScorerPress pattern) override `score` and optionally `layer_budgets`; KVCompose
overrides `keep` because its budgets come from the scores themselves.

Tie break, everywhere: among equal scores the lower position is kept (stable descending sort).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpack.codec.budgets import Budget, uniform_split
from kvpack.codec.policy_settings import PolicySettings
from kvpack.codec.stats import reduce_gqa


@dataclass(frozen=True)
class EvictionInput:
    """Validated inputs of one selection.

    scores: [L, B, H, n] float32, finite, H query heads or KV heads (None for policies that need
    no statistics); keys / values: L tensors [B, Hkv, n, d] or None; budget: the requested size.
    """

    layers: int
    batch: int
    num_kv_heads: int
    n: int
    device: torch.device
    budget: Budget
    scores: torch.Tensor | None = None
    keys: Sequence[torch.Tensor] | None = None
    values: Sequence[torch.Tensor] | None = None

    def kv_scores(self, agg_group: str) -> torch.Tensor:
        """Scores per KV head, [L, B, Hkv, n] float32 (GQA groups reduced by `agg_group`)."""
        assert self.scores is not None
        if self.scores.shape[2] == self.num_kv_heads:
            return self.scores
        return reduce_gqa(self.scores, self.num_kv_heads, agg_group)


def positions_from_order(order: torch.Tensor, counts: torch.Tensor) -> list[torch.Tensor]:
    """Kept positions per layer from a per-head ranking and per-head counts.

    order: [L, B, Hkv, n] int64, each head's positions best first; counts: [L, B, Hkv] int64, how
    many of the best to keep. Returns L tensors [B, Hkv, max count of the layer] int64: each
    head's kept positions ascending, then -1 padding up to the layer's widest head.
    """
    n = order.shape[-1]
    widths = counts.amax(dim=(1, 2)).tolist()
    out = []
    for layer, width in enumerate(widths):
        top = order[layer, :, :, :width]
        slot = torch.arange(width, device=order.device)
        unused = slot >= counts[layer].unsqueeze(-1)
        # Padding sorts last as n, then becomes -1.
        top = top.masked_fill(unused, n).sort(dim=-1).values
        out.append(top.masked_fill(top == n, -1))
    return out


def rank(scores: torch.Tensor) -> torch.Tensor:
    """Positions of each head best first, [..., n] int64; equal scores keep the lower position."""
    return scores.sort(dim=-1, descending=True, stable=True).indices


class Policy:
    """One eviction method. Subclasses set `name`, `settings_type` and the `needs_*` properties.

    The default `keep` ranks `score(inp)` per head and keeps each layer's `layer_budgets(inp)`
    best positions in every head of every batch row.
    """

    name: ClassVar[str]
    settings_type: ClassVar[type[PolicySettings]] = PolicySettings

    def __init__(self, settings: PolicySettings | None = None) -> None:
        self.settings = self.settings_type() if settings is None else settings
        if not isinstance(self.settings, self.settings_type):
            raise ValueError(f"{self.name} takes {self.settings_type.__name__}")

    @property
    def needs_scores(self) -> bool:
        """Whether `select` must be given attention scores."""
        return True

    @property
    def needs_keys(self) -> bool:
        """Whether `select` must be given the keys."""
        return False

    @property
    def needs_values(self) -> bool:
        """Whether `select` must be given the values."""
        return False

    @property
    def agg_group(self) -> str:
        """How query-head scores of one GQA group combine ("mean" or "max")."""
        return "mean"

    def score(self, inp: EvictionInput) -> torch.Tensor:
        """Importance of every position: [L, B, Hkv, n] float32, higher is kept first."""
        raise NotImplementedError

    def layer_budgets(self, inp: EvictionInput) -> list[int]:
        """Token slots per layer, L ints summing to the budget (before the floor of 1)."""
        return uniform_split(inp.budget.entries(), inp.layers)

    def keep(self, inp: EvictionInput) -> list[torch.Tensor]:
        """Kept positions: L tensors [B, Hkv, b_l] int64, ascending per head (-1 padded)."""
        scores = self.score(inp)
        budgets = torch.tensor(self.layer_budgets(inp), device=inp.device).clamp(min=1, max=inp.n)
        counts = budgets.view(-1, 1, 1).expand(inp.layers, inp.batch, inp.num_kv_heads)
        return positions_from_order(rank(scores), counts)
