"""Fixed-width bit packing of the KIVI-style baseline: `bits` bits per symbol, MSB first."""

from __future__ import annotations

import numpy as np

from kvpack.codec.kernels.jit import _kernel


@_kernel
def pack_fixed(symbols: np.ndarray, bits: int) -> np.ndarray:
    """Pack 1-D non-negative symbols (< 2^bits, bits <= 16) with `bits` bits each, MSB first,
    zero-padded to a byte: uint8 [ceil(len * bits / 8)]."""
    counts = np.full(1, len(symbols), dtype=np.int64)
    return pack_fixed_blocks(symbols, counts, bits)[0]


@_kernel
def unpack_fixed(data: np.ndarray, count: int, bits: int) -> np.ndarray:
    """Inverse of pack_fixed: `count` symbols (uint16 [count]) of `bits` bits from uint8 `data`,
    which must hold at least ceil(count * bits / 8) bytes."""
    out = np.empty(count, dtype=np.uint16)
    n = len(data)
    mask = (1 << bits) - 1
    acc = np.int64(0)
    nbits = 0
    r = 0
    for i in range(count):
        while nbits < bits:
            byte = np.int64(data[r]) if r < n else 0
            acc = ((acc << 8) | byte) & 0xFFFFFF
            nbits += 8
            r += 1
        nbits -= bits
        out[i] = (acc >> nbits) & mask
    return out


@_kernel
def pack_fixed_blocks(
    symbols: np.ndarray, counts: np.ndarray, bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """pack_fixed of each of the consecutive blocks of `symbols` (block b holds counts[b]), in
    one call: (payloads back to back as uint8, int64 [nb + 1] payload offsets)."""
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    for b in range(len(counts)):
        offsets[b + 1] = offsets[b] + (counts[b] * bits + 7) // 8
    out = np.zeros(offsets[-1], dtype=np.uint8)
    mask = (1 << bits) - 1
    pos = 0
    for b in range(len(counts)):
        acc = np.int64(0)
        nbits = 0
        w = offsets[b]
        for i in range(pos, pos + counts[b]):
            acc = (acc << bits) | (np.int64(symbols[i]) & mask)
            nbits += bits
            while nbits >= 8:
                nbits -= 8
                out[w] = (acc >> nbits) & 0xFF
                w += 1
            acc &= (1 << nbits) - 1
        if nbits > 0:
            out[w] = (acc << (8 - nbits)) & 0xFF
        pos += counts[b]
    return out, offsets


@_kernel
def unpack_fixed_blocks(
    data: np.ndarray,
    offsets: np.ndarray,
    counts: np.ndarray,
    bits: int,
    out: np.ndarray,
    out_pos: np.ndarray,
) -> int:
    """Inverse of pack_fixed_blocks: block b's counts[b] symbols from data[offsets[b]:
    offsets[b+1]] into out[out_pos[b]:] (uint8 or uint16). Returns -1, or the first block whose
    payload is not exactly ceil(counts[b] * bits / 8) bytes (nothing of it written)."""
    mask = (1 << bits) - 1
    for b in range(len(counts)):
        r = offsets[b]
        if offsets[b + 1] - r != (counts[b] * bits + 7) // 8:
            return b
        acc = np.int64(0)
        nbits = 0
        p = out_pos[b]
        for i in range(counts[b]):
            while nbits < bits:
                acc = ((acc << 8) | np.int64(data[r])) & 0xFFFFFF
                nbits += 8
                r += 1
            nbits -= bits
            out[p + i] = (acc >> nbits) & mask
    return -1
