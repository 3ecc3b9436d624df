"""Length-limited canonical Huffman coding, vectorised with numpy.

A codebook is its code lengths (0 = symbol has no code), at most MAX_BITS bits. Codes are
canonical: sorted by (length, symbol), consecutive integers, MSB first. A block's payload is a
lane table (uint16 LE bit length of each lane of LANE_SYMBOLS symbols) followed by the lanes'
bits back to back, zero-padded to a byte. Lanes decode independently, which is what lets the
decoder walk all lanes of many blocks in lock step with numpy instead of a loop per symbol.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

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


def encode_blocks(symbols: np.ndarray, counts: np.ndarray, lengths: np.ndarray) -> list[bytes]:
    """Encode consecutive blocks of `symbols` (1-D ints; block i holds counts[i] symbols).

    Every symbol must have a code (lengths[s] > 0). Returns one payload per block.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if symbols.size == 0:
        return [b"" for _ in counts]
    lens = lengths.astype(np.int64)[symbols]
    codes = canonical_codes(lengths).astype(np.uint64)[symbols]
    lane_size = LANE_SYMBOLS
    if not np.any(counts % 2):
        # Profiled hot spot: every later step is a full pass over the codes. Merging adjacent
        # pairs into one code of <= 32 bits halves them (blocks and lanes hold even counts, so
        # no pair straddles a lane); the bit stream is identical.
        codes = (codes[0::2] << lens[1::2].astype(np.uint64)) | codes[1::2]
        lens = lens[0::2] + lens[1::2]
        counts = counts // 2
        lane_size //= 2
    first = np.concatenate(([0], np.cumsum(counts)[:-1]))
    nlanes = -(-counts // lane_size)
    lane_first = np.concatenate(([0], np.cumsum(nlanes)[:-1]))
    block_of = np.repeat(np.arange(len(counts)), counts)
    in_block = np.arange(len(lens)) - first[block_of]
    lane = lane_first[block_of] + in_block // lane_size
    lane_bits = np.bincount(lane, weights=lens, minlength=int(nlanes.sum())).astype(np.int64)
    block_bits = np.bincount(block_of, weights=lens, minlength=len(counts)).astype(np.int64)
    bit_base = np.concatenate(([0], np.cumsum(block_bits)[:-1]))
    block_bytes = (block_bits + 7) // 8
    byte_start = np.concatenate(([0], np.cumsum(block_bytes)[:-1]))
    # Bit position of each code in one stream of all blocks, each block starting on a byte.
    before = np.cumsum(lens) - lens
    pos = (before - bit_base[block_of] + 8 * byte_start[block_of]).astype(np.uint64)
    # Codes are <= 32 bits, so one lands in at most two 32-bit words; codes never overlap, so a
    # weighted bincount (exact in float64 below 2^53) is an OR.
    shift = np.uint64(64) - (pos & np.uint64(31)) - lens.astype(np.uint64)
    val = codes << shift
    word = (pos >> np.uint64(5)).astype(np.int64)
    nwords = int(block_bytes.sum()) // 4 + 2
    hi = np.bincount(word, weights=(val >> np.uint64(32)).astype(np.float64), minlength=nwords)
    lo = np.bincount(
        word + 1, weights=(val & np.uint64(0xFFFFFFFF)).astype(np.float64), minlength=nwords
    )
    stream = (hi + lo).astype(">u4").tobytes()
    out = []
    lb = lane_bits.astype("<u2")
    for i in range(len(counts)):
        table = lb[lane_first[i] : lane_first[i] + nlanes[i]].tobytes()
        out.append(table + stream[byte_start[i] : byte_start[i] + block_bytes[i]])
    return out


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
    payloads: Sequence[bytes | memoryview], counts: Sequence[int], lengths: np.ndarray
) -> np.ndarray:
    """Decode blocks encoded by encode_blocks; returns all symbols (uint16) concatenated.

    All lanes of all blocks advance together: one numpy step decodes one symbol in every lane.
    HuffmanError if any lane holds an invalid code or does not end exactly at its stored length.
    """
    if sum(counts) == 0:
        return np.zeros(0, dtype=np.uint16)
    table = decode_table(lengths)
    lane_bits_all, streams, lane_syms = [], [], []
    for payload, count in zip(payloads, counts, strict=True):
        lane_bits, _ = split_payload(payload, count)
        nlanes = len(lane_bits)
        lane_bits_all.append(lane_bits)
        streams.append(bytes(payload[2 * nlanes :]))
        per_lane = np.full(nlanes, LANE_SYMBOLS, dtype=np.int64)
        if nlanes:
            per_lane[-1] = count - LANE_SYMBOLS * (nlanes - 1)
        lane_syms.append(per_lane)
    bits = np.concatenate(lane_bits_all)
    syms = np.concatenate(lane_syms)
    stream_start = np.repeat(
        8 * np.concatenate(([0], np.cumsum([len(s) for s in streams])[:-1])),
        [len(b) for b in lane_bits_all],
    )
    within = np.concatenate([np.cumsum(b) - b for b in lane_bits_all])
    pos = stream_start + within
    # Lanes may run past their end (short last lanes, corrupt data): pad so every peek is in range.
    buf = np.frombuffer(b"".join(streams) + bytes(4 + 2 * LANE_SYMBOLS), dtype=np.uint8)
    wide = buf.astype(np.uint32)
    peek = (wide[:-3] << 24) | (wide[1:-2] << 16) | (wide[2:-1] << 8) | wide[3:]
    steps = int(syms.max())
    out = np.empty((len(bits), steps), dtype=np.uint32)
    for t in range(steps):
        entry = table[(peek[pos >> 3] >> (16 - (pos & 7))) & 0xFFFF]
        out[:, t] = entry
        pos += entry >> 16
    valid = np.arange(steps) < syms[:, None]
    entries = out[valid]
    lane_of = np.repeat(np.arange(len(bits)), syms)
    used = np.bincount(lane_of, weights=entries >> 16, minlength=len(bits)).astype(np.int64)
    if np.any(entries >> 16 == 0) or not np.array_equal(used, bits):
        raise HuffmanError("invalid code or lane length mismatch in Huffman stream")
    return (entries & 0xFFFF).astype(np.uint16)
