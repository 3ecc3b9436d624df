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
    spec: StreamSpec, blocks: Sequence[Block], shape: tuple[int, int, int, int], version: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """(anchors float32 [nb, G], steps float32 [nb, G], symbol counts int64 [nb], metadata
    bytes per block) of a quantised stream's blocks in container `version` (block_meta).
    ValueError naming the first bad block: malformed metadata, a coder of another mode, a
    non-finite anchor or step, or a negative step."""
    g, m = spec.group_shape(shape)
    fixed = spec.mode == "fixed"
    wrong = [i for i, (coder, _) in enumerate(blocks) if (coder == "fixed") != fixed]
    if wrong:
        raise ValueError(
            f"block {wrong[0]}: coder {blocks[wrong[0]][0]!r} does not belong to mode {spec.mode!r}"
        )
    mn, step, heads = block_meta.decode_meta([data for _, data in blocks], g, version)
    counts = (step != 0).sum(axis=1).astype(np.int64) * m
    return mn, step, counts, heads


def check_block(
    spec: StreamSpec,
    block: Block,
    shape: tuple[int, int, int, int],
    dtype: str,
    codebook: tuple[int, ...] | None,
    version: int,
) -> int:
    """Structural check of one block of container `version` (sizes, metadata, coder framing; no
    symbol decoding). Returns the number of coded symbols. ValueError subclasses on any
    inconsistency."""
    coder, data = block
    b, h, _, d = shape
    if spec.mode == "lossless":
        if coder != "lossless":
            raise ValueError(f"coder {coder!r} in a lossless container")
        lossless.check_frame(data, b * h * spec.block_tokens * d * itemsize(dtype))
        return 0
    _, _, counts, heads = stream_meta(spec, [block], shape, version)
    lengths = np.array(codebook, dtype=np.uint8) if codebook is not None else None
    entropy.check_symbol_block(coder, data[heads[0] :], int(counts[0]), spec, lengths)
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
    version: int = 2,
) -> torch.Tensor:
    """Decode one stream to a tensor of `shape` [B, H, n, d] and `dtype` on `device`, written
    into `out` when given (a CPU tensor of that shape and dtype, any strides; no allocation
    and no first-touch page faults when it is reused). `version`: the container format of the
    blocks. Block metadata, coder framing, Huffman
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
        mn, step, counts, heads = stream_meta(spec, blocks, shape, version)
        lengths = np.array(codebook, dtype=np.uint8) if codebook is not None else None
        payloads = [p[head:] for (_, p), head in zip(blocks, heads, strict=True)]
        syms = entropy.decode_symbol_blocks([c for c, _ in blocks], payloads, counts, spec, lengths)
        quant.dequantize_blocks(syms, mn, step, spec.grouping, spec.levels, out, t)
    return out if device is None else out.to(device)
