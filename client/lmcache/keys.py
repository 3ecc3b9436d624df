"""LMCache cache-engine keys as kvpack store keys.

LMCache names a chunk ``model@world_size@worker_id@chunk_hash_hex@dtype[@tag%value...]``
(``CacheEngineKey.to_string()``); kvpack keys are 1-200 characters of ``[A-Za-z0-9._:/-]`` and
live inside the caller's tenant namespace (the server scopes them by bearer token), so the
mapping only has to make LMCache's string a valid, reversible key:

- ``@`` (LMCache's field separator) becomes ``/``, so entries of one model share a prefix;
- every other character outside ``[A-Za-z0-9._-]`` -- ``/`` in a model name, ``%`` in a tag,
  ``:`` -- becomes ``:`` + two lower-case hex digits per UTF-8 byte (``/`` is ``:2f``).

A mapped key longer than 200 characters (long model names, many tags) is replaced by
``<prefix>:h/<sha256 hex>`` of the LMCache string; ``:h`` never occurs in an escaped key (``:`` is
always followed by two hex digits there), so the two forms cannot collide. Hashed keys cannot be
mapped back; :func:`lmcache_key` returns None for them.
"""

from __future__ import annotations

import hashlib
import re

MAX_KEY_CHARS = 200
_PLAIN = re.compile(r"[A-Za-z0-9._-]")
_ESCAPE = re.compile(r":([0-9a-f]{2})")
HASHED = ":h/"
PREFIX_PATTERN = re.compile(r"[A-Za-z0-9._/-]{0,100}")


def check_prefix(prefix: str) -> str:
    """``prefix`` if it is usable in front of mapped keys (no ``:``, at most 100 characters)."""
    if not PREFIX_PATTERN.fullmatch(prefix):
        raise ValueError(
            f"key_prefix {prefix!r} must be at most 100 characters of A-Z a-z 0-9 . _ / -"
        )
    return prefix


def _escape(text: str) -> str:
    out = []
    for ch in text:
        if ch == "@":
            out.append("/")
        elif _PLAIN.fullmatch(ch):
            out.append(ch)
        else:
            out.append("".join(f":{b:02x}" for b in ch.encode()))
    return "".join(out)


def kvpack_key(lmcache_key: str, prefix: str = "") -> str:
    """The kvpack key of LMCache key string ``lmcache_key`` under ``prefix``."""
    mapped = prefix + _escape(lmcache_key)
    if len(mapped) <= MAX_KEY_CHARS:
        return mapped
    return prefix + HASHED + hashlib.sha256(lmcache_key.encode()).hexdigest()


def lmcache_key(key: str, prefix: str = "") -> str | None:
    """Inverse of :func:`kvpack_key`: the LMCache key string, or None for a hashed key or a key
    that is not under ``prefix``."""
    if not key.startswith(prefix):
        return None
    body = key[len(prefix) :]
    if body.startswith(HASHED):
        return None
    raw = bytearray()
    pos = 0
    for match in _ESCAPE.finditer(body):
        raw += body[pos : match.start()].replace("/", "@").encode()
        raw.append(int(match.group(1), 16))
        pos = match.end()
    raw += body[pos:].replace("/", "@").encode()
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None
