"""StreamSpec: what one stream (a layer's K or its V) is encoded with, described once.

K and V differ in grouping, error bound and window; everything that follows from those (level
count, symbol width, groups per block) is computed here once per stream instead of being
re-derived per block from QuantSettings and a "k"/"v" string.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # quant_settings imports quant, which imports this module
    from kvpack.codec.quant_settings import QuantSettings

KINDS = ("k", "v")


def levels(eb: float) -> int:
    """Number of quantisation levels for relative error bound eb: ceil(1/eb) + 1 (21 at 0.05)."""
    # The 1e-9 keeps 1/0.05 == 20.000000000000004-style float noise from adding a level.
    return math.ceil(1.0 / eb - 1e-9) + 1


def fixed_bits(n_levels: int) -> int:
    """Bits per value of the fixed-width baseline: ceil(log2(levels)), at least 1."""
    return max(1, math.ceil(math.log2(n_levels)))


def group_shape(grouping: str, shape: tuple[int, ...], block_tokens: int) -> tuple[int, int]:
    """(groups per block G, values per group m) for blocks of x [B, H, n, d]: "v" = per token
    (B*H*T, d); "channel" = per key channel (B*H*d, T); "block" = per batch row (B, H*T*d)."""
    b, h, _, d = shape
    if grouping == "v":
        return b * h * block_tokens, d
    if grouping == "channel":
        return b * h * d, block_tokens
    return b, h * block_tokens * d


@dataclass(frozen=True)
class StreamSpec:
    """One stream's encoding: kind "k" or "v"; mode ("lossy", "fixed", "lossless"); grouping
    ("channel"/"block" for K, "v" for V, see group_shape); relative error bound and its level
    count; full-precision window and block length in tokens; entropy coder choice."""

    kind: str
    mode: str
    grouping: str
    error_bound: float
    levels: int
    window: int
    block_tokens: int
    entropy: str

    @staticmethod
    def of(kind: str, settings: QuantSettings) -> StreamSpec:
        """The spec of stream `kind` ("k" or "v") under `settings` (cached: settings are
        frozen, so every layer of a cache shares the two specs)."""
        return _spec(kind, settings)

    @property
    def symbol_width(self) -> int:
        """Bytes per symbol in a zstd payload (uint8, or uint16 LE above 256 levels)."""
        return 1 if self.levels <= 256 else 2

    @property
    def fixed_bits(self) -> int:
        """Bits per symbol of the fixed-width coder."""
        return fixed_bits(self.levels)

    def encoded_tokens(self, n: int) -> int:
        """Tokens of an n-token stream that live in blocks: whole blocks older than the window."""
        return max(0, n - self.window) // self.block_tokens * self.block_tokens

    def blocks(self, n: int) -> int:
        """Number of blocks of an n-token stream."""
        return self.encoded_tokens(n) // self.block_tokens

    def group_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(groups per block G, values per group m) for this stream's shape [B, H, n, d]."""
        return group_shape(self.grouping, shape, self.block_tokens)


@functools.lru_cache(maxsize=256)
def _spec(kind: str, settings: QuantSettings) -> StreamSpec:
    if kind not in KINDS:
        raise ValueError(f"stream kind must be 'k' or 'v', got {kind!r}")
    is_k = kind == "k"
    eb = settings.k_error_bound if is_k else settings.v_error_bound
    return StreamSpec(
        kind=kind,
        mode=settings.mode,
        grouping=settings.k_grouping if is_k else "v",
        error_bound=eb,
        levels=levels(eb),
        window=settings.k_window if is_k else settings.v_window,
        block_tokens=settings.block_tokens,
        entropy=settings.entropy,
    )
