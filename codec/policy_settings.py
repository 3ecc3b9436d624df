"""Policy settings: frozen dataclasses that validate themselves and accept wire strings.

Settings reach the server as strings ("max", "64", "true"); `PolicySettings.from_mapping` coerces
each value to its field's declared type (bool, int, float or str) and rejects unknown names, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Self

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def _coerce(name: str, kind: type, raw: object) -> object:
    """Convert one setting to `kind`; strings are parsed, other values must already fit."""
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise ValueError(f"setting {name!r} must be a boolean (true/false), got {raw!r}")
    if kind is int:
        # bool is an int subclass; "true" for a count is almost certainly a mistake.
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw.strip(), 10)
            except ValueError:
                pass
        raise ValueError(f"setting {name!r} must be an integer, got {raw!r}")
    if kind is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, str):
            try:
                return float(raw.strip())
            except ValueError:
                pass
        raise ValueError(f"setting {name!r} must be a number, got {raw!r}")
    if kind is str:
        if isinstance(raw, str):
            return raw.strip()
        raise ValueError(f"setting {name!r} must be a string, got {raw!r}")
    raise TypeError(f"setting {name!r} has unsupported type {kind!r}")


@dataclasses.dataclass(frozen=True)
class PolicySettings:
    """Base of every policy's settings; subclasses declare fields and override `validate`."""

    # Allowed values of str fields, by field name; checked in __post_init__.
    choices: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    def __post_init__(self) -> None:
        for name, allowed in self.choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"setting {name!r} must be one of {list(allowed)}, got {value!r}")
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on an out-of-range value (ranges beyond the field types)."""

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object]) -> Self:
        """Build settings from a name -> value mapping whose values may be strings.

        Raises ValueError naming the first unknown setting or the first value that does not
        parse as its field's type.
        """
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(mapping) - fields)
        if unknown:
            known = sorted(fields) or "none"
            raise ValueError(f"unknown setting {unknown[0]!r} for {cls.__name__} (known: {known})")
        kwargs: dict[str, Any] = {
            name: _coerce(name, hints[name], raw) for name, raw in mapping.items()
        }
        return cls(**kwargs)

    def non_negative(self, *names: str) -> None:
        """Raise ValueError if any named int/float field is negative."""
        for name in names:
            if getattr(self, name) < 0:
                raise ValueError(f"setting {name!r} must be >= 0, got {getattr(self, name)!r}")
