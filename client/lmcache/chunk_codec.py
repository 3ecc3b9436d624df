"""One LMCache chunk <-> one kvpack container.

A chunk is a memory object: one tensor per layer group, all in one ``MemoryFormat`` and dtype
(see layout.py). Every layer of every group becomes one container layer (numbered in group
order), encoded by kvpack's codec with the plugin's QuantSettings. The container's meta records
what LMCache needs to allocate the memory object again on a get -- format, group shapes and the
head split -- so partial chunks (fewer than chunk_size tokens) come back with their own shape::

    lmcache.fmt        "KV_2LTD"
    lmcache.shapes     "[[2, 32, 256, 1024]]"     one shape per group
    lmcache.head_dims  "[128]"                    d of each group's [1, H, T, d] layers
    lmcache.key        the LMCache key string (when it fits the meta limits), for audits
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvpack import codec
from kvpack.client.lmcache import layout
from kvpack.codec import QuantSettings

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_META_CHARS = 4096


@dataclass(frozen=True)
class ChunkLayout:
    """What a stored chunk decodes to: format name, per-group shapes, dtype, per-group d."""

    fmt: str
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    head_dims: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the chunk in LMCache's memory (all groups)."""
        size = torch.empty(0, dtype=self.dtype).element_size()
        total = 0
        for shape in self.shapes:
            n = 1
            for dim in shape:
                n *= dim
            total += n * size
        return total


def chunk_settings(settings: QuantSettings, tokens: int) -> QuantSettings:
    """``settings`` with block_tokens fitted to a chunk of ``tokens`` tokens.

    The codec cuts a stream into whole blocks and keeps the remaining tokens in full precision.
    A full 256-token chunk splits evenly into the default 64-token blocks, but a partial chunk
    (the end of a prompt, ``save_unfull_chunk``) of 100 tokens would keep 36 of them raw. With no
    windows, the block size closest to the configured one within [1/2, 2]x of it that divides
    ``tokens`` is used instead (100 tokens: 2 blocks of 50; 77: one of 77); a chunk shorter than
    half a block is one block. If none divides, or windows are set, ``settings`` stay as given.
    """
    target = settings.block_tokens
    if settings.k_window or settings.v_window or tokens <= 0 or tokens % target == 0:
        return settings
    if tokens < target // 2:
        return dataclasses.replace(settings, block_tokens=tokens)
    fits = [b for b in range(max(1, target // 2), 2 * target + 1) if tokens % b == 0]
    if not fits:
        return settings
    return dataclasses.replace(settings, block_tokens=min(fits, key=lambda b: (abs(b - target), b)))


def encode_chunk(
    tensors: Sequence[torch.Tensor],
    fmt: str,
    head_dim: int | None,
    settings: QuantSettings,
    key: str | None = None,
) -> bytes:
    """Container bytes of a chunk's group tensors (format ``fmt``); ``head_dim`` splits each
    token's hidden vector into heads (None or a non-divisor: one head). ValueError when the
    tensors are not one float dtype or do not fit ``fmt``."""
    if not tensors:
        raise ValueError("a chunk has at least one tensor")
    settings = chunk_settings(settings, layout.num_tokens(tensors[0].shape, fmt))
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or next(iter(dtypes)) not in FLOAT_DTYPES:
        raise ValueError(
            f"chunk tensors must share one of fp16/bf16/fp32, got {sorted(map(str, dtypes))}"
        )
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    head_dims = []
    for t in tensors:
        for k, v in layout.layers(t, fmt, head_dim):
            keys.append(k)
            values.append(v)
        head_dims.append(int(keys[-1].shape[-1]))
    meta = {
        "lmcache.fmt": fmt,
        "lmcache.shapes": json.dumps([list(t.shape) for t in tensors]),
        "lmcache.head_dims": json.dumps(head_dims),
    }
    if key is not None and len(key) <= MAX_META_CHARS:
        meta["lmcache.key"] = key
    return codec.encode(keys, values, settings=settings, meta=meta)


def read_layout(blob: bytes | bytearray | memoryview) -> ChunkLayout:
    """The chunk layout recorded in a container's header (FormatError if it has none or it
    contradicts the container's layers)."""
    header = codec.read_header(blob)
    meta = header.meta
    try:
        fmt = meta["lmcache.fmt"]
        shapes = tuple(tuple(int(d) for d in s) for s in json.loads(meta["lmcache.shapes"]))
        head_dims = tuple(int(d) for d in json.loads(meta["lmcache.head_dims"]))
        dtype = codec.dtype_from_name(header.dtype)
        for shape in shapes:
            layout.check_format(fmt, shape)
    except (KeyError, ValueError, TypeError) as e:
        raise codec.FormatError(f"not an LMCache chunk container: {e}") from None
    if len(head_dims) != len(shapes):
        raise codec.FormatError("lmcache.head_dims and lmcache.shapes differ in length")
    expected = sum(layout.num_layers(s, fmt) for s in shapes)
    if expected != header.num_layers:
        raise codec.FormatError(
            f"chunk of {expected} layers in a {header.num_layers}-layer container"
        )
    return ChunkLayout(fmt, shapes, dtype, head_dims)


def decode_into(
    blob: bytes | bytearray | memoryview, tensors: Sequence[torch.Tensor], chunk: ChunkLayout
) -> None:
    """Decode a container into ``tensors`` (the memory object's groups, shaped as ``chunk``),
    straight through the layout views: no intermediate tensors. Every section is checksummed
    first; FormatError on damage or a shape mismatch, in which case ``tensors`` may hold partial
    data (the caller releases them)."""
    shapes = [tuple(t.shape) for t in tensors]
    if shapes != list(chunk.shapes):
        raise codec.FormatError(f"destination shapes {shapes} != {chunk.shapes}")
    views = [
        kv
        for t, d in zip(tensors, chunk.head_dims, strict=True)
        for kv in layout.layers(t, chunk.fmt, d)
    ]
    header = codec.read_header(blob)
    want = [(tuple(k.shape), tuple(v.shape)) for k, v in views]
    have = list(zip(header.k_shapes, header.v_shapes, strict=True))
    if want != have:
        raise codec.FormatError(f"container layers {have} do not fit the chunk's {want}")
    codec.decode(blob, into=views)
