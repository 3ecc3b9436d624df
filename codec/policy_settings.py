"""Policy settings: frozen dataclasses that validate themselves and accept wire strings.

Settings reach the server as strings ("max", "64", "true"); `PolicySettings.from_mapping` coerces
each value to its field's declared type (bool, int, float or str) and rejects unknown names, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar, Self

from kvpack.codec.coerce import settings_kwargs


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
        return cls(**settings_kwargs(cls, mapping, "setting"))

    def non_negative(self, *names: str) -> None:
        """Raise ValueError if any named int/float field is negative."""
        for name in names:
            if getattr(self, name) < 0:
                raise ValueError(f"setting {name!r} must be >= 0, got {getattr(self, name)!r}")
