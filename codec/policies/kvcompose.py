"""KVCompose (docs/ALGORITHMS.md §1): structured eviction with composite tokens and global budgets.

Selects the same tokens as kvpress's KVComposePress given the same statistics and settings.
Where kvpress leaves ties to torch's unstable sorts, kvpack breaks them deterministically:
per head the lower position wins; in the global allocation the lower layer (then the better
rank) wins; in the unstructured allocation the lower (layer, head, rank) wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpack.codec.budgets import top_counts, uniform_split
from kvpack.codec.policies.base import EvictionInput, Policy, positions_from_order
from kvpack.codec.policy_settings import Extent, PolicySettings, Range, slots

# kvpress's floor bonus; large enough to outrank any attention-derived score.
FLOOR_BONUS = 1e9


@dataclass(frozen=True)
class KVComposeSettings(PolicySettings):
    """KVComposePress's settings, same names and defaults.

    agg_task: how task queries were reduced ("max"/"mean"); recorded for the caller that builds
    scores with `scores_from_attention(agg=agg_task)`, as select receives reduced scores.
    agg_group: GQA group reduction. agg_head: composite score over heads. add_v_norm: weight
    scores by ||V||_2. add_mean_across_heads: add the head-mean score. keep_token_lower_bound:
    minimum slots per layer (a request's layout bounds it by the slots a layer keeps on average;
    select() alone caps it at n, as kvpress does). structured: composite (uniform-per-layer)
    layout or per-head budgets.
    """

    agg_task: str = "max"
    agg_group: str = "mean"
    agg_head: str = "mean"
    add_v_norm: bool = False
    add_mean_across_heads: bool = True
    keep_token_lower_bound: int = 0
    structured: bool = True

    choices: ClassVar = {
        "agg_task": ("max", "mean"),
        "agg_group": ("max", "mean"),
        "agg_head": ("max", "mean"),
    }

    @classmethod
    def ranges(cls, extent: Extent) -> dict[str, Range]:
        # A floor above the budget would keep more than was asked for in every layer.
        return {"keep_token_lower_bound": slots(extent)}


class KVCompose(Policy):
    """KVCompose: per-head ranking, composite tokens, exact top-N allocation across layers."""

    name = "kvcompose"
    settings_type = KVComposeSettings
    settings: KVComposeSettings

    @property
    def needs_values(self) -> bool:
        return self.settings.add_v_norm

    @property
    def agg_group(self) -> str:
        return self.settings.agg_group

    def score(self, inp: EvictionInput) -> torch.Tensor:
        """Steps 3-5: GQA reduction, optional ||V|| weighting, head-mean stabilisation.

        Returns [L, B, Hkv, n] float32.
        """
        s = inp.kv_scores(self.agg_group)
        if self.settings.add_v_norm:
            assert inp.values is not None
            # kvpress takes the norm in the cache's dtype, then multiplies float32 scores.
            s = s * torch.stack([v.norm(dim=-1) for v in inp.values]).float()
        if self.settings.add_mean_across_heads:
            s = s + s.mean(dim=2, keepdim=True)
        return s

    def keep(self, inp: EvictionInput) -> list[torch.Tensor]:
        s = self.score(inp)
        ranked, order = s.sort(dim=-1, descending=True, stable=True)
        if self.settings.structured:
            per_layer = self.layer_counts(ranked, inp)
            counts = per_layer.unsqueeze(-1).expand(-1, -1, inp.num_kv_heads)
        else:
            counts = self.head_counts(ranked, inp)
        return positions_from_order(order, counts)

    def composite_scores(self, ranked: torch.Tensor) -> torch.Tensor:
        """Steps 6-7: composite token scores with floor bonus and layer-0 envelope.

        ranked: [L, B, Hkv, n] each head's scores sorted descending. Returns [L, B, n] float32,
        non-increasing along n.
        """
        if self.settings.agg_head == "mean":
            # Sum then divide, as kvpress's running mean does.
            c = ranked.sum(dim=2) / ranked.shape[2]
        else:
            c = ranked.amax(dim=2)
        c = self._add_floor(c)
        return torch.cat([c.amax(dim=0, keepdim=True), c[1:]])

    def layer_counts(self, ranked: torch.Tensor, inp: EvictionInput) -> torch.Tensor:
        """Step 8: slots per layer and batch row, [L, B] int64, from the exact global top-N."""
        c = self.composite_scores(ranked)
        total = inp.budget.entries()
        counts = top_counts(c.transpose(0, 1).reshape(inp.batch, -1), total, inp.n)
        floor = max(1, self.settings.keep_token_lower_bound)
        return counts.transpose(0, 1).clamp(min=floor, max=inp.n)

    def head_counts(self, ranked: torch.Tensor, inp: EvictionInput) -> torch.Tensor:
        """Step 11 (unstructured): entries per (layer, row, head), [L, B, Hkv] int64.

        kvpress applies no floor here, so a head may keep nothing.
        """
        per_head = self._add_floor(ranked)
        flat = per_head.transpose(0, 1).reshape(inp.batch, -1)
        total = inp.budget.entries(per_slot=inp.num_kv_heads)
        counts = top_counts(flat, total, inp.n)
        return counts.view(inp.batch, inp.layers, inp.num_kv_heads).transpose(0, 1)

    def _add_floor(self, c: torch.Tensor) -> torch.Tensor:
        floor = self.settings.keep_token_lower_bound
        if floor == 0:
            return c
        bonus = torch.zeros(c.shape[-1], dtype=c.dtype, device=c.device)
        bonus[:floor] = FLOOR_BONUS
        return c + bonus


@dataclass(frozen=True)
class KVComposeUnstructuredSettings(KVComposeSettings):
    """KVComposeSettings with per-head budgets by default."""

    structured: bool = False


class KVComposeUnstructured(KVCompose):
    """KVCompose with per-head budgets (structured=False by default); output is -1 padded."""

    name = "kvcompose_unstructured"
    settings_type = KVComposeUnstructuredSettings


class KVComposeUniform(KVCompose):
    """KVCompose's per-head selection with an equal budget per layer (no global allocation)."""

    name = "kvcompose_uniform"

    def keep(self, inp: EvictionInput) -> list[torch.Tensor]:
        return Policy.keep(self, inp)

    def layer_budgets(self, inp: EvictionInput) -> list[int]:
        floor = max(1, self.settings.keep_token_lower_bound)
        return [max(floor, b) for b in uniform_split(inp.budget.entries(), inp.layers)]
