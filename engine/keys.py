"""Store keys: caller-chosen key validation and content addressing.

Content keys are a chained sha256 (never Python ``hash()``, which is salted per process), so the
same inputs from any process or replica, and from LocalKVPack, find the same entry:
``h_0 = sha256("kvpack/v1")``, ``h_i = sha256(h_{i-1} || len(part_i) || part_i)`` over the parts
model fingerprint, layout JSON, codec settings JSON, policy JSON and the token ids as
little-endian uint32. The key is ``"sha256:" + hex(h_last)``. The policy JSON holds every input
besides these that changes the stored result: the policy's name, its parsed settings (defaults
included, so ``{}`` and the spelled-out defaults agree), the budget and the statistics the
policy read (kind and shape).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kvpack.errors import InvalidArgument

KEY_PATTERN = re.compile(r"[A-Za-z0-9._:/-]{1,200}")
CONTENT_KEY_PREFIX = "sha256:"


def validate_key(key: str) -> str:
    """Return ``key`` if it matches ``[A-Za-z0-9._:/-]{1,200}``; InvalidArgument otherwise."""
    if not KEY_PATTERN.fullmatch(key):
        shown = key if len(key) <= 60 else key[:57] + "..."
        raise InvalidArgument(
            f"invalid key {shown!r}: keys are 1-200 characters of A-Z a-z 0-9 . _ : / -"
        )
    return key


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def content_key(
    model: str,
    layout: Mapping[str, Any],
    codec_settings: Mapping[str, Any],
    policy: Mapping[str, Any],
    token_ids: Sequence[int],
) -> str:
    """Chained sha256 key of a cache computed from ``token_ids`` by ``model`` (see module doc)."""
    if not model:
        raise InvalidArgument("content-addressed keys need the model fingerprint (header.model)")
    parts: Iterable[bytes] = (
        model.encode(),
        _canonical(dict(layout)),
        _canonical(dict(codec_settings)),
        _canonical(dict(policy)),
        struct.pack(f"<{len(token_ids)}I", *token_ids),
    )
    h = hashlib.sha256(b"kvpack/v1").digest()
    for part in parts:
        h = hashlib.sha256(h + struct.pack("<Q", len(part)) + part).digest()
    return CONTENT_KEY_PREFIX + h.hex()


def blob_key(data: bytes | bytearray | memoryview) -> str:
    """Content key of a container stored without a key or token ids: sha256 of its bytes."""
    return CONTENT_KEY_PREFIX + hashlib.sha256(data).hexdigest()
