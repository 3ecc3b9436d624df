"""Check and decode one stream (a layer's K or V) from its block sections and window section.

A stream's block metadata (group minima and steps) is read and checked for all blocks at once;
each coder decodes all of its blocks in one call (entropy.CODERS) and one dequantisation kernel
writes every block into the output tensor, so the Python work per block is a few slices.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kvpack.codec import entropy, lossless, quant
from kvpack.codec.rawbytes import dtype_from_name, itemsize
from kvpack.codec.stream import StreamSpec

Block = tuple[str, bytes | memoryview]  # (coder, section bytes)


def stream_meta(
    spec: StreamSpec, blocks: Sequence[Block], shape: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(meta float32 [nb, 2G]: minima then steps, symbol counts int64 [nb]) of a lossy stream's
    blocks. ValueError naming the first bad block: too short, a coder of another mode, a
    non-finite minimum or step, or a negative step."""
    g, m = spec.group_shape(shape)
    head = 8 * g
    short = [i for i, (_, data) in enumerate(blocks) if len(data) < head]
    if short:
        raise ValueError(f"block {short[0]}: cannot hold {g} group minima and steps")
    fixed = spec.mode == "fixed"
    wrong = [i for i, (coder, _) in enumerate(blocks) if (coder == "fixed") != fixed]
    if wrong:
        raise ValueError(
            f"block {wrong[0]}: coder {blocks[wrong[0]][0]!r} does not belong to mode {spec.mode!r}"
        )
    raw = b"".join([data[:head] for _, data in blocks])
    meta = np.frombuffer(raw, dtype="<f4").reshape(len(blocks), 2 * g).astype(np.float32)
    bad = ~np.isfinite(meta).all(axis=1) | (meta[:, g:] < 0).any(axis=1)
    if bad.any():
        raise ValueError(f"block {int(np.argmax(bad))}: non-finite group minimum or negative step")
    counts = (meta[:, g:] != 0).sum(axis=1).astype(np.int64) * m
    return meta, counts


def check_block(
    spec: StreamSpec,
    block: Block,
    shape: tuple[int, int, int, int],
    dtype: str,
    codebook: tuple[int, ...] | None,
) -> int:
    """Structural check of one block (sizes, metadata, coder framing; no symbol decoding).
    Returns the number of coded symbols. ValueError subclasses on any inconsistency."""
    coder, data = block
    b, h, _, d = shape
    if spec.mode == "lossless":
        if coder != "lossless":
            raise ValueError(f"coder {coder!r} in a lossless container")
        lossless.check_frame(data, b * h * spec.block_tokens * d * itemsize(dtype))
        return 0
    _, counts = stream_meta(spec, [block], shape)
    g, _ = spec.group_shape(shape)
    lengths = np.array(codebook, dtype=np.uint8) if codebook is not None else None
    entropy.check_symbol_block(coder, data[8 * g :], int(counts[0]), spec, lengths)
    return int(counts[0])


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
) -> torch.Tensor:
    """Decode one stream to a tensor of `shape` [B, H, n, d] and `dtype` on `device`, written
    into `out` when given (a CPU tensor of that shape and dtype, any strides; no allocation
    and no first-touch page faults when it is reused). Block metadata, coder framing, Huffman
    codes and symbol ranges are all checked while decoding; ValueError subclasses on any
    inconsistency."""
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
        meta, counts = stream_meta(spec, blocks, shape)
        g = meta.shape[1] // 2
        lengths = np.array(codebook, dtype=np.uint8) if codebook is not None else None
        syms = entropy.decode_symbol_blocks(
            [c for c, _ in blocks], [p[8 * g :] for _, p in blocks], counts, spec, lengths
        )
        quant.dequantize_blocks(syms, meta[:, :g], meta[:, g:], spec.grouping, spec.levels, out, t)
    return out if device is None else out.to(device)
