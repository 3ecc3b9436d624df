"""Check and decode one stream (a layer's K or V) from its block sections and window section.

A stream's block metadata (group minima and steps) is read and checked for all blocks at once;
each coder decodes all of its blocks in one call (entropy.CODERS) and one dequantisation kernel
writes every block into the output tensor, so the Python work per block is a few slices.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kvpack.codec import block_meta, entropy, lossless, quant
from kvpack.codec.rawbytes import dtype_from_name, itemsize
from kvpack.codec.stream import StreamSpec

Block = tuple[str, bytes | memoryview]  # (coder, section bytes)


def stream_meta(
    spec: StreamSpec,
    blocks: Sequence[Block],
    shape: tuple[int, int, int, int],
    meta: Block | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """(anchors float32 [nb, G], steps float32 [nb, G], symbol counts int64 [nb], metadata
    bytes at the start of each block) of a quantised stream's blocks: from its v2 metadata
    section `meta` (coder, bytes), or from each block's start (v1, meta None). ValueError
    naming the first bad block: malformed metadata, a coder of another mode, a non-finite
    anchor or step, or a negative step."""
    g, m = spec.group_shape(shape)
    fixed = spec.mode == "fixed"
    wrong = [i for i, (coder, _) in enumerate(blocks) if (coder == "fixed") != fixed]
    if wrong:
        raise ValueError(
            f"block {wrong[0]}: coder {blocks[wrong[0]][0]!r} does not belong to mode {spec.mode!r}"
        )
    if meta is None:
        mn, step = block_meta.decode_v1([data for _, data in blocks], g)
        heads = [8 * g] * len(blocks)
    else:
        try:
            mn, step = block_meta.decode_stream_meta(meta[0], meta[1], len(blocks), g)
        except ValueError as err:
            raise ValueError(f"metadata: {err}") from None
        heads = [0] * len(blocks)
    counts = (step != 0).sum(axis=1).astype(np.int64) * m
    return mn, step, counts, heads


def check_stream(
    spec: StreamSpec,
    blocks: Sequence[Block],
    shape: tuple[int, int, int, int],
    dtype: str,
    codebook: tuple[int, ...] | None,
    meta: Block | None,
) -> None:
    """Structural check of a stream's blocks and metadata (sizes, metadata values, coder
    framing; no symbol decoding). ValueError subclasses naming the block on any
    inconsistency."""
    b, h, _, d = shape
    if spec.mode == "lossless":
        for i, (coder, data) in enumerate(blocks):
            try:
                if coder != "lossless":
                    raise ValueError(f"coder {coder!r} in a lossless container")
                lossless.check_frame(data, b * h * spec.block_tokens * d * itemsize(dtype))
            except ValueError as err:
                raise ValueError(f"block {i}: {err}") from None
        return
    _, _, counts, heads = stream_meta(spec, blocks, shape, meta)
    lengths = np.array(codebook, dtype=np.uint8) if codebook is not None else None
    for i, ((coder, data), head) in enumerate(zip(blocks, heads, strict=True)):
        try:
            entropy.check_symbol_block(coder, data[head:], int(counts[i]), spec, lengths)
        except ValueError as err:
            raise ValueError(f"block {i}: {err}") from None


def _unshuffle_into(payload: bytes | memoryview, out: torch.Tensor) -> None:
    """Decode a lossless (shuffled zstd) section into the contiguous CPU tensor `out`."""
    size = out.element_size()
    if out.numel() == 0:
        lossless.zstd_exact(payload, 0)
        return
    lossless.unshuffle_into(payload, size, out.view(torch.uint8).numpy().reshape(-1, size))


def decode_stream(
    spec: StreamSpec,
    blocks: Sequence[Block],
    window: bytes | memoryview,
    shape: tuple[int, int, int, int],
    dtype: str,
    codebook: tuple[int, ...] | None,
    device: torch.device | str | None,
    out: torch.Tensor | None = None,
    meta: Block | None = None,
) -> torch.Tensor:
    """Decode one stream to a tensor of `shape` [B, H, n, d] and `dtype` on `device`, written
    into `out` when given (a CPU tensor of that shape and dtype, any strides; no allocation
    and no first-touch page faults when it is reused). `meta`: the stream's v2 metadata section
    (coder, bytes); None for v1 blocks, which start with their own. Block metadata, coder
    framing, Huffman codes and symbol ranges are all checked while decoding; ValueError
    subclasses on any inconsistency."""
    b, h, n, d = shape
    t = spec.block_tokens
    nb = len(blocks)
    torch_dtype = dtype_from_name(dtype)
    if out is None:
        out = torch.empty(shape, dtype=torch_dtype)
    elif tuple(out.shape) != tuple(shape) or out.dtype != torch_dtype or out.device.type != "cpu":
        raise ValueError(f"out must be a CPU {dtype} tensor of shape {shape}")
    tail = out[:, :, nb * t :]
    if tail.is_contiguous():
        _unshuffle_into(window, tail)
    else:
        part = torch.empty((b, h, n - nb * t, d), dtype=torch_dtype)
        _unshuffle_into(window, part)
        tail.copy_(part)
    if nb and spec.mode == "lossless":
        part = torch.empty((b, h, t, d), dtype=torch_dtype)
        for i, (_, data) in enumerate(blocks):
            _unshuffle_into(data, part)
            out[:, :, i * t : (i + 1) * t].copy_(part)
    elif nb:
        mn, step, counts, heads = stream_meta(spec, blocks, shape, meta)
        lengths = np.array(codebook, dtype=np.uint8) if codebook is not None else None
        payloads = [p[head:] for (_, p), head in zip(blocks, heads, strict=True)]
        syms = entropy.decode_symbol_blocks([c for c, _ in blocks], payloads, counts, spec, lengths)
        quant.dequantize_blocks(syms, mn, step, spec.grouping, spec.levels, out, t)
    return out if device is None else out.to(device)
