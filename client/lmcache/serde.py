"""kvpack's codec as an LMCache serde: LMCache keeps its own L2 storage, kvpack compresses.

Importing this module registers the serde type ``kvpack`` in LMCache's serde factory
(``lmcache.v1.distributed.serde.register_serde_factory``), so an L2 adapter spec can name it::

    --l2-adapter '{"type": "fs", "base_path": "/cache",
                   "serde": {"type": "kvpack", "head_dim": 128, "mode": "fixed"}}'

LMCache has no hook that imports third-party serdes, so the process that parses that spec must
import this module first: ``python -m kvpack.client.lmcache.cli server ...`` runs LMCache's own
CLI after doing so (docs/LMCACHE.md).

Options (the spec's keys besides ``type``): ``head_dim`` (split each token's hidden vector into
heads of this size; default one head), ``format`` (LMCache memory format of the chunks when the
memory object does not say: ``KV_2LTD`` default, ``KV_MLA_FMT`` for MLA models),
``max_workers`` (threads, default 1, as LMCache's fp8 serde) and any QuantSettings field
(``mode``, ``k_error_bound``, ...; windows default to 0 as in the connector).

Wire format of a serialized chunk: an 8-byte little-endian length, then the kvpack container
(chunk_codec). The length lets the deserializer ignore the unused tail of LMCache's buffer,
which is sized by ``estimate_serialized_size`` (sizing.py) before the data is seen; LMCache
stores only the bytes ``serialize`` reports written.
"""

from __future__ import annotations

import struct
from typing import Any, cast

import torch
from lmcache.logging import init_logger
from lmcache.v1.distributed.serde import (
    AsyncSerdeProcessor,
    Deserializer,
    Serializer,
    get_registered_serde_types,
    register_serde_factory,
)

from kvpack.client.lmcache import chunk_codec, layout, sizing
from kvpack.client.lmcache.settings import QUANT_DEFAULTS
from kvpack.codec import FormatError, QuantSettings
from kvpack.codec.coerce import coerce_setting

logger = init_logger(__name__)
SERDE_NAME = "kvpack"
_LENGTH = struct.Struct("<Q")
_OWN_OPTIONS: dict[str, type] = {"head_dim": int, "format": str, "max_workers": int}


class _Options:
    """Parsed serde kwargs (see the module docstring); ValueError naming a bad one."""

    def __init__(self, kwargs: dict[str, object]) -> None:
        quant = {**QUANT_DEFAULTS, **{k: v for k, v in kwargs.items() if k not in _OWN_OPTIONS}}
        try:
            self.quant = QuantSettings.from_mapping(quant)
            head_dim = kwargs.get("head_dim")
            self.head_dim = None if head_dim is None else cast(int, _own("head_dim", head_dim))
            self.format = cast(str, _own("format", kwargs.get("format", "KV_2LTD")))
            self.max_workers = cast(int, _own("max_workers", kwargs.get("max_workers", 1)))
        except ValueError as e:
            raise ValueError(f"kvpack serde: {e}") from None
        if self.format not in layout.FORMATS:
            raise ValueError(f"kvpack serde: format must be one of {layout.FORMATS}")


def _own(name: str, raw: object) -> object:
    """A serde option of its own (not a QuantSettings field), coerced to its type."""
    return coerce_setting(name, _OWN_OPTIONS[name], raw)


def _format_of(obj: Any, default: str) -> str:
    """The memory object's format when it names a KV layout, else the configured one (LMCache's
    multiprocess L1 allocates chunks without a format)."""
    name = str(getattr(obj.get_memory_format(), "name", ""))
    return name if name in layout.FORMATS else default


def _groups(obj: Any) -> list[torch.Tensor]:
    return [obj.get_tensor(i) for i in range(len(obj.get_shapes()))]


class KVPackSerializer(Serializer):
    """KV chunk -> length-prefixed kvpack container in LMCache's byte buffer."""

    def __init__(self, options: _Options) -> None:
        self.options = options

    def serialize(self, src: Any, dst: Any, key: Any) -> int:
        opts = self.options
        fmt = _format_of(src, opts.format)
        blob = chunk_codec.encode_chunk(_groups(src), fmt, opts.head_dim, opts.quant)
        # One copy into a writable buffer (torch.frombuffer needs one), length in front.
        payload = bytearray(_LENGTH.pack(len(blob)) + blob)
        out = dst.tensor.view(torch.uint8).reshape(-1)
        if len(payload) > out.numel():  # impossible while sizing.py is an upper bound
            raise ValueError(
                f"kvpack serde: {len(payload)} bytes exceed the {out.numel()}-byte buffer"
            )
        out[: len(payload)].copy_(torch.frombuffer(payload, dtype=torch.uint8))
        return len(payload)

    def estimate_serialized_size(self, layout_desc: Any) -> int:
        return _LENGTH.size + sizing.max_chunk_bytes(
            [tuple(s) for s in layout_desc.shapes],
            self.options.format,
            layout_desc.dtypes[0],
            self.options.head_dim,
            self.options.quant,
            meta_chars=0,
        )


class KVPackDeserializer(Deserializer):
    """Length-prefixed kvpack container -> the KV chunk LMCache allocated (``dst``)."""

    def deserialize(self, src: Any, dst: Any, key: Any) -> None:
        raw = src.tensor.view(torch.uint8).reshape(-1).numpy()
        if raw.size < _LENGTH.size:
            raise FormatError(f"kvpack serde: {raw.size}-byte buffer has no length prefix")
        (length,) = _LENGTH.unpack(raw[: _LENGTH.size].tobytes())
        if length > raw.size - _LENGTH.size:
            raise FormatError(f"kvpack serde: length {length} beyond the {raw.size}-byte buffer")
        blob = raw[_LENGTH.size : _LENGTH.size + length].data  # a view, no copy
        chunk = chunk_codec.read_layout(blob)
        chunk_codec.decode_into(blob, _groups(dst), chunk)


def create_kvpack_serde(kwargs: dict[str, object]) -> Any:
    """LMCache serde factory: an AsyncSerdeProcessor around kvpack's (de)serializer."""
    options = _Options(kwargs)
    logger.info("kvpack serde: %s, head_dim %s", options.quant.to_dict(), options.head_dim)
    return AsyncSerdeProcessor(
        KVPackSerializer(options), KVPackDeserializer(), max_workers=options.max_workers
    )


# Importing twice (or reloading) must not fail LMCache's "already registered" check.
if SERDE_NAME not in get_registered_serde_types():
    register_serde_factory(SERDE_NAME, create_kvpack_serde)
