"""Length-limited canonical Huffman coding; the per-symbol loops are numba kernels (kernels/).

A codebook is its code lengths (0 = symbol has no code), at most MAX_BITS bits. Codes are
canonical: sorted by (length, symbol), consecutive integers, MSB first. A block's payload is a
lane table (uint16 LE bit length of each lane of LANE_SYMBOLS symbols) followed by the lanes'
bits back to back, zero-padded to a byte. Lanes decode independently (any lane can start from
the table alone) and the table lets a decoder check every lane ends exactly where it should.
"""

from __future__ import annotations

import functools
import heapq
from collections.abc import Sequence

import numpy as np

from kvpack.codec import kernels
from kvpack.codec.kernels.huffman_decode_u8 import huffman_decode_u8, multi_table_u8

MAX_BITS = 16
LANE_SYMBOLS = 1024
INVALID = 0xFFFF  # decode-table symbol for bit patterns that are no code


class HuffmanError(ValueError):
    """A payload or codebook that is not a valid encoding."""


def code_lengths(counts: np.ndarray, limit: int = MAX_BITS) -> np.ndarray:
    """Huffman code lengths (uint8 [A]) for symbol counts [A], limited to `limit` bits.

    Symbols with count 0 get length 0. A single used symbol gets length 1.
    """
    counts = np.asarray(counts, dtype=np.int64)
    out = np.zeros(len(counts), dtype=np.uint8)
    used = np.flatnonzero(counts)
    if len(used) == 0:
        return out
    if len(used) == 1:
        out[used[0]] = 1
        return out
    if len(used) > 1 << limit:
        raise ValueError(f"{len(used)} symbols do not fit a {limit}-bit code")
    # Plain Huffman over the used symbols (a loop over the alphabet, not over data).
    heap = [(int(counts[s]), i, i) for i, s in enumerate(used)]
    heapq.heapify(heap)
    parent = list(range(len(used)))
    nxt = len(used)
    while len(heap) > 1:
        w1, _, a = heapq.heappop(heap)
        w2, _, b = heapq.heappop(heap)
        parent[a] = parent[b] = nxt
        parent.append(nxt)
        heapq.heappush(heap, (w1 + w2, nxt, nxt))
        nxt += 1
    depth = [0] * nxt
    for node in range(nxt - 2, -1, -1):  # parents have larger ids, so walk top down
        depth[node] = depth[parent[node]] + 1
    lens = np.array(depth[: len(used)], dtype=np.int64)
    if lens.max() > limit:
        lens = _limit_lengths(lens, counts[used], limit)
    out[used] = lens
    return out


def _limit_lengths(lens: np.ndarray, counts: np.ndarray, limit: int) -> np.ndarray:
    """Re-balance the length histogram so no code exceeds `limit` (JPEG Annex K.3 style), then
    give the shortest lengths to the most frequent symbols. Kraft equality is preserved."""
    bl = np.bincount(lens, minlength=lens.max() + 1).astype(np.int64)
    for i in range(len(bl) - 1, limit, -1):
        while bl[i] > 0:
            j = i - 2
            while bl[j] == 0:
                j -= 1
            bl[i] -= 2
            bl[i - 1] += 1
            bl[j + 1] += 2
            bl[j] -= 1
    sorted_lens = np.repeat(np.arange(len(bl)), bl)[: len(lens)]
    order = np.argsort(-counts, kind="stable")
    out = np.empty_like(lens)
    out[order] = sorted_lens
    return out


def check_lengths(lengths: np.ndarray) -> None:
    """HuffmanError unless lengths are in [0, MAX_BITS], some nonzero and Kraft sum <= 1."""
    if lengths.size == 0 or int(lengths.max()) == 0 or int(lengths.max()) > MAX_BITS:
        raise HuffmanError("codebook lengths must be in [0, 16] with at least one code")
    used = lengths[lengths > 0].astype(np.int64)
    if int((1 << (MAX_BITS - used)).sum()) > 1 << MAX_BITS:
        raise HuffmanError("codebook violates the Kraft inequality")


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code values (uint32 [A]) for code lengths [A]; 0 where the length is 0."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.uint32)
    order = np.lexsort((np.arange(len(lengths)), lengths))
    order = order[lengths[order] > 0]
    code = 0
    prev = 0
    for s in order.tolist():
        ln = int(lengths[s])
        code <<= ln - prev
        codes[s] = code
        code += 1
        prev = ln
    return codes


def decode_table(lengths: np.ndarray) -> np.ndarray:
    """2^MAX_BITS lookup table (uint32): entry for the next 16 bits = length << 16 | symbol;
    bit patterns that start no code hold INVALID with length 0."""
    check_lengths(lengths)
    codes = canonical_codes(lengths)
    table = np.full(1 << MAX_BITS, INVALID, dtype=np.uint32)
    for s in np.flatnonzero(lengths).tolist():
        ln = int(lengths[s])
        lo = int(codes[s]) << (MAX_BITS - ln)
        table[lo : lo + (1 << (MAX_BITS - ln))] = (ln << 16) | s
    return table


def _as_symbols(symbols: np.ndarray) -> np.ndarray:
    """1-D contiguous uint8/uint16 view or copy of non-negative integer symbols < 2^16."""
    symbols = np.ascontiguousarray(symbols).reshape(-1)
    if symbols.dtype in (np.uint8, np.uint16):
        return symbols
    if symbols.size and (int(symbols.min()) < 0 or int(symbols.max()) > 0xFFFF):
        raise HuffmanError("symbols must lie in [0, 2^16)")
    return symbols.astype(np.uint16)


def encode_blocks(symbols: np.ndarray, counts: np.ndarray, lengths: np.ndarray) -> list[bytes]:
    """Encode consecutive blocks of `symbols` (1-D ints; block i holds counts[i] symbols).

    Every symbol must have a code (lengths[s] > 0), else HuffmanError. Returns one payload per
    block; its size is exactly `payload_bytes` of the block's symbol histogram.
    """
    counts = np.asarray(counts, dtype=np.int64)
    symbols = _as_symbols(symbols)
    if symbols.size != int(counts.sum()):
        raise ValueError(f"{symbols.size} symbols, block counts add up to {int(counts.sum())}")
    if symbols.size and int(symbols.max()) >= len(lengths):  # the kernel relies on it
        raise HuffmanError("a symbol has no code in this codebook")
    # Tables span the whole symbol dtype, so a symbol beyond the codebook reads length 0 (an
    # error) instead of indexing past the table.
    table = np.zeros(1 << (8 * symbols.itemsize), dtype=np.int64)
    table[: len(lengths)] = (canonical_codes(lengths).astype(np.int64) << 5) | lengths
    nlanes = -(-counts // LANE_SYMBOLS)
    room = 2 * nlanes + 2 * counts  # lane table + at most 16 bits per symbol
    starts = np.concatenate(([0], np.cumsum(room)[:-1])).astype(np.int64)
    out = np.empty(int(room.sum()) + 8, dtype=np.uint8)  # + 8: the writer stores 8 bytes
    sizes = kernels.huffman_encode(symbols, counts, table, len(lengths), LANE_SYMBOLS, out, starts)
    if len(sizes) and sizes[0] < 0:
        raise HuffmanError("a symbol has no code in this codebook")
    return [out[a : a + n].tobytes() for a, n in zip(starts.tolist(), sizes.tolist(), strict=True)]


def payload_bytes(histograms: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Exact encode_blocks payload size in bytes (int64 [nb]) of blocks with symbol histograms
    [nb, A] under code lengths [A]: the lane table plus the codes' bits rounded up to a byte."""
    hist = np.asarray(histograms, dtype=np.int64)
    count = hist.sum(axis=1)
    bits = hist @ np.asarray(lengths, dtype=np.int64)
    return 2 * (-(-count // LANE_SYMBOLS)) + (bits + 7) // 8


def split_payload(payload: bytes | memoryview, count: int) -> tuple[np.ndarray, int]:
    """Check a block payload for `count` symbols; return (lane bit lengths, stream byte length).

    HuffmanError when the lane table or stream length is inconsistent (no decoding done).
    """
    nlanes = -(-count // LANE_SYMBOLS)
    if len(payload) < 2 * nlanes:
        raise HuffmanError(f"payload of {len(payload)} bytes too short for {nlanes} lanes")
    lane_bits = np.frombuffer(payload, dtype="<u2", count=nlanes).astype(np.int64)
    per_lane = np.full(nlanes, LANE_SYMBOLS, dtype=np.int64)
    if nlanes:
        per_lane[-1] = count - LANE_SYMBOLS * (nlanes - 1)
    if np.any(lane_bits < per_lane) or np.any(lane_bits > per_lane * MAX_BITS):
        raise HuffmanError("lane bit length out of range")
    stream_bytes = len(payload) - 2 * nlanes
    if (int(lane_bits.sum()) + 7) // 8 != stream_bytes:
        raise HuffmanError(f"stream holds {stream_bytes} bytes, lane table needs another size")
    return lane_bits, stream_bytes


def decode_blocks(
    payloads: Sequence[bytes | memoryview],
    counts: Sequence[int] | np.ndarray,
    lengths: np.ndarray,
    out: np.ndarray | None = None,
    out_pos: np.ndarray | None = None,
) -> np.ndarray:
    """Decode blocks encoded by encode_blocks; returns all symbols (uint16) concatenated, or
    writes block b to out[out_pos[b]:] (uint8 for codebooks of <= 256 symbols, or uint16) and
    returns `out`.

    One compiled pass over all lanes of all blocks: up to four codes per table lookup into
    uint8 output (kernels/huffman_decode_u8.py, also used for the uint16 result of small
    codebooks), else up to three (kernels/huffman_decode.py). HuffmanError if a lane table or
    stream length is inconsistent, any lane holds an invalid code, or a lane does not end
    exactly at its stored bit length.
    """
    count_arr = np.asarray(counts, dtype=np.int64)
    widen = out is None and len(lengths) <= 256
    if out is None:
        out = np.empty(int(count_arr.sum()), dtype=np.uint8 if widen else np.uint16)
        out_pos = np.concatenate(([0], np.cumsum(count_arr)[:-1])).astype(np.int64)
    elif out_pos is None or len(out_pos) != len(count_arr):
        raise ValueError("out_pos must give one output position per block")
    elif out.dtype == np.uint8 and len(lengths) > 256:
        raise ValueError("uint8 output needs a codebook of at most 256 symbols")
    if not len(count_arr) or int(count_arr.sum()) == 0:
        return out.astype(np.uint16) if widen else out
    u8 = out.dtype == np.uint8
    table, multi = _tables(np.asarray(lengths, dtype=np.uint8).tobytes(), u8)
    sizes = [len(p) for p in payloads]
    offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    # A corrupt lane may run up to LANE_SYMBOLS * MAX_BITS bits past its end before the
    # end-of-lane check catches it: pad so those reads stay inside the buffer.
    pad = bytes(LANE_SYMBOLS * MAX_BITS // 8 + 8)
    buf = np.frombuffer(b"".join([*payloads, pad]), dtype=np.uint8)
    kernel = huffman_decode_u8 if u8 else kernels.huffman_decode
    bad = kernel(
        buf,
        offsets,
        count_arr,
        np.asarray(out_pos, dtype=np.int64),
        table,
        multi,
        LANE_SYMBOLS,
        MAX_BITS,
        out,
    )
    if bad >= 0:
        split_payload(payloads[bad], counts[bad])  # raises the specific framing error, if any
        raise HuffmanError(f"block {bad}: invalid code or lane length mismatch in Huffman stream")
    return out.astype(np.uint16) if widen else out


@functools.lru_cache(maxsize=64)
def _tables(lengths: bytes, u8: bool) -> tuple[np.ndarray, np.ndarray]:
    """(single-code table, multi-code table) of the codebook with code lengths `lengths` (uint8
    bytes) for the uint8 (`u8`) or the uint16 decoder. Cached: a cache's layers mostly share a
    few codebooks, and building both costs ~0.1 ms, which is most of a small stream's decode.
    The kernels only read them, so threads share them."""
    table = decode_table(np.frombuffer(lengths, dtype=np.uint8))
    multi = multi_table_u8(table, MAX_BITS) if u8 else kernels.multi_table(table, MAX_BITS)
    return table, multi
