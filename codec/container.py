"""The kvpack container: versioned, pickle-free, little-endian; see docs/FORMAT.md.

Layout: a 16-byte prefix (magic, version, flags, header length, header crc32), a JSON header
(dtype, settings, meta, seq_len, per-layer shapes, codebooks and section table) and a data region
of sections, each with its own crc32. Any layer decodes from its own sections alone.

The code lives in container_format (constants, records), container_write, container_read
(header), container_decode and container_edit (slice, append); this module gathers them.
"""

from __future__ import annotations

from kvpack.codec.container_decode import decode as decode
from kvpack.codec.container_decode import decode_tails as decode_tails
from kvpack.codec.container_decode import verify as verify
from kvpack.codec.container_edit import append as append
from kvpack.codec.container_edit import slice_layers as slice_layers
from kvpack.codec.container_format import CONTAINER_VERSION as CONTAINER_VERSION
from kvpack.codec.container_format import MAGIC as MAGIC
from kvpack.codec.container_format import MAX_ELEMENTS as MAX_ELEMENTS
from kvpack.codec.container_format import MAX_EXPANSION as MAX_EXPANSION
from kvpack.codec.container_format import MAX_HEADER_BYTES as MAX_HEADER_BYTES
from kvpack.codec.container_format import MAX_LAYER_NUMBER as MAX_LAYER_NUMBER
from kvpack.codec.container_format import MAX_LAYERS as MAX_LAYERS
from kvpack.codec.container_format import MAX_META_CHARS as MAX_META_CHARS
from kvpack.codec.container_format import MAX_META_ITEMS as MAX_META_ITEMS
from kvpack.codec.container_format import MAX_SHAPE as MAX_SHAPE
from kvpack.codec.container_format import VERSION as VERSION
from kvpack.codec.container_format import ContainerHeader as ContainerHeader
from kvpack.codec.container_format import DecodedCache as DecodedCache
from kvpack.codec.container_format import LayerEntry as LayerEntry
from kvpack.codec.container_format import SectionRef as SectionRef
from kvpack.codec.container_read import read_header as read_header
from kvpack.codec.container_write import assemble as assemble
from kvpack.codec.container_write import encode as encode
