"""Huffman decoding: a multi-symbol lookup table and a four-lane decoder (format: huffman.py)."""

from __future__ import annotations

import numpy as np
from numba import njit

from kvpack.codec.kernels.jit import _kernel

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


@njit(nogil=True, error_model="numpy")
def _load32(buf: np.ndarray, r: int) -> np.int64:
    """Big-endian 32 bits of buf[r:r+4] (int64)."""
    return (
        (np.int64(buf[r]) << 24)
        | (np.int64(buf[r + 1]) << 16)
        | (np.int64(buf[r + 2]) << 8)
        | np.int64(buf[r + 3])
    )


@njit(nogil=True, error_model="numpy")
def lane_bits(buf: np.ndarray, base: int, lane: int) -> int:
    """Bit length of `lane` from the lane table (uint16 LE) of the payload at buf[base:]."""
    return int(buf[base + 2 * lane]) | (int(buf[base + 2 * lane + 1]) << 8)


@njit(nogil=True, error_model="numpy")
def first_lane_bit(
    buf: np.ndarray, base: int, size: int, count: int, lane_symbols: int, max_bits: int
) -> int:
    """Bit position in `buf` of the first lane of the block at buf[base:base+size] holding
    `count` symbols, or -1 when its lane table and size are inconsistent (each lane between one
    and max_bits bits per symbol, the lanes' bits filling the payload after the table)."""
    nlanes = (count + lane_symbols - 1) // lane_symbols
    if size < 2 * nlanes:
        return -1
    total = 0
    for lane in range(nlanes):
        lb = lane_bits(buf, base, lane)
        per_lane = min(lane_symbols, count - lane * lane_symbols)
        if lb < per_lane or lb > per_lane * max_bits:
            return -1
        total += lb
    if (total + 7) // 8 != size - 2 * nlanes:
        return -1
    return 8 * (base + 2 * nlanes)


@njit(nogil=True, error_model="numpy")
def _decode_lane(
    buf: np.ndarray,
    bit: int,
    left: int,
    table: np.ndarray,
    multi: np.ndarray,
    max_bits: int,
    out: np.ndarray,
    p: int,
) -> int:
    """Decode `left` symbols from stream bit `bit` of buf into out[p:]; returns the bits they
    used, or -1 at a bit pattern that is no code."""
    peek_mask = (1 << MULTI_BITS) - 1
    code_mask = (1 << max_bits) - 1
    # Bit reader: the next `avail` stream bits are the low bits of acc (bits above are stale).
    # Refilling 32 bits whenever fewer remain keeps the byte loads off the decode's dependency
    # chain; avail stays <= 63.
    r = bit >> 3
    acc = np.int64(0)
    avail = -(bit & 7)
    used = 0
    while left > 0:
        if avail < 32:
            acc, avail, r = _refill(acc, avail, r, buf)
            continue
        e = multi[(acc >> (avail - MULTI_BITS)) & peek_mask]
        k = e & 3
        if k > 0 and left >= 3:  # all three slots lie in this lane; k of them count
            out[p] = (e >> 8) & 0xFFFF
            out[p + 1] = (e >> 24) & 0xFFFF
            out[p + 2] = (e >> 40) & 0xFFFF
            n = (e >> 2) & 0x3F
            p += k
            left -= k
        else:  # one code at a time: long codes, invalid bits, a lane's last symbols
            e = np.int64(table[(acc >> (avail - max_bits)) & code_mask])
            n = e >> 16
            if n == 0:
                return -1
            out[p] = e & 0xFFFF
            p += 1
            left -= 1
        avail -= n
        used += n
    return used


@njit(nogil=True, error_model="numpy", inline="always")
def _refill(acc: np.int64, avail: int, r: int, buf: np.ndarray) -> tuple[np.int64, int, int]:
    """Reader state (acc, avail, r) after loading the next 32 bits (see _decode_lane)."""
    return (acc << 32) | _load32(buf, r), avail + 32, r + 4


@njit(nogil=True, error_model="numpy", inline="always")
def _lane_step(
    acc: np.int64,
    avail: int,
    p: int,
    table: np.ndarray,
    multi: np.ndarray,
    max_bits: int,
    out: np.ndarray,
) -> tuple[int, int]:
    """One decode step of a lane holding >= max_bits bits: up to 3 codes through the multi
    table (all 3 slots written), else one code; returns (avail, p) after it. A bit pattern that
    is no code has length 0: the lane stalls on it, writing one slot per step."""
    e = multi[(acc >> (avail - MULTI_BITS)) & ((1 << MULTI_BITS) - 1)]
    if e & 3:
        out[p] = (e >> 8) & 0xFFFF
        out[p + 1] = (e >> 24) & 0xFFFF
        out[p + 2] = (e >> 40) & 0xFFFF
        return avail - ((e >> 2) & 0x3F), p + (e & 3)
    e = np.int64(table[(acc >> (avail - max_bits)) & ((1 << max_bits) - 1)])
    out[p] = e & 0xFFFF
    return int(avail - (e >> 16)), p + 1


@njit(nogil=True, error_model="numpy")
def _decode_4_lanes(
    buf: np.ndarray,
    b0: int,
    b1: int,
    b2: int,
    b3: int,
    count: int,
    table: np.ndarray,
    multi: np.ndarray,
    max_bits: int,
    out: np.ndarray,
    p: int,
) -> tuple[int, int, int, int]:
    """Decode 4 lanes of `count` symbols each, starting at stream bits b0..b3, into out[p:],
    out[p+count:], ... Returns the bits each lane used (all -1 at a bit pattern that is no code).

    Why four at once: one lane's decode is a serial chain (each code's length decides where the
    next starts); stepping four independent lanes in one loop lets the CPU overlap the chains,
    as zstd's 4-stream Huffman decoder does. The loop runs in batches of steps that cannot
    reach any lane's end (a step writes at most 3 slots and advances at most 3), so it needs no
    end tests; then each lane finishes on its own. A lane stalled on an invalid code writes
    only inside its own slots, and its finishing call reports the code.
    """
    a0 = a1 = a2 = a3 = np.int64(0)
    r0, r1, r2, r3 = b0 >> 3, b1 >> 3, b2 >> 3, b3 >> 3
    v0, v1, v2, v3 = -(b0 & 7), -(b1 & 7), -(b2 & 7), -(b3 & 7)
    # Two refills up front leave each reader >= 32 bits; one per step below keeps it there (a
    # step takes at most 16 bits).
    for _ in range(2):
        a0, v0, r0 = _refill(a0, v0, r0, buf)
        a1, v1, r1 = _refill(a1, v1, r1, buf)
        a2, v2, r2 = _refill(a2, v2, r2, buf)
        a3, v3, r3 = _refill(a3, v3, r3, buf)
    p0, p1, p2, p3 = p, p + count, p + 2 * count, p + 3 * count
    e0_, e1_, e2_, e3_ = p1, p2, p3, p + 4 * count
    while True:
        safe = min(e0_ - p0, e1_ - p1, e2_ - p2, e3_ - p3) // 3
        if safe == 0:
            break
        for _ in range(safe):
            v0, p0 = _lane_step(a0, v0, p0, table, multi, max_bits, out)
            v1, p1 = _lane_step(a1, v1, p1, table, multi, max_bits, out)
            v2, p2 = _lane_step(a2, v2, p2, table, multi, max_bits, out)
            v3, p3 = _lane_step(a3, v3, p3, table, multi, max_bits, out)
            if v0 < 32:
                a0, v0, r0 = _refill(a0, v0, r0, buf)
            if v1 < 32:
                a1, v1, r1 = _refill(a1, v1, r1, buf)
            if v2 < 32:
                a2, v2, r2 = _refill(a2, v2, r2, buf)
            if v3 < 32:
                a3, v3, r3 = _refill(a3, v3, r3, buf)
    # Bits each lane used: loaded (8 per byte read from its first byte) minus still buffered
    # minus the offset of its first bit.
    u0, u1, u2, u3 = 8 * r0 - v0 - b0, 8 * r1 - v1 - b1, 8 * r2 - v2 - b2, 8 * r3 - v3 - b3
    rest0 = _decode_lane(buf, b0 + u0, e0_ - p0, table, multi, max_bits, out, p0)
    rest1 = _decode_lane(buf, b1 + u1, e1_ - p1, table, multi, max_bits, out, p1)
    rest2 = _decode_lane(buf, b2 + u2, e2_ - p2, table, multi, max_bits, out, p2)
    rest3 = _decode_lane(buf, b3 + u3, e3_ - p3, table, multi, max_bits, out, p3)
    if rest0 < 0 or rest1 < 0 or rest2 < 0 or rest3 < 0:
        return -1, -1, -1, -1
    return u0 + rest0, u1 + rest1, u2 + rest2, u3 + rest3


@_kernel
def huffman_decode(
    buf: np.ndarray,
    offsets: np.ndarray,
    counts: np.ndarray,
    out_pos: np.ndarray,
    table: np.ndarray,
    multi: np.ndarray,
    lane_symbols: int,
    max_bits: int,
    out: np.ndarray,
) -> int:
    """Decode Huffman blocks; block b's payload is buf[offsets[b]:offsets[b+1]] (uint8) holding
    counts[b] symbols, written to out[out_pos[b]:] (uint16, or uint8 when the table's symbols
    are < 256). Nothing is written outside those ranges, even for a corrupt payload.

    table: uint32 [2^max_bits] single-code table (length << 16 | symbol; length 0 = no code);
    multi: its multi_table. `buf` must extend at least lane_symbols * max_bits / 8 + 8 bytes past
    the last payload, so a corrupt lane that runs past its end still reads inside `buf`. Returns
    -1 when every block is valid, else the index of the first block whose lane table, stream
    size, codes or lane lengths are inconsistent (checks as huffman.split_payload, plus every
    code valid and every lane ending exactly at its stored bit length).
    """
    for b in range(len(counts)):
        c = counts[b]
        pos_out = out_pos[b]
        base = offsets[b]
        size = offsets[b + 1] - base
        nlanes = (c + lane_symbols - 1) // lane_symbols
        start = first_lane_bit(buf, base, size, c, lane_symbols, max_bits)
        if start < 0:
            return b
        lane = 0
        # Full lanes four at a time; the rest (and a block's short last lane) one by one.
        while lane + 4 <= c // lane_symbols:
            l0 = lane_bits(buf, base, lane)
            l1 = lane_bits(buf, base, lane + 1)
            l2 = lane_bits(buf, base, lane + 2)
            l3 = lane_bits(buf, base, lane + 3)
            s1 = start + l0
            s2 = s1 + l1
            s3 = s2 + l2
            used = _decode_4_lanes(
                buf, start, s1, s2, s3, lane_symbols, table, multi, max_bits, out, pos_out
            )
            if used != (l0, l1, l2, l3):
                return b
            start = s3 + l3
            pos_out += 4 * lane_symbols
            lane += 4
        while lane < nlanes:
            lb = lane_bits(buf, base, lane)
            left = min(lane_symbols, c - lane * lane_symbols)
            if _decode_lane(buf, start, left, table, multi, max_bits, out, pos_out) != lb:
                return b
            start += lb
            pos_out += left
            lane += 1
    return -1
