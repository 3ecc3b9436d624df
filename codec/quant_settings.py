"""QuantSettings: the lossy-encoding knobs stored in every container header and sent on the wire."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Self

from kvpack.codec import quant
from kvpack.codec.coerce import settings_kwargs
from kvpack.codec.policy_settings import Range, check_range, shown

MODES = ("lossy", "fixed", "lossless")
K_GROUPINGS = ("channel", "block")
ENTROPY_CODERS = ("auto", "huffman", "zstd")
# 1/eb + 1 quantisation levels; 2^-12 keeps the alphabet <= 4097 symbols (int16 symbols, and a
# 16-bit-limited Huffman code has room for it).
MIN_ERROR_BOUND = 2.0**-12
MAX_TOKENS = 1 << 20
# Upper estimates of what container._write puts in its JSON header, in bytes: per layer (shapes,
# field names, the indices, metadata and window section records, the layer's own settings),
# per block (a v1 record ``[offset,length,crc32,"coder"],`` with offsets below 10 TB; v2's
# block tables take under half of that) and per codebook symbol (``16,``), plus the settings
# and meta once. A request whose estimate exceeds container.MAX_HEADER_BYTES is
# refused before any work instead of failing after every layer was encoded.
HEADER_BYTES_PER_LAYER = 1024
HEADER_BYTES_PER_BLOCK = 50
HEADER_BYTES_PER_SYMBOL = 3
HEADER_BYTES_FIXED = 16 << 10
#: Short names of the fields in option strings (``kvpack eval --quant``, ``kvpack compress
#: --quant``); an option may also use the field's own name. ``eb`` sets both error bounds.
SHORT_NAMES = {
    "kwin": "k_window",
    "vwin": "v_window",
    "block": "block_tokens",
    "group": "k_grouping",
    "K": "k_error_bound",
    "V": "v_error_bound",
}
BOTH_BOUNDS = "eb"


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
        full precision; 0 by default since container format v2 (they exist for fused decode
        kernels, storage does not need them; v1's defaults were 128 / 256). entropy: coder for
        quantised symbols per block.

    Construction checks the ranges that hold for any cache (`validate`, ValueError naming the
    field), so every instance is valid; `validate_for_layout` also bounds block_tokens and the
    windows by the request's seq_len and the number of blocks by what a container header holds.
    """

    mode: str = "lossy"
    k_error_bound: float = 0.05
    v_error_bound: float = 0.10
    k_grouping: str = "channel"
    block_tokens: int = 64
    k_window: int = 0
    v_window: int = 0
    entropy: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range (construction calls it:
        an existing instance always passes)."""
        for name, allowed in (
            ("mode", MODES),
            ("k_grouping", K_GROUPINGS),
            ("entropy", ENTROPY_CODERS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {list(allowed)}, got {shown(getattr(self, name))}"
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

    def validate_for_layout(self, *, num_layers: int, seq_len: int) -> None:
        """Raise ValueError naming the first field out of range for encoding `num_layers` layers
        of at most `seq_len` tokens: block_tokens and the windows no longer than the sequence
        (their defaults always allowed), and no more blocks than a container header holds.
        Called before any tensor of the request is received."""
        defaults = QuantSettings()
        at_most = f"at most seq_len={seq_len}"
        for name in ("k_window", "v_window"):
            check_range(
                name, getattr(self, name), Range(0, seq_len, at_most), getattr(defaults, name)
            )
        fewest = self._fewest_block_tokens(num_layers, seq_len)
        if fewest is None:
            raise ValueError(
                f"a container of {num_layers} layers with k_error_bound={self.k_error_bound!r} "
                f"and v_error_bound={self.v_error_bound!r} has codebooks larger than its "
                "header holds: raise the error bounds"
            )
        blocks = self.block_count(num_layers, seq_len)
        why = (
            f"{at_most}; at least {fewest} to fit {num_layers} layers' blocks in a container "
            f"header: {self.block_tokens} makes {blocks} blocks"
        )
        check_range(
            "block_tokens", self.block_tokens, Range(fewest, seq_len, why), defaults.block_tokens
        )

    def block_count(self, num_layers: int, seq_len: int, block_tokens: int | None = None) -> int:
        """Blocks (K and V) of `num_layers` layers of `seq_len` tokens, at most: each stream's
        whole blocks older than its window (layer_codec.encoded_tokens). `block_tokens`
        overrides the setting's (for sizing trials)."""
        per_block = self.block_tokens if block_tokens is None else block_tokens
        per_layer = sum(
            max(0, seq_len - window) // per_block for window in (self.k_window, self.v_window)
        )
        return num_layers * per_layer

    def header_bytes(self, num_layers: int, seq_len: int, block_tokens: int | None = None) -> int:
        """Upper estimate of the container header's size in bytes (see HEADER_BYTES_*);
        `block_tokens` overrides the setting's."""
        symbols = 0
        if self.mode == "lossy" and self.entropy != "zstd":  # Huffman codebooks, one per stream
            symbols = sum(quant.levels(eb) for eb in (self.k_error_bound, self.v_error_bound))
        per_layer = HEADER_BYTES_PER_LAYER + HEADER_BYTES_PER_SYMBOL * symbols
        blocks = self.block_count(num_layers, seq_len, block_tokens)
        return HEADER_BYTES_FIXED + num_layers * per_layer + HEADER_BYTES_PER_BLOCK * blocks

    def _fewest_block_tokens(self, num_layers: int, seq_len: int) -> int | None:
        """The smallest block_tokens whose container header fits, or None if none does."""
        # Imported here: the container module imports this one.
        from kvpack.codec.container import MAX_HEADER_BYTES

        def fits(block_tokens: int) -> bool:
            return self.header_bytes(num_layers, seq_len, block_tokens) <= MAX_HEADER_BYTES

        lo, hi = 1, max(1, seq_len + 1)  # seq_len + 1 tokens per block: no blocks at all
        if not fits(hi):
            return None
        while lo < hi:  # header_bytes never grows with block_tokens
            mid = (lo + hi) // 2
            if fits(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def to_dict(self) -> dict[str, str]:
        """Every field as a string (repr for floats, so from_mapping round-trips exactly)."""
        return {f.name: _to_str(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object]) -> Self:
        """Settings from a name -> value mapping (values may be strings); unknown names,
        unparsable values and values out of range raise ValueError naming the field."""
        return cls(**settings_kwargs(cls, mapping, "quantisation setting"))

    @classmethod
    def from_options(cls, items: Iterable[tuple[str, str]]) -> tuple[Self, dict[str, object]]:
        """Settings from command-line ``NAME=VALUE`` items, NAME a field or its SHORT_NAMES
        alias (``eb`` sets both error bounds). Returns the settings and the fields the items
        set, typed. ValueError naming an unknown name or a bad value."""
        fields: dict[str, str] = {}
        known = {f.name for f in dataclasses.fields(cls)}
        for name, value in items:
            if name == BOTH_BOUNDS:
                fields["k_error_bound"] = fields["v_error_bound"] = value
            elif name in SHORT_NAMES or name in known:
                fields[SHORT_NAMES.get(name, name)] = value
            else:
                names = [*SHORT_NAMES, BOTH_BOUNDS, *sorted(known)]
                raise ValueError(f"unknown quantisation option {shown(name)} (known: {names})")
        settings = cls.from_mapping(fields)
        return settings, {name: getattr(settings, name) for name in fields}


def option_name(field: str) -> str:
    """The short option name of a QuantSettings field (its own name when it has none)."""
    return next((short for short, name in SHORT_NAMES.items() if name == field), field)


def _to_str(value: object) -> str:
    return repr(value) if isinstance(value, float) else str(value)
