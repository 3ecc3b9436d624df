"""What a stored entry says about itself (Stat / List): its codec name and settings.

Shared by the server's stores and LocalKVPack, so Stat answers the same for the same entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kvpack.codec import QuantSettings


@dataclass(frozen=True)
class Stored:
    """A compressed cache ready for the store: its key, container bytes and entry settings;
    ``sha256`` is the container's hex digest when the key was made from it (else empty), so the
    server does not hash the container a second time for the store's checksum."""

    key: str
    blob: bytes
    settings: dict[str, str]
    sha256: str = ""


def entry_settings(quant: QuantSettings, meta: Mapping[str, str] | None = None) -> dict[str, str]:
    """An entry's settings: the container's quantisation settings, plus ``policy.<name>`` for
    each item of the meta a Compress wrote (policy, model, ratio or n_keep; an uploaded
    container has none)."""
    return {**quant.to_dict(), **{f"policy.{k}": v for k, v in (meta or {}).items()}}


def codec_name(quant: QuantSettings) -> str:
    """The entry's codec: quantisation mode and entropy coder, e.g. ``"lossy/huffman"``."""
    return f"{quant.mode}/{quant.entropy}"
