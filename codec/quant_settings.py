"""QuantSettings: the lossy-encoding knobs stored in every container header and sent on the wire."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Self

from kvpack.codec.coerce import settings_kwargs

MODES = ("lossy", "fixed", "lossless")
K_GROUPINGS = ("channel", "block")
ENTROPY_CODERS = ("auto", "huffman", "zstd")
# 1/eb + 1 quantisation levels; 2^-12 keeps the alphabet <= 4097 symbols (int16 symbols, and a
# 16-bit-limited Huffman code has room for it).
MIN_ERROR_BOUND = 2.0**-12
MAX_TOKENS = 1 << 20


@dataclass(frozen=True)
class QuantSettings:
    """How a KV cache is encoded.

    mode: "lossy" (error-bounded quantisation + entropy coding), "fixed" (same quantisation,
        ceil(log2(levels)) bits per value, the KIVI-style baseline) or "lossless" (byte-plane
        shuffle + zstd of the raw bytes).
    k_error_bound / v_error_bound: relative error bound eb; a group with range r is quantised with
        step eb*r, so every value is within eb*r/2 (see docs/FORMAT.md for the exact statement).
    k_grouping: "channel" = one range per (block, batch row, head, channel) over block_tokens
        tokens; "block" = one range per (block, batch row) across heads and channels.
    block_tokens: tokens per encoded block (K and V). k_window / v_window: newest tokens kept in
        full precision (0 allowed). entropy: coder for quantised symbols per block.
    """

    mode: str = "lossy"
    k_error_bound: float = 0.05
    v_error_bound: float = 0.10
    k_grouping: str = "channel"
    block_tokens: int = 64
    k_window: int = 128
    v_window: int = 256
    entropy: str = "auto"

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range."""
        for name, allowed in (
            ("mode", MODES),
            ("k_grouping", K_GROUPINGS),
            ("entropy", ENTROPY_CODERS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}"
                )
        for name in ("k_error_bound", "v_error_bound"):
            eb = getattr(self, name)
            if not isinstance(eb, float) or not math.isfinite(eb) or not MIN_ERROR_BOUND <= eb <= 1:
                raise ValueError(f"{name} must be a float in [2^-12, 1], got {eb!r}")
        for name, lo in (("block_tokens", 1), ("k_window", 0), ("v_window", 0)):
            value = getattr(self, name)
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or not lo <= value <= MAX_TOKENS
            ):
                raise ValueError(f"{name} must be an int in [{lo}, {MAX_TOKENS}], got {value!r}")

    def to_dict(self) -> dict[str, str]:
        """Every field as a string (repr for floats, so from_mapping round-trips exactly)."""
        return {f.name: _to_str(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object]) -> Self:
        """Settings from a name -> value mapping (values may be strings); unknown names and
        unparsable values raise ValueError naming the field. The result is validated."""
        out = cls(**settings_kwargs(cls, mapping, "quantisation setting"))
        out.validate()
        return out


def _to_str(value: object) -> str:
    return repr(value) if isinstance(value, float) else str(value)
