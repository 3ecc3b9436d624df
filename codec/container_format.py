"""The kvpack container's constants and in-memory records (see docs/FORMAT.md): limits, the
section table entries, the parsed header and decoded caches."""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from kvpack.codec.quant_settings import QuantSettings
from kvpack.codec.rawbytes import itemsize

MAGIC = b"KVPK"
VERSION = 2  # written by default; every version in VERSIONS decodes
VERSIONS = (1, 2)
CONTAINER_VERSION = VERSION  # the name kvpack.codec exports
_PREFIX = struct.Struct("<4sHHII")  # magic, version, flags (0), header bytes, header crc32
MAX_HEADER_BYTES = 16 << 20
MAX_LAYERS = 4096
MAX_LAYER_NUMBER = 1 << 16
# Sane maxima for [B, H, n, d]; each tensor also stays under MAX_ELEMENTS.
MAX_SHAPE = (1 << 16, 1 << 12, 1 << 24, 1 << 16)
MAX_ELEMENTS = 1 << 34
# A layer may not claim more decoded bytes than this many times its stored bytes (+ 64 KiB):
# zstd cannot exceed about 2^15 (v2 group metadata is zstd too; v1's is 8 bytes per group).
MAX_EXPANSION = 1 << 16
MAX_META_ITEMS = 64
MAX_META_CHARS = 4096
_STREAM_CODERS = {"lossy": ("huffman", "zstd"), "fixed": ("fixed",), "lossless": ("lossless",)}


@dataclass(frozen=True)
class SectionRef:
    """Where a section lives: offset from the start of the data region, length, crc32, coder;
    `tokens`: the token count of a v2 quantised block shorter than block_tokens (else None)."""

    offset: int
    length: int
    crc: int
    coder: str
    tokens: int | None = None

    def to_json(self) -> list[object]:
        out: list[object] = [self.offset, self.length, self.crc, self.coder]
        return out if self.tokens is None else [*out, self.tokens]


@dataclass(frozen=True)
class LayerEntry:
    """One layer in the header: number, shapes [B, H, n, d], codebooks (Huffman code lengths per
    symbol, or None), its sections and the settings it was encoded with (the container's, or
    the layer's own recorded in a v2 header: error bounds may differ per layer)."""

    layer: int
    k_shape: tuple[int, int, int, int]
    v_shape: tuple[int, int, int, int]
    k_codebook: tuple[int, ...] | None
    v_codebook: tuple[int, ...] | None
    indices: SectionRef | None
    k_blocks: tuple[SectionRef, ...]
    v_blocks: tuple[SectionRef, ...]
    k_window: SectionRef
    v_window: SectionRef
    settings: QuantSettings
    k_meta: SectionRef | None = None  # v2 quantised streams: their blocks' group metadata
    v_meta: SectionRef | None = None

    def named_sections(self) -> list[tuple[str, SectionRef]]:
        """(name for error messages, ref) in container order: indices, K metadata, K blocks, V
        metadata, V blocks, K window, V window (absent ones left out)."""
        out = [("indices", self.indices)] if self.indices is not None else []
        out += [("K metadata", self.k_meta)] if self.k_meta is not None else []
        out += [(f"K block {i}", r) for i, r in enumerate(self.k_blocks)]
        out += [("V metadata", self.v_meta)] if self.v_meta is not None else []
        out += [(f"V block {i}", r) for i, r in enumerate(self.v_blocks)]
        return [*out, ("K window", self.k_window), ("V window", self.v_window)]

    @property
    def stored_bytes(self) -> int:
        return sum(r.length for _, r in self.named_sections())

    def block_tokens(self, kind: str) -> list[int]:
        """Tokens in each block of stream `kind` ("k"/"v"), oldest first."""
        t = self.settings.block_tokens
        return [
            t if r.tokens is None else r.tokens
            for r in (self.k_blocks if kind == "k" else self.v_blocks)
        ]


@dataclass(frozen=True)
class ContainerHeader:
    """Everything in a container except the tensor payloads.

    raw_bytes / stored_bytes are per layer: K+V bytes in `dtype` and the bytes of its sections.
    coders: per layer, the coder of each K and V block ({"k": (...), "v": (...)}).
    settings: the container's settings; layer_settings: each layer's (v2 may differ per layer).
    """

    version: int
    dtype: str
    settings: QuantSettings
    meta: dict[str, str]
    seq_len: int | None
    entries: tuple[LayerEntry, ...]
    data_offset: int
    total_bytes: int

    @property
    def num_layers(self) -> int:
        return len(self.entries)

    @property
    def layers(self) -> list[int]:
        return [e.layer for e in self.entries]

    @property
    def k_shapes(self) -> list[tuple[int, int, int, int]]:
        return [e.k_shape for e in self.entries]

    @property
    def v_shapes(self) -> list[tuple[int, int, int, int]]:
        return [e.v_shape for e in self.entries]

    @property
    def layer_settings(self) -> list[QuantSettings]:
        return [e.settings for e in self.entries]

    @property
    def raw_bytes(self) -> list[int]:
        size = itemsize(self.dtype)
        return [(math.prod(e.k_shape) + math.prod(e.v_shape)) * size for e in self.entries]

    @property
    def stored_bytes(self) -> list[int]:
        return [e.stored_bytes for e in self.entries]

    @property
    def coders(self) -> list[dict[str, tuple[str, ...]]]:
        return [
            {"k": tuple(r.coder for r in e.k_blocks), "v": tuple(r.coder for r in e.v_blocks)}
            for e in self.entries
        ]


@dataclass(frozen=True)
class DecodedCache:
    """Decoded layers: keys/values [B, H, n_l, d] in the container dtype, indices [B, H, n_l]
    int64 or None, absolute layer numbers, and the header."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    indices: list[torch.Tensor | None]
    layers: list[int]
    header: ContainerHeader = field(repr=False)


def check_meta(meta: Mapping[str, str] | None) -> dict[str, str]:
    meta = dict(meta or {})
    if len(meta) > MAX_META_ITEMS:
        raise ValueError(f"meta has {len(meta)} items, at most {MAX_META_ITEMS}")
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"meta must map str to str, got {k!r}: {v!r}")
        if len(k) > MAX_META_CHARS or len(v) > MAX_META_CHARS:
            raise ValueError(f"meta item {k[:40]!r} longer than {MAX_META_CHARS} characters")
    return meta
