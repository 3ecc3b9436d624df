"""An upper bound on the bytes encode_chunk writes, from the chunk's layout alone.

LMCache's serde contract (``Serializer.estimate_serialized_size``) allocates the output buffer
before the data is seen, so the bound may not depend on values. Per stream of one layer (n
tokens, blocks of T tokens, window w; nb = whole blocks older than the window):

    block      8 bytes per quantisation group (container v2 stores a group's minimum and step
               in 4 bytes, or as fp32 pairs where that is smaller: 8 is its worst case) plus:
               lossy: at most a zstd frame of the symbols (``auto`` picks Huffman only when it
               is smaller; forced ``huffman`` is at most 16 bits per symbol plus its lane table),
               fixed: ceil(values x bits / 8), lossless: a zstd frame of the raw bytes
    window     a zstd frame of the n - nb*T newest tokens' raw bytes

plus the container prefix, the codec's own header estimate (QuantSettings.header_bytes, an
upper estimate by construction) and the chunk meta. zstd frames are bounded by ZSTD_compressBound.
For ``fixed`` the bound is within the metadata's worst case (up to ~10 %) of the real size;
for ``lossy`` it is what a worst case could need (about a byte per value), so LMCache's serde
buffers are sized for that even though typical entries are 2-3x smaller (LMCache stores only the
bytes written).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import torch

from kvpack.client.lmcache import layout
from kvpack.client.lmcache.chunk_codec import chunk_settings
from kvpack.codec import QuantSettings
from kvpack.codec import quant as quant_math

PREFIX_BYTES = 16
LANE_SYMBOLS = 1024  # kvpack.codec.huffman.LANE_SYMBOLS: a 2-byte length per lane
SLACK_PER_SECTION = 64  # zstd frame header / checksum room beyond ZSTD_compressBound


def zstd_bound(n: int) -> int:
    """ZSTD_compressBound(n): the largest frame zstd can produce for n input bytes."""
    small = ((128 << 10) - n) >> 11 if n < (128 << 10) else 0
    return n + (n >> 8) + small + SLACK_PER_SECTION


def _groups(kind: str, b: int, h: int, d: int, block_tokens: int, k_grouping: str) -> int:
    if kind == "v":
        return b * h * block_tokens
    return b * h * d if k_grouping == "channel" else b


def _block_bytes(values: int, groups: int, itemsize: int, kind: str, s: QuantSettings) -> int:
    if s.mode == "lossless":
        return zstd_bound(values * itemsize)
    eb = s.k_error_bound if kind == "k" else s.v_error_bound
    n_levels = quant_math.levels(eb)
    if s.mode == "fixed":
        payload = math.ceil(values * quant_math.fixed_bits(n_levels) / 8)
    else:
        payload = zstd_bound(values * (1 if n_levels <= 256 else 2))
        if s.entropy == "huffman":
            payload = max(payload, 2 * math.ceil(values / LANE_SYMBOLS) + 2 * values)
    return 8 * groups + payload


def _stream_bytes(
    shape: tuple[int, int, int, int], itemsize: int, kind: str, s: QuantSettings
) -> int:
    b, h, n, d = shape
    window = s.k_window if kind == "k" else s.v_window
    nb = max(0, n - window) // s.block_tokens
    per_block = b * h * s.block_tokens * d
    total = zstd_bound((n - nb * s.block_tokens) * b * h * d * itemsize)  # window section
    if nb:
        groups = _groups(kind, b, h, d, s.block_tokens, s.k_grouping)
        total += nb * _block_bytes(per_block, groups, itemsize, kind, s)
    return total


def max_chunk_bytes(
    shapes: Sequence[Sequence[int]],
    fmt: str,
    dtype: torch.dtype,
    head_dim: int | None,
    settings: QuantSettings,
    meta_chars: int = 4096,
) -> int:
    """Upper bound of ``len(encode_chunk(...))`` for group tensors of ``shapes`` in ``fmt`` and
    ``dtype``; ``meta_chars`` bounds the LMCache key stored in the meta."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if shapes:  # encode_chunk fits block_tokens to the chunk's tokens the same way
        settings = chunk_settings(settings, layout.num_tokens(tuple(shapes[0]), fmt))
    total_layers = 0
    max_tokens = 0
    data = 0
    for shape in shapes:
        shape = tuple(int(x) for x in shape)
        n_layers, tokens = layout.num_layers(shape, fmt), layout.num_tokens(shape, fmt)
        hidden = shape[-1]
        h, d = (1, hidden) if fmt == "KV_MLA_FMT" else layout.heads(hidden, head_dim)
        k_shape = (1, h, tokens, d)
        v_shape = (1, h, tokens, 0 if fmt == "KV_MLA_FMT" else d)
        per_layer = _stream_bytes(k_shape, itemsize, "k", settings)
        per_layer += _stream_bytes(v_shape, itemsize, "v", settings)
        data += n_layers * per_layer
        total_layers += n_layers
        max_tokens = max(max_tokens, tokens)
    meta = len(json.dumps([list(s) for s in shapes])) * 2 + 256 + meta_chars
    return PREFIX_BYTES + settings.header_bytes(total_layers, max_tokens) + meta + data
