"""Check and decode one stream (a layer's K or V) from its block sections and window section.

A stream's group metadata (anchors and steps: v2's metadata section, or v1's fp32 at each block's
start) is read and checked for all blocks at once; each coder decodes all of its blocks in one
call (entropy.CODERS) and one dequantisation kernel per run of equally long blocks writes them
into the output tensor, so the Python work per block is a few slices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvpack.codec import block_meta, entropy, lossless, quant
from kvpack.codec.rawbytes import dtype_from_name, itemsize
from kvpack.codec.stream import StreamSpec, group_shape

Block = tuple[str, bytes | memoryview]  # (coder, section bytes)


@dataclass(frozen=True)
class StreamMeta:
    """A quantised stream's group metadata, all blocks at once: anchors and steps (float32 [N],
    every block's groups in block-major order; block i's are [gstart[i], gstart[i+1])), the
    symbols each block codes (int64 [nb]) and the metadata bytes at each block's start (v1)."""

    mn: np.ndarray
    step: np.ndarray
    gstart: np.ndarray
    counts: np.ndarray
    heads: list[int]


def stream_meta(
    spec: StreamSpec,
    blocks: Sequence[Block],
    shape: tuple[int, int, int, int],
    meta: Block | None,
    sizes: Sequence[int] | None = None,
) -> StreamMeta:
    """The group metadata of a quantised stream's blocks of `sizes` tokens each (default: all
    block_tokens): from its v2 metadata section `meta` (coder, bytes), or from each block's
    start (v1, meta None). ValueError naming the first bad block or group: malformed metadata,
    a coder of another mode, a non-finite anchor or step, or a negative step."""
    nb = len(blocks)
    sizes = [spec.block_tokens] * nb if sizes is None else list(sizes)
    fixed = spec.mode == "fixed"
    wrong = [i for i, (coder, _) in enumerate(blocks) if (coder == "fixed") != fixed]
    if wrong:
        raise ValueError(
            f"block {wrong[0]}: coder {blocks[wrong[0]][0]!r} does not belong to mode {spec.mode!r}"
        )
    shapes = {t: group_shape(spec.grouping, shape, t) for t in set(sizes)}
    groups = np.array([shapes[t][0] for t in sizes], dtype=np.int64)
    per_group = np.array([shapes[t][1] for t in sizes], dtype=np.int64)
    gstart = np.concatenate(([0], np.cumsum(groups))).astype(np.int64)
    if meta is None:
        g = int(groups[0]) if nb else 0
        mn, step = (a.reshape(-1) for a in block_meta.decode_v1([data for _, data in blocks], g))
        heads = [8 * g] * nb
    else:
        try:
            codes = block_meta.StreamCodes.decode(meta[0], meta[1], int(gstart[-1]))
            mn, step = codes.values()
        except ValueError as err:
            raise ValueError(f"metadata: {err}") from None
        heads = [0] * nb
    live = np.concatenate(([0], np.cumsum(step != 0)))
    counts = (live[gstart[1:]] - live[gstart[:-1]]) * per_group
    return StreamMeta(mn, step, gstart, counts.astype(np.int64), heads)


def check_stream(
    spec: StreamSpec,
    blocks: Sequence[Block],
    shape: tuple[int, int, int, int],
    dtype: str,
    codebook: tuple[int, ...] | None,
    meta: Block | None,
    sizes: Sequence[int] | None = None,
) -> None:
    """Structural check of a stream's blocks (of `sizes` tokens, default all block_tokens) and
    metadata (sizes, metadata values, coder framing; no symbol decoding). ValueError
    subclasses naming the block on any inconsistency."""
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
    sm = stream_meta(spec, blocks, shape, meta, sizes)
    lengths = np.array(codebook, dtype=np.uint8) if codebook is not None else None
    for i, ((coder, data), head) in enumerate(zip(blocks, sm.heads, strict=True)):
        try:
            entropy.check_symbol_block(coder, data[head:], int(sm.counts[i]), spec, lengths)
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
    sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """Decode one stream to a tensor of `shape` [B, H, n, d] and `dtype` on `device`, written
    into `out` when given (a CPU tensor of that shape and dtype, any strides; no allocation
    and no first-touch page faults when it is reused). `meta`: the stream's v2 metadata section
    (coder, bytes); None for v1 blocks, which start with their own. `sizes`: tokens per block
    (default: block_tokens each; v2 blocks may be shorter). Block metadata, coder framing,
    Huffman codes and symbol ranges are all checked while decoding; ValueError subclasses on
    any inconsistency."""
    b, h, n, d = shape
    t = spec.block_tokens
    nb = len(blocks)
    sizes = [t] * nb if sizes is None else list(sizes)
    held = sum(sizes)
    torch_dtype = dtype_from_name(dtype)
    if out is None:
        out = torch.empty(shape, dtype=torch_dtype)
    elif tuple(out.shape) != tuple(shape) or out.dtype != torch_dtype or out.device.type != "cpu":
        raise ValueError(f"out must be a CPU {dtype} tensor of shape {shape}")
    tail = out[:, :, held:]
    if tail.is_contiguous():
        _unshuffle_into(window, tail)
    else:
        part = torch.empty((b, h, n - held, d), dtype=torch_dtype)
        _unshuffle_into(window, part)
        tail.copy_(part)
    if nb and spec.mode == "lossless":
        part = torch.empty((b, h, t, d), dtype=torch_dtype)
        for i, (_, data) in enumerate(blocks):
            _unshuffle_into(data, part)
            out[:, :, i * t : (i + 1) * t].copy_(part)
    elif nb:
        sm = stream_meta(spec, blocks, shape, meta, sizes)
        lengths = np.array(codebook, dtype=np.uint8) if codebook is not None else None
        payloads = [p[head:] for (_, p), head in zip(blocks, sm.heads, strict=True)]
        syms = entropy.decode_symbol_blocks(
            [c for c, _ in blocks], payloads, sm.counts, spec, lengths
        )
        sym_start = np.concatenate(([0], np.cumsum(sm.counts)))
        # One dequantisation call per run of equally long blocks (normally: the whole blocks,
        # then one short last block).
        i = pos = 0
        while i < nb:
            j = i
            while j < nb and sizes[j] == sizes[i]:
                j += 1
            g0, g1 = int(sm.gstart[i]), int(sm.gstart[j])
            g = (g1 - g0) // (j - i)
            run_mn = sm.mn[g0:g1].reshape(j - i, g)
            run_step = sm.step[g0:g1].reshape(j - i, g)
            run_syms = syms[int(sym_start[i]) : int(sym_start[j])]
            target = out if pos == 0 else out[:, :, pos:]
            try:
                quant.dequantize_blocks(
                    run_syms, run_mn, run_step, spec.grouping, spec.levels, target, sizes[i]
                )
            except ValueError as err:
                raise ValueError(f"blocks {i}-{j - 1}: {err}") from None
            pos += (j - i) * sizes[i]
            i = j
    return out if device is None else out.to(device)
