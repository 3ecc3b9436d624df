"""Policy settings: frozen dataclasses that validate themselves and accept wire strings.

Settings reach the server as strings ("max", "64", "true"); `PolicySettings.from_mapping` coerces
each value to its field's declared type (bool, int, float or str) and rejects unknown names, so a
typo never silently falls back to a default.

Every numeric setting has a closed range, declared once per settings class by `ranges`. The
range depends on the cache it is applied to (`Extent`: tokens per sequence and the budget per
layer): `validate_for_layout` checks a request against its own layout before any tensor arrives
(the server's plan(), LocalKVPack), and construction checks against the largest layout the codec
holds, so no value can overflow the policies' integer arithmetic or make their work grow beyond
the data (a pooling kernel costs O(n * kernel_size)).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar, NamedTuple, Self

from kvpack.codec.coerce import settings_kwargs

# The longest sequence a container holds (container.MAX_SHAPE's n): the bound of every setting
# that counts positions when no layout is known.
MAX_POSITIONS = 1 << 24


class Extent(NamedTuple):
    """What a setting's range may depend on.

    seq_len: tokens per sequence before eviction (n). layer_budget: token slots one layer keeps
    on average, rounded up (1 <= layer_budget <= seq_len).
    """

    seq_len: int
    layer_budget: int


# No layout known: the codec's largest.
ANY_LAYOUT = Extent(MAX_POSITIONS, MAX_POSITIONS)


class Range(NamedTuple):
    """Closed range [lo, hi] of one numeric setting; `why` explains it ("at most seq_len=32")."""

    lo: float
    hi: float
    why: str = ""


def shown(value: object, limit: int = 40) -> str:
    """repr of a setting's value for an error message, cut to about `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_range(name: str, value: float, bound: Range, default: float | None = None) -> None:
    """ValueError naming `name`, `value` and the range unless lo <= value <= hi (NaN never is).

    A field's `default` is always accepted: defaults suit every layout because the codec caps
    them at the sequence (4 sinks of a 2-token sequence are its 2 tokens).
    """
    hi, why = bound.hi, [bound.why] if bound.why else []
    if default is not None and default > hi:
        hi = default
        why.append(f"the default {_number(default)} is always allowed")
    if not bound.lo <= value <= hi:  # NaN compares false: never in range
        limits = f"[{_number(bound.lo)}, {_number(hi)}]"
        because = f" ({'; '.join(why)})" if why else ""
        raise ValueError(
            f"setting {name!r}={shown(value)} is out of range: allowed {limits}{because}"
        )


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


@dataclasses.dataclass(frozen=True)
class PolicySettings:
    """Base of every policy's settings; subclasses declare fields and override `ranges` (numeric
    bounds) and `validate` (anything else, e.g. an odd kernel)."""

    # Allowed values of str fields, by field name; checked in __post_init__.
    choices: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    def __post_init__(self) -> None:
        for name, allowed in self.choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(
                    f"setting {name!r} must be one of {list(allowed)}, got {shown(value)}"
                )
        self.check_values(vars(self), ANY_LAYOUT)
        self.validate()

    @classmethod
    def ranges(cls, extent: Extent) -> dict[str, Range]:
        """The allowed range of every numeric setting for a cache of `extent` (none here)."""
        return {}

    def validate(self) -> None:
        """Raise ValueError on a value that breaks a rule other than a range (e.g. parity)."""

    def validate_for_layout(self, *, seq_len: int, layer_budget: int) -> None:
        """Raise ValueError naming the first setting outside its range for a cache of `seq_len`
        tokens per sequence keeping `layer_budget` token slots per layer (on average, rounded
        up). Called before any tensor of the request is received."""
        self.check_values(vars(self), Extent(seq_len, layer_budget))

    @classmethod
    def check_values(cls, values: Mapping[str, object], extent: Extent) -> None:
        """ValueError naming the first of `values` (setting name -> typed value) outside its
        range for `extent`; names without a range are not checked."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for name, bound in cls.ranges(extent).items():
            if name in values:
                value, default = values[name], defaults[name]
                assert isinstance(value, (int, float)) and isinstance(default, (int, float))
                check_range(name, value, bound, default)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object], extent: Extent = ANY_LAYOUT) -> Self:
        """Build settings from a name -> value mapping whose values may be strings.

        Raises ValueError naming the first unknown setting or the first value that does not
        parse as its field's type or lies outside its range for `extent` (by default the
        codec's largest layout).
        """
        values = settings_kwargs(cls, mapping, "setting")
        cls.check_values(values, extent)  # before construction: report the layout's range
        return cls(**values)


def positions(extent: Extent) -> Range:
    """[0, seq_len]: a count of positions of one sequence (sinks, a recent window)."""
    return Range(0, extent.seq_len, _known(extent, f"at most seq_len={extent.seq_len}"))


def slots(extent: Extent) -> Range:
    """[0, layer_budget]: positions every layer must keep, which the budget has to pay for."""
    why = f"at most the per-layer budget, {extent.layer_budget} token slots on average"
    return Range(0, extent.layer_budget, _known(extent, why))


def _known(extent: Extent, why: str) -> str:
    """`why` for a request's layout; nothing to explain for the codec's largest."""
    return "" if extent == ANY_LAYOUT else why
