"""Store keys on the server: tenant namespaces and List prefixes.

Key validation and content keys are the engine's (``kvpack.engine.keys``, shared with
LocalKVPack); what the servicer uses is re-exported here.
"""

from __future__ import annotations

import re

from kvpack.engine.keys import CONTENT_KEY_PREFIX as CONTENT_KEY_PREFIX
from kvpack.engine.keys import KEY_PATTERN as KEY_PATTERN
from kvpack.engine.keys import validate_key as validate_key
from kvpack.errors import InvalidArgument

TENANT_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")


def validate_prefix(prefix: str) -> str:
    """A List prefix: empty, or the start of a valid key."""
    if prefix and not KEY_PATTERN.fullmatch(prefix):
        raise InvalidArgument(f"invalid prefix {prefix[:60]!r}: allowed A-Z a-z 0-9 . _ : / -")
    return prefix


def namespaced(tenant: str, key: str) -> str:
    """The store key of ``key`` in ``tenant``'s namespace."""
    return f"{tenant}/{key}"


def tenant_prefix(tenant: str) -> str:
    """Prefix of every store key in ``tenant``'s namespace."""
    return f"{tenant}/"
