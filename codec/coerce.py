"""Typed values from settings that may arrive as strings off the wire ("64", "true", "0.05").

Shared by the eviction policies' and the quantisation settings' ``from_mapping``, so both accept
and reject exactly the same spellings.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def _shown(raw: object) -> str:
    """``repr(raw)`` cut to 40 characters: values come off the wire and can be megabytes."""
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."


def coerce_setting(name: str, kind: type, raw: object) -> object:
    """Convert one setting to `kind`; strings are parsed, other values must already fit."""
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise ValueError(f"setting {name!r} must be a boolean (true/false), got {_shown(raw)}")
    if kind is int:
        # bool is an int subclass; "true" for a count is almost certainly a mistake.
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw.strip(), 10)
            except ValueError:
                pass
        raise ValueError(f"setting {name!r} must be an integer, got {_shown(raw)}")
    if kind is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, str):
            try:
                return float(raw.strip())
            except ValueError:
                pass
        raise ValueError(f"setting {name!r} must be a number, got {_shown(raw)}")
    if kind is str:
        if isinstance(raw, str):
            return raw.strip()
        raise ValueError(f"setting {name!r} must be a string, got {_shown(raw)}")
    raise TypeError(f"setting {name!r} has unsupported type {kind!r}")


def settings_kwargs(cls: type, mapping: Mapping[str, object], what: str) -> dict[str, Any]:
    """Constructor arguments of dataclass `cls` from a name -> value mapping whose values may be
    strings, each coerced to its field's declared type. ValueError naming the first unknown
    name ("unknown {what} 'x' for Cls (known: [...])") or the first unparsable value."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - fields)
    if unknown:
        known = sorted(fields) or "none"
        raise ValueError(f"unknown {what} {unknown[0]!r} for {cls.__name__} (known: {known})")
    hints = typing.get_type_hints(cls)
    return {name: coerce_setting(name, hints[name], raw) for name, raw in mapping.items()}
