"""Huffman encoding of consecutive blocks of symbols in one compiled pass (format: huffman.py)."""

from __future__ import annotations

import numpy as np
from numba import njit

from kvpack.codec.kernels.bytes_io import store_be64
from kvpack.codec.kernels.jit import _kernel

# Alphabets up to this size code two symbols per table lookup (A^2 int64 entries: 32 KiB at
# 64); larger ones one symbol at a time.
PAIR_ALPHABET = 64
NO_CODE_BIT = 1 << 6  # set only in the pair_table entry of a pair with an uncodable symbol
NO_CODE = NO_CODE_BIT | 1


@njit(nogil=True, error_model="numpy")
def pair_table(table: np.ndarray, n_codes: int) -> np.ndarray:
    """int64 [n_codes^2]: entry s0 * n_codes + s1 = the two codes back to back << 7 | their
    total length, from `table` (code << 5 | length per symbol). Where either symbol has no code
    the entry is NO_CODE: bit 6 set and length 1, so the encoder can run on without a branch
    (one garbage bit) and test the OR of all its entries once at the end."""
    side = n_codes
    out = np.full(side * side, NO_CODE, dtype=np.int64)
    for s0 in range(n_codes):
        e0 = table[s0]
        l0 = e0 & 31
        if l0 == 0:
            continue
        for s1 in range(n_codes):
            e1 = table[s1]
            l1 = e1 & 31
            if l1 != 0:
                out[s0 * side + s1] = ((((e0 >> 5) << l1) | (e1 >> 5)) << 7) | (l0 + l1)
    return out


@_kernel
def huffman_encode(
    symbols: np.ndarray,
    counts: np.ndarray,
    table: np.ndarray,
    n_codes: int,
    lane_symbols: int,
    out: np.ndarray,
    starts: np.ndarray,
) -> np.ndarray:
    """Huffman-code consecutive blocks of `symbols` (block b holds counts[b]) into `out` (uint8).

    table: int64 [A] canonical code << 5 | code length in bits (0 = no code) per symbol, A
    spanning the symbols' dtype; n_codes: the codebook's size, which every symbol must be below
    (the caller checks: the pair table is indexed without a bounds check). Block
    b's payload (lane table of uint16 LE lane bit lengths, then the codes MSB first, zero-padded
    to a byte) is written at out[starts[b]:], which must leave room for 2 bytes per lane plus
    2 bytes per symbol (codes are <= 16 bits), and `out` must extend 8 bytes past the last
    block's room (the bit writer stores 8 bytes at a time). Returns the payload sizes in bytes
    (int64 [nb]), or -1 as the first size if some symbol has no code (length 0).

    The bit writer keeps its pending bits at the top of a 64-bit word and stores the whole word
    (big-endian) after every step, advancing by the whole bytes it holds: no flush branch, one
    unaligned store per step. Small alphabets code two symbols per lookup (pair_table).
    """
    sizes = np.zeros(len(counts), dtype=np.int64)
    use_pairs = n_codes <= PAIR_ALPHABET
    side = n_codes
    pairs = pair_table(table, n_codes if use_pairs else 0)
    pos = 0
    for b in range(len(counts)):
        c = counts[b]
        nlanes = (c + lane_symbols - 1) // lane_symbols
        base = starts[b]
        w = base + 2 * nlanes
        acc = np.int64(0)  # pending bits at the top (bit 63 first); the rest zero
        nbits = 0  # pending bits, < 8 between steps
        for lane in range(nlanes):
            lo = pos + lane * lane_symbols
            hi = min(pos + c, lo + lane_symbols)
            lane_start = 8 * w + nbits  # the lane's bit length is where the writer ends up
            i = lo
            if use_pairs:
                # A view indexed from 0 and an unsigned table index: numba's negative-index
                # wraparound code is not emitted for either. No per-pair validity branch:
                # `seen` collects NO_CODE's bit (15 % faster per symbol).
                src = symbols[lo:hi]
                seen = np.int64(0)
                for j in range(0, hi - lo - 1, 2):
                    e = pairs[np.uint64(src[j] * side + src[j + 1])]
                    seen |= e
                    ln = e & 63
                    acc |= (e >> 7) << (64 - nbits - ln)
                    nbits += ln
                    store_be64(out, w, acc)
                    w += nbits >> 3
                    acc <<= nbits & 56
                    nbits &= 7
                if seen & NO_CODE_BIT:
                    sizes[0] = -1
                    return sizes
                i = lo + (hi - lo) // 2 * 2
            for k in range(i, hi):  # a lane's odd last symbol, or every symbol of large alphabets
                e = table[symbols[k]]
                ln = e & 31
                if ln == 0:
                    sizes[0] = -1
                    return sizes
                acc |= (e >> 5) << (64 - nbits - ln)
                nbits += ln
                store_be64(out, w, acc)
                w += nbits >> 3
                acc <<= nbits & 56
                nbits &= 7
            lane_bits = 8 * w + nbits - lane_start
            out[base + 2 * lane] = lane_bits & 0xFF
            out[base + 2 * lane + 1] = lane_bits >> 8
        if nbits > 0:  # the last partial byte; the bits below the pending ones are zero
            store_be64(out, w, acc)
            w += 1
        sizes[b] = w - base
        pos += c
    return sizes
