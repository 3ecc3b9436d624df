"""Token budgets: how many entries survive in total, and how a total splits across layers.

Counts are "token slots per sequence": a structured layer that keeps `b` tokens in every KV head
uses `b` slots. Unstructured policies count per (layer, head) entries, `Hkv` per slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Budget:
    """The requested size of the compressed cache: exactly one of `ratio` and `n_keep`.

    ratio: fraction of entries removed, 0 <= ratio < 1 (kvpress's compression_ratio).
    n_keep: token slots per sequence summed over layers, 1 <= n_keep <= L * n.
    """

    layers: int
    n: int
    ratio: float | None = None
    n_keep: int | None = None

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.n_keep is None):
            raise ValueError("pass exactly one of ratio and n_keep")
        if self.ratio is not None:
            r = self.ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or math.isnan(r):
                raise ValueError(f"ratio must be a number, got {r!r}")
            if not 0 <= r < 1:
                raise ValueError(f"ratio is the fraction removed and must be in [0, 1), got {r}")
        if self.n_keep is not None:
            k = self.n_keep
            if isinstance(k, bool) or not isinstance(k, int):
                raise ValueError(f"n_keep must be an integer, got {k!r}")
            if not 1 <= k <= self.layers * self.n:
                raise ValueError(
                    f"n_keep must be in [1, L*n = {self.layers * self.n}] token slots, got {k}"
                )

    def entries(self, per_slot: int = 1) -> int:
        """Total entries kept when each token slot holds `per_slot` entries.

        With a ratio this is kvpress's compute_n_kept over L * n * per_slot entries:
        max(1, floor(count * (1 - ratio))), evaluated in the same float arithmetic.
        """
        if self.n_keep is not None:
            return self.n_keep * per_slot
        assert self.ratio is not None
        return max(1, int(self.layers * self.n * per_slot * (1 - self.ratio)))


def uniform_split(total: int, layers: int) -> list[int]:
    """Split `total` slots over `layers` as evenly as possible; earlier layers take the remainder.

    The result sums to `total` exactly.
    """
    base, extra = divmod(total, layers)
    return [base + (1 if i < extra else 0) for i in range(layers)]


def pyramid_split(total: int, layers: int, n: int, beta: float) -> list[int]:
    """Linearly decreasing per-layer budgets (PyramidKV) that sum to `total` exactly.

    With mean a = total / layers the pyramid runs from hi = 2a - a/beta (layer 0) down to
    lo = a/beta (last layer); when hi would exceed n it is capped at n and lo = 2a - n. Real
    budgets are rounded by largest remainder (ties to the lower layer) so the sum is exact and
    every budget stays within [0, n].
    """
    if layers == 1:
        return [total]
    a = total / layers
    lo = a / beta
    hi = 2 * a - lo
    if hi > n:
        hi, lo = float(n), 2 * a - n
    step = (hi - lo) / (layers - 1)
    real = [hi - i * step for i in range(layers)]
    floors = [min(n, max(0, math.floor(x))) for x in real]
    short = total - sum(floors)
    by_remainder = sorted(range(layers), key=lambda i: (-(real[i] - floors[i]), i))
    for i in by_remainder:
        if short <= 0:
            break
        if floors[i] < n:
            floors[i] += 1
            short -= 1
    return floors


def top_counts(flat: torch.Tensor, total: int, n: int) -> torch.Tensor:
    """Exact top-k allocation: how many of each row's `total` largest entries fall in each
    consecutive block of `n` (a layer, or a (layer, head) pair).

    flat: [B, blocks * n] scores. Equal values go to the lower index, so a lower block wins a
    tie. Returns [B, blocks] int64; every row sums to `total` exactly.
    """
    chosen = flat.sort(dim=-1, descending=True, stable=True).indices[:, :total]
    blocks = flat.shape[1] // n
    counts = torch.zeros(flat.shape[0], blocks, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(1, chosen // n, torch.ones_like(chosen))
