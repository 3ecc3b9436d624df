"""One mapping each way between kvpack's Python settings and their protobuf messages.

Derived from the fields, never listed by hand: a field added to ``codec.QuantSettings`` and to
``kvpack.v1.QuantSettings`` under the same name travels without a change here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from kvpack.codec import QuantSettings
from kvpack.errors import InvalidArgument
from kvpack.v1 import kvpack_pb2 as pb

#: Names of the QuantSettings fields (the dataclass and the message share them).
QUANT_FIELDS = tuple(f.name for f in dataclasses.fields(QuantSettings))


def quant_message(quant: object) -> pb.QuantSettings:
    """The message of ``quant``: None (every field unset: the codec's defaults), a message
    (as is), a ``QuantSettings`` (every field) or a mapping of field names to typed values
    (None leaves a field unset). The server validates it; unknown names are refused here."""
    if quant is None:
        return pb.QuantSettings()
    if isinstance(quant, pb.QuantSettings):
        return quant
    if isinstance(quant, QuantSettings):
        return pb.QuantSettings(**dataclasses.asdict(quant))
    given = _mapping(quant)
    try:
        return pb.QuantSettings(**{k: v for k, v in given.items() if v is not None})
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"quant settings: {e}") from e


def quant_from_message(msg: pb.QuantSettings) -> QuantSettings:
    """``QuantSettings`` of a message: the fields it sets (proto3 strings count as set when
    not empty, the numbers when present), the codec's defaults for the rest. InvalidArgument
    naming the first field out of range."""
    try:
        return QuantSettings.from_mapping({f.name: v for f, v in msg.ListFields()})
    except ValueError as e:
        raise InvalidArgument(f"quant settings: {e}") from e


def quant_settings(quant: object) -> QuantSettings:
    """``QuantSettings`` from anything ``compress`` accepts as ``quant`` (see
    :func:`quant_message`; mapping values may also be strings)."""
    if isinstance(quant, QuantSettings):
        return quant
    if quant is None or isinstance(quant, pb.QuantSettings):
        return quant_from_message(quant_message(quant))
    given = {k: v for k, v in _mapping(quant).items() if v is not None}
    try:
        return QuantSettings.from_mapping(given)
    except ValueError as e:
        raise InvalidArgument(f"quant settings: {e}") from e


def _mapping(quant: object) -> Mapping[str, Any]:
    if not isinstance(quant, Mapping):
        raise InvalidArgument(
            f"quant must be a mapping or QuantSettings, not {type(quant).__name__}"
        )
    unknown = sorted(set(quant) - set(QUANT_FIELDS))
    if unknown:
        raise InvalidArgument(f"unknown quant settings {unknown}; known: {sorted(QUANT_FIELDS)}")
    return quant
