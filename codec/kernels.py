"""numba kernels for the codec's per-symbol loops: Huffman and fixed-width bit streams, histograms.

Each kernel is one pass over the symbols in compiled code. The numpy formulations they replace
needed ~20 whole-array passes per symbol (Huffman encode) or one numpy call per symbol position
(lock-step lane decoding). Kernels release the GIL (the server encodes in a thread pool) and are
cached on disk next to this module; where no cache directory is writable they compile once per
process instead (seconds on first use; `warm_up` does it up front).

Integers are int64 throughout the kernels: numba turns mixed uint64/int64 arithmetic into
float64, which would silently lose bits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numpy as np
from numba import njit

F = TypeVar("F", bound=Callable[..., Any])


def _kernel(fn: F) -> F:
    """njit(nogil, cache); without a writable cache location numba refuses `cache=True` at
    decoration time, so fall back to compiling in memory rather than failing the import."""
    try:
        return cast(F, njit(nogil=True, cache=True)(fn))
    except RuntimeError:
        return cast(F, njit(nogil=True)(fn))


@_kernel
def block_histograms(symbols: np.ndarray, counts: np.ndarray, n_levels: int) -> np.ndarray:
    """Symbol histogram per block: int64 [len(counts), n_levels]; block i holds the next
    counts[i] entries of the 1-D non-negative `symbols`. ValueError if one is >= n_levels."""
    out = np.zeros((len(counts), n_levels), dtype=np.int64)
    pos = 0
    for b in range(len(counts)):
        row = out[b]
        for i in range(pos, pos + counts[b]):
            s = symbols[i]
            if s >= n_levels:
                raise ValueError("symbol outside the alphabet")
            row[s] += 1
        pos += counts[b]
    return out


@_kernel
def huffman_encode(
    symbols: np.ndarray,
    counts: np.ndarray,
    table: np.ndarray,
    lane_symbols: int,
    out: np.ndarray,
    starts: np.ndarray,
) -> np.ndarray:
    """Huffman-code consecutive blocks of `symbols` (block b holds counts[b]) into `out` (uint8).

    table: int64 [A] canonical code << 5 | code length in bits (0 = no code) per symbol. Block b's
    payload (lane table of uint16 LE lane bit lengths, then the codes MSB first, zero-padded to
    a byte) is written at out[starts[b]:], which must leave room for 2 bytes per lane plus
    2 bytes per symbol (codes are <= 16 bits). Returns the payload sizes in bytes (int64 [nb]),
    or -1 as the first size if some symbol has no code (length 0).
    """
    sizes = np.zeros(len(counts), dtype=np.int64)
    pos = 0
    for b in range(len(counts)):
        c = counts[b]
        nlanes = (c + lane_symbols - 1) // lane_symbols
        base = starts[b]
        w = base + 2 * nlanes
        acc = 0  # pending bits in the low `nbits` bits; bits above them are already written
        nbits = 0
        for lane in range(nlanes):
            lo = pos + lane * lane_symbols
            hi = min(pos + c, lo + lane_symbols)
            lane_bits = 0
            # Two codes per step (<= 32 bits together): at most 31 + 32 = 63 pending bits, one
            # flush check per pair. table[s] = code << 5 | length.
            for i in range(lo, hi - 1, 2):
                e0 = table[symbols[i]]
                e1 = table[symbols[i + 1]]
                l0 = e0 & 31
                l1 = e1 & 31
                if l0 == 0 or l1 == 0:
                    sizes[0] = -1
                    return sizes
                ln = l0 + l1
                acc = (acc << ln) | ((e0 >> 5) << l1) | (e1 >> 5)
                nbits += ln
                lane_bits += ln
                if nbits >= 32:
                    nbits -= 32
                    v = acc >> nbits
                    out[w] = (v >> 24) & 0xFF
                    out[w + 1] = (v >> 16) & 0xFF
                    out[w + 2] = (v >> 8) & 0xFF
                    out[w + 3] = v & 0xFF
                    w += 4
                    acc &= (1 << nbits) - 1
            if (hi - lo) % 2:  # odd lane (only a block's last): its last code on its own
                e0 = table[symbols[hi - 1]]
                ln = e0 & 31
                if ln == 0:
                    sizes[0] = -1
                    return sizes
                acc = (acc << ln) | (e0 >> 5)
                nbits += ln
                lane_bits += ln
                if nbits >= 32:
                    nbits -= 32
                    v = acc >> nbits
                    out[w] = (v >> 24) & 0xFF
                    out[w + 1] = (v >> 16) & 0xFF
                    out[w + 2] = (v >> 8) & 0xFF
                    out[w + 3] = v & 0xFF
                    w += 4
                    acc &= (1 << nbits) - 1
            out[base + 2 * lane] = lane_bits & 0xFF
            out[base + 2 * lane + 1] = lane_bits >> 8
        while nbits >= 8:
            nbits -= 8
            out[w] = (acc >> nbits) & 0xFF
            w += 1
        if nbits > 0:
            out[w] = (acc << (8 - nbits)) & 0xFF
            w += 1
        sizes[b] = w - base
        pos += c
    return sizes


# Multi-symbol decode table: MULTI_BITS-bit peek -> up to 3 whole codes inside those bits.
MULTI_BITS = 12


@_kernel
def multi_table(table: np.ndarray, max_bits: int) -> np.ndarray:
    """int64 [2^MULTI_BITS] table for huffman_decode from the single-code table (uint32
    [2^max_bits], length << 16 | symbol, length 0 = no code). Entry for the next MULTI_BITS bits:
    k | bits << 2 | s0 << 8 | s1 << 24 | s2 << 40 with k (0..3) the whole codes the bits start
    with and `bits` their total length; k = 0 when the first code is longer or invalid."""
    out = np.zeros(1 << MULTI_BITS, dtype=np.int64)
    for p in range(1 << MULTI_BITS):
        k = 0
        used = np.int64(0)
        entry = np.int64(0)
        while k < 3:
            # Bits past the MULTI_BITS are zero here, so accept only codes that end inside them.
            window = ((p << used) & ((1 << MULTI_BITS) - 1)) << (max_bits - MULTI_BITS)
            e = np.int64(table[window])
            ln = e >> 16
            if ln == 0 or used + ln > MULTI_BITS:
                break
            entry |= (e & 0xFFFF) << (8 + 16 * k)
            used += ln
            k += 1
        out[p] = entry | k | (used << 2)
    return out


@_kernel
def huffman_decode(
    buf: np.ndarray,
    offsets: np.ndarray,
    counts: np.ndarray,
    table: np.ndarray,
    multi: np.ndarray,
    lane_symbols: int,
    max_bits: int,
    out: np.ndarray,
) -> int:
    """Decode Huffman blocks; block b's payload is buf[offsets[b]:offsets[b+1]] (uint8) holding
    counts[b] symbols, written consecutively to `out` (uint16).

    table: uint32 [2^max_bits] single-code table (length << 16 | symbol; length 0 = no code);
    multi: its multi_table. `buf` must extend at least lane_symbols * max_bits / 8 + 8 bytes past
    the last payload, so a corrupt lane that runs past its end still reads inside `buf`. Returns
    -1 when every block is valid, else the index of the first block whose lane table, stream
    size, codes or lane lengths are inconsistent (checks as huffman.split_payload, plus every
    code valid and every lane ending exactly at its stored bit length).
    """
    peek_mask = (1 << MULTI_BITS) - 1
    code_mask = (1 << max_bits) - 1
    pos_out = 0
    for b in range(len(counts)):
        c = counts[b]
        base = offsets[b]
        size = offsets[b + 1] - base
        nlanes = (c + lane_symbols - 1) // lane_symbols
        if size < 2 * nlanes:
            return b
        total = np.int64(0)
        for lane in range(nlanes):
            lb = np.int64(buf[base + 2 * lane]) | (np.int64(buf[base + 2 * lane + 1]) << 8)
            per_lane = min(lane_symbols, c - lane * lane_symbols)
            if lb < per_lane or lb > per_lane * max_bits:
                return b
            total += lb
        if (total + 7) // 8 != size - 2 * nlanes:
            return b
        start = 8 * (base + 2 * nlanes)
        for lane in range(nlanes):
            lb = np.int64(buf[base + 2 * lane]) | (np.int64(buf[base + 2 * lane + 1]) << 8)
            left = min(lane_symbols, c - lane * lane_symbols)
            # Bit reader: the next `avail` stream bits are the low bits of acc (bits above are
            # stale). Refilling 32 bits whenever fewer remain keeps the byte loads off the
            # decode's dependency chain; avail stays <= 63.
            r = start >> 3
            acc = np.int64(0)
            avail = -(start & 7)
            used = 0
            while left > 0:
                if avail < 32:
                    acc = (
                        (acc << 32)
                        | (np.int64(buf[r]) << 24)
                        | (np.int64(buf[r + 1]) << 16)
                        | (np.int64(buf[r + 2]) << 8)
                        | np.int64(buf[r + 3])
                    )
                    r += 4
                    avail += 32
                    continue
                e = multi[(acc >> (avail - MULTI_BITS)) & peek_mask]
                k = e & 3
                if k > 0 and left >= 3:  # all three slots lie in this lane; k of them count
                    out[pos_out] = (e >> 8) & 0xFFFF
                    out[pos_out + 1] = (e >> 24) & 0xFFFF
                    out[pos_out + 2] = (e >> 40) & 0xFFFF
                    n = (e >> 2) & 0x3F
                    pos_out += k
                    left -= k
                else:  # one code at a time: long codes, invalid bits, a lane's last symbols
                    e = np.int64(table[(acc >> (avail - max_bits)) & code_mask])
                    n = e >> 16
                    if n == 0:
                        return b
                    out[pos_out] = e & 0xFFFF
                    pos_out += 1
                    left -= 1
                avail -= n
                used += n
            if used != lb:
                return b
            start += lb
    return -1


@_kernel
def pack_fixed(symbols: np.ndarray, bits: int) -> np.ndarray:
    """Pack 1-D non-negative symbols (< 2^bits, bits <= 16) with `bits` bits each, MSB first,
    zero-padded to a byte: uint8 [ceil(len * bits / 8)]."""
    n = len(symbols)
    out = np.zeros((n * bits + 7) // 8, dtype=np.uint8)
    mask = (1 << bits) - 1
    acc = np.int64(0)
    nbits = 0
    w = 0
    for i in range(n):
        acc = (acc << bits) | (np.int64(symbols[i]) & mask)
        nbits += bits
        while nbits >= 8:
            nbits -= 8
            out[w] = (acc >> nbits) & 0xFF
            w += 1
        acc &= (1 << nbits) - 1
    if nbits > 0:
        out[w] = (acc << (8 - nbits)) & 0xFF
    return out


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


def warm_up() -> None:
    """Compile (or load from the cache) every kernel for the argument types the codec uses, so
    the first request does not pay the JIT time (seconds when no cache is available)."""
    from kvpack.codec import huffman  # imports this module, so not at the top

    for dtype in (np.uint8, np.uint16):
        syms = np.array([0, 1, 1, 2], dtype=dtype)
        counts = np.array([4], dtype=np.int64)
        lengths = huffman.code_lengths(block_histograms(syms, counts, 3)[0])
        payloads = huffman.encode_blocks(syms, counts, lengths)
        huffman.decode_blocks(payloads, [4], lengths)
        unpack_fixed(pack_fixed(syms, 2), 4, 2)
