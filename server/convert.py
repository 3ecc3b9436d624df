"""Protobuf <-> server domain conversions, in one place (store metadata, limits, summaries)."""

from __future__ import annotations

from kvpack import codec, wire
from kvpack.options import MAX_MESSAGE_BYTES
from kvpack.server.config import ServerConfig
from kvpack.server.stores.base import EntryMeta
from kvpack.v1 import kvpack_pb2 as pb


def dtype_enum(name: str) -> int:
    """Container dtype name (``"bf16"``) -> ``DTYPE_BFLOAT16``; unknown -> UNSPECIFIED."""
    try:
        return wire.dtype_from_torch(codec.dtype_from_name(name))
    except ValueError:
        return pb.DTYPE_UNSPECIFIED


def entry_info(key: str, meta: EntryMeta) -> pb.EntryInfo:
    """EntryInfo of ``meta`` under the caller-visible ``key`` (namespace stripped)."""
    return pb.EntryInfo(
        key=key,
        stored_bytes=meta.stored_bytes,
        original_bytes=meta.original_bytes,
        created_unix=meta.created_unix,
        num_layers=meta.num_layers,
        dtype=dtype_enum(meta.dtype),  # type: ignore[arg-type]
        codec=meta.codec,
        settings=meta.settings,
    )


def limits(config: ServerConfig) -> pb.Limits:
    """The limits Info advertises."""
    return pb.Limits(
        max_message_bytes=MAX_MESSAGE_BYTES,
        max_request_bytes=config.max_request_bytes,
        max_layers=config.max_layers,
        max_heads=config.max_heads,
        max_head_dim=config.max_head_dim,
        max_seq_len=config.max_seq_len,
        max_batch_size=config.max_batch_size,
        max_concurrent_streams=config.max_concurrent_streams,
        chunk_bytes=wire.CHUNK_BYTES,
    )
