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
from llvmlite import ir  # type: ignore[import-untyped]
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

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
            # Odd lane (only a block's last): its last code on its own. The flush repeats the one
            # above on purpose: a shared njit helper returning (acc, nbits, w) measured 1.9-2.3x
            # slower per symbol (1.5 -> 2.8-3.5 ns), inlined or not.
            if (hi - lo) % 2:
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
def _lane_bits(buf: np.ndarray, base: int, lane: int) -> np.int64:
    """Bit length of `lane` from the lane table (uint16 LE) of the payload at buf[base:]."""
    return np.int64(buf[base + 2 * lane]) | (np.int64(buf[base + 2 * lane + 1]) << 8)


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
            lb = _lane_bits(buf, base, lane)
            per_lane = min(lane_symbols, c - lane * lane_symbols)
            if lb < per_lane or lb > per_lane * max_bits:
                return b
            total += lb
        if (total + 7) // 8 != size - 2 * nlanes:
            return b
        start = 8 * (base + 2 * nlanes)
        lane = 0
        # Full lanes four at a time; the rest (and a block's short last lane) one by one.
        while lane + 4 <= c // lane_symbols:
            l0 = _lane_bits(buf, base, lane)
            l1 = _lane_bits(buf, base, lane + 1)
            l2 = _lane_bits(buf, base, lane + 2)
            l3 = _lane_bits(buf, base, lane + 3)
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
            lb = _lane_bits(buf, base, lane)
            left = min(lane_symbols, c - lane * lane_symbols)
            if _decode_lane(buf, start, left, table, multi, max_bits, out, pos_out) != lb:
                return b
            start += lb
            pos_out += left
            lane += 1
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


# ------------------------------------------------------------------ quantisation (fused kernels)
# LLVM-level scalar helpers; typed Any because numba calls them with the typing context first.
_intrinsic = cast(Callable[[Callable[..., Any]], Any], intrinsic)
# Source/destination float kinds of the quantisation kernels; values travel as their bits
# (uint16 for fp16/bf16, uint32 for fp32) since numba has no float16/bfloat16 type.
FP32, FP16, BF16 = 0, 1, 2
# Grouping of a [nb, B, H, T, d] block view: V = per token (m = d); K "channel" = per channel
# (m = T); K "block" = per block and batch row (m = H*T*d). Orders as docs/FORMAT.md.
GROUP_V, GROUP_K_CHANNEL, GROUP_K_BLOCK = 0, 1, 2
# Smallest normal fp32: a step below it would lose relative precision (subnormal), which would
# break the bound; such groups span < 2^-126/eb and are still reconstructed within step/2.
_MIN_STEP = np.float32(2.0**-126)
_F16_MAX = np.float32(65504.0)
_BF16_MAX = np.float32(3.3895313892515355e38)


@_intrinsic
def _f32_from_u32(typingctx: Any, u: Any) -> Any:
    """Reinterpret uint32 bits as float32 (no conversion)."""
    sig = types.float32(types.uint32)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@_intrinsic
def _u32_from_f32(typingctx: Any, f: Any) -> Any:
    """Reinterpret float32 bits as uint32 (no conversion)."""
    sig = types.uint32(types.float32)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@_intrinsic
def _f32_from_f16(typingctx: Any, u: Any) -> Any:
    """fp16 bits (uint16) -> fp32, exact (LLVM fpext: one vcvtph2ps with F16C, no branches)."""
    sig = types.float32(types.uint16)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@_intrinsic
def _f16_from_f32(typingctx: Any, f: Any) -> Any:
    """fp32 -> fp16 bits (uint16), rounded to nearest even (LLVM fptrunc, IEEE like torch)."""
    sig = types.uint16(types.float32)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


@_intrinsic
def _fma32(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    """a*b + c in fp32 with one rounding (llvm.fma): torch's addcmul, which dequantised before
    these kernels, fuses the same way on CPU, and the decoded values must not change."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        f32 = ir.FloatType()
        fnty = ir.FunctionType(f32, [f32, f32, f32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.f32")
        return builder.call(fn, args)

    return sig, codegen


@njit(nogil=True, error_model="numpy")
def _load(bits: Any, kind: int) -> tuple[np.float32, bool]:
    """(value as fp32, finite?) of one element's bits of float kind `kind` (exact widening)."""
    u = np.uint32(bits)
    if kind == FP32:
        return _f32_from_u32(u), (u & 0x7F800000) != 0x7F800000
    if kind == BF16:
        return _f32_from_u32(np.uint32(u << np.uint32(16))), (u & 0x7F80) != 0x7F80
    return _f32_from_f16(np.uint16(u)), (u & 0x7C00) != 0x7C00


@njit(nogil=True, error_model="numpy")
def _store_value(f: np.float32, kind: int) -> tuple[np.uint32, np.float32]:
    """(bits in float kind `kind`, that value widened back to fp32) of the reconstruction f,
    clamped to the kind's finite range first (as docs/FORMAT.md: never an inf)."""
    if kind == FP32:
        return _u32_from_f32(f), f
    if kind == BF16:
        f = min(max(f, -_BF16_MAX), _BF16_MAX)
        u = np.uint32(_u32_from_f32(f))
        hb = (u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16
        return hb, _f32_from_u32(np.uint32(hb << np.uint32(16)))
    f = min(max(f, -_F16_MAX), _F16_MAX)
    hb = _f16_from_f32(f)
    return np.uint32(hb), _f32_from_f16(hb)


@njit(nogil=True, error_model="numpy")
def _step(lo: np.float32, hi: np.float32, eb: np.float32) -> tuple[np.float32, bool]:
    """(step, ok) of a group with min lo, max hi: max(eb*(hi-lo), 2^-126), 0 for a constant
    group; ok is False when the range overflows fp32."""
    rng = hi - lo
    if rng == 0:
        return np.float32(0.0), True
    return max(rng * eb, _MIN_STEP), bool(rng < np.inf)


@njit(nogil=True, error_model="numpy")
def _symbol(v: np.float32, lo: np.float32, step: np.float32, qmax: int) -> int:
    """clamp(round_half_even((v - lo) / step), 0, qmax) in fp32 (true division)."""
    r = np.rint((v - lo) / step)
    return int(min(max(r, np.float32(0.0)), np.float32(qmax)))


@njit(nogil=True, error_model="numpy")
def _widen(bits: np.ndarray, src: int, out: np.ndarray) -> bool:
    """out[t, c] = element bits [T, m] of float kind `src` as fp32 (exact); True when all are
    finite. One loop per kind so each vectorises (the kind test is outside the loop)."""
    t_len, m = bits.shape
    bad = np.int32(0)
    if src == FP32:
        for t in range(t_len):
            for c in range(m):
                u = np.uint32(bits[t, c])
                bad |= np.int32((u & 0x7F800000) == 0x7F800000)
                out[t, c] = _f32_from_u32(u)
    elif src == BF16:
        for t in range(t_len):
            for c in range(m):
                u = np.uint32(bits[t, c])
                bad |= np.int32((u & 0x7F80) == 0x7F80)
                out[t, c] = _f32_from_u32(np.uint32(u << np.uint32(16)))
    else:
        for t in range(t_len):
            for c in range(m):
                h = np.uint16(bits[t, c])
                bad |= np.int32((h & 0x7C00) == 0x7C00)
                out[t, c] = _f32_from_f16(h)
    return bad == 0


@njit(nogil=True, error_model="numpy", fastmath={"nnan", "ninf", "nsz"})
def _row_min_max(row: np.ndarray) -> tuple[np.float32, np.float32]:
    """(min, max) of a finite fp32 row. fastmath lets the reduction vectorise; its only effect
    on finite input is which of +0/-0 an all-zero minimum keeps (decoded values are equal)."""
    lo = row[0]
    hi = row[0]
    for c in range(1, row.shape[0]):
        lo = min(lo, row[c])
        hi = max(hi, row[c])
    return lo, hi


@njit(nogil=True, error_model="numpy")
def _quantize_tile(
    buf: np.ndarray,
    lo: np.ndarray,
    step: np.ndarray,
    by_col: bool,
    src: int,
    qmax: int,
    q: np.ndarray,
    err_max: np.ndarray,
    err_sq: np.ndarray,
    norm: np.ndarray,
) -> None:
    """q[t, c] = symbol of buf[t, c] (fp32 [T, m]) in its group, whose (min, step) are lo[g],
    step[g] with g = c when by_col (K channel groups) else g = t (V token groups);
    constant groups (step 0) get symbol 0, which decodes to their value exactly. Folds the
    reconstruction error as decoded (in kind `src`) into the per-column accumulators err_max,
    err_sq and the squares of the input into norm (float64 [m]): element-wise over c, so the
    loop vectorises without reassociating any sum."""
    t_len, m = buf.shape
    # Two loops rather than one with a per-element group choice: each must see contiguous
    # (K: per column) or loop-invariant (V: per row) group parameters to vectorise.
    if by_col:
        for t in range(t_len):
            for c in range(m):
                _quantize_one(buf, t, c, lo[c], step[c], src, qmax, q, err_max, err_sq, norm)
    else:
        for t in range(t_len):
            mn = lo[t]
            st = step[t]
            for c in range(m):
                _quantize_one(buf, t, c, mn, st, src, qmax, q, err_max, err_sq, norm)


@njit(nogil=True, error_model="numpy")
def _quantize_one(
    buf: np.ndarray,
    t: int,
    c: int,
    mn: np.float32,
    st: np.float32,
    src: int,
    qmax: int,
    q: np.ndarray,
    err_max: np.ndarray,
    err_sq: np.ndarray,
    norm: np.ndarray,
) -> None:
    """_quantize_tile's work for element (t, c) of a group with minimum mn and step st."""
    v = buf[t, c]
    r = np.rint((v - mn) / (st if st != 0 else np.float32(1.0)))
    s = min(max(r, np.float32(0.0)), np.float32(qmax))
    q[t, c] = s
    _, back = _store_value(_fma32(s, st, mn), src)
    e = abs(np.float64(back) - np.float64(v))
    err_max[c] = max(err_max[c], e)
    err_sq[c] += e * e
    norm[c] += np.float64(v) * np.float64(v)


@njit(nogil=True, error_model="numpy")
def _emit_symbols(
    q: np.ndarray, step: np.ndarray, by_col: bool, syms: np.ndarray, w: int, hist4: np.ndarray
) -> int:
    """Append the symbols of the live groups (step != 0) of tile q [T, m] to syms[w:] in group
    order (columns when by_col, else rows) and count them in hist4 [4, levels] (four partial
    histograms so consecutive equal symbols do not serialise on one counter). Returns the next
    write position."""
    t_len, m = q.shape
    if by_col:
        for c in range(m):
            if step[c] != 0:
                for t in range(t_len):
                    s = np.int64(q[t, c])
                    syms[w + t] = s
                    hist4[t & 3, s] += 1
                w += t_len
    else:
        for t in range(t_len):
            if step[t] != 0:
                for c in range(m):
                    s = np.int64(q[t, c])
                    syms[w + c] = s
                    hist4[c & 3, s] += 1
                w += m
    return w


@njit(nogil=True, error_model="numpy")
def _row_range(
    row: np.ndarray, src: int, lo: np.float32, hi: np.float32, ok: bool
) -> tuple[np.float32, np.float32, bool]:
    """Fold one row of element bits into a group's running (min, max, all finite)."""
    for c in range(row.shape[0]):
        v, fin = _load(row[c], src)
        ok &= fin
        # Strict comparisons keep the first of equal values.
        if v < lo:
            lo = v
        if v > hi:
            hi = v
    return lo, hi, ok


@njit(nogil=True, error_model="numpy")
def _row_quantize(
    row: np.ndarray,
    src: int,
    lo: np.float32,
    step: np.float32,
    qmax: int,
    syms: np.ndarray,
    w: int,
    hist: np.ndarray,
    acc: np.ndarray,
) -> int:
    """Quantise one row of a live group into syms[w:], count its symbols in hist; fold the
    reconstruction error (as decoded, in the source dtype) and the squares into acc =
    [max |x - x̂|, sum (x - x̂)^2, sum x^2] (float64). Returns the next write position."""
    err_max = acc[0]
    err_sq = 0.0
    norm = 0.0
    for c in range(row.shape[0]):
        v, _ = _load(row[c], src)
        s = _symbol(v, lo, step, qmax)
        syms[w] = s
        w += 1
        hist[s] += 1
        _, back = _store_value(_fma32(np.float32(s), step, lo), src)
        e = abs(np.float64(back) - np.float64(v))
        err_max = max(err_max, e)
        err_sq += e * e
        norm += np.float64(v) * np.float64(v)
    acc[0] = err_max
    acc[1] += err_sq
    acc[2] += norm
    return w


@_kernel
def quantize_blocks(
    xv: np.ndarray,
    src: int,
    grouping: int,
    eb: float,
    qmax: int,
    syms: np.ndarray,
    counts: np.ndarray,
    mn: np.ndarray,
    step: np.ndarray,
    hist: np.ndarray,
    acc: np.ndarray,
) -> int:
    """Quantise every group of the blocks of one stream (docs/FORMAT.md).

    xv: element bits [nb, B, H, T, d] (any strides; uint16 for fp16/bf16, uint32 for fp32) of
    float kind `src`; grouping: GROUP_V / GROUP_K_CHANNEL / GROUP_K_BLOCK; eb: relative error
    bound (used as fp32); qmax = levels - 1. Writes per block i the group minima mn[i] and steps
    step[i] (float32 [nb, G]; step 0 for a constant group), the symbols of its live groups in
    group order to syms (1-D, room for nb*G*m) at the running position, their count to
    counts[i] and their histogram to hist[i] (int64 [nb, levels], zeroed by the caller); folds
    the error statistics into acc (float64 [3]: max |x - x̂|, sum (x - x̂)^2, sum x^2; zeroed by
    the caller). Returns 0, or 1 when a value is non-finite or a group range overflows fp32
    (outputs then undefined).

    V and K-channel groups go tile by tile ([T, d] of one block, batch row and head): widen to
    fp32, min/max, quantise with error statistics, then emit symbols; each of these loops is
    branch-free over the tile so it vectorises, where a single fused per-value loop did not.
    """
    nb, nbatch, nheads, t_len, d = xv.shape
    eb32 = np.float32(eb)
    w = 0
    buf = np.empty((t_len, d), dtype=np.float32)
    q = np.empty((t_len, d), dtype=np.float32)
    hist4 = np.zeros((4, qmax + 1), dtype=np.int64)
    err_max = np.zeros(d, dtype=np.float64)
    err_sq = np.zeros(d, dtype=np.float64)
    norm = np.zeros(d, dtype=np.float64)
    n_groups = d if grouping == GROUP_K_CHANNEL else t_len
    lo = np.empty(n_groups, dtype=np.float32)
    hi = np.empty(n_groups, dtype=np.float32)
    st = np.empty(n_groups, dtype=np.float32)
    for blk in range(nb):
        start = w
        if grouping == GROUP_K_BLOCK:
            w = _quantize_k_block(
                xv[blk], src, eb32, qmax, syms, w, mn[blk], step[blk], hist[blk], acc
            )
            if w < 0:
                return 1
            counts[blk] = w - start
            continue
        hist4[:] = 0
        for b in range(nbatch):
            for h in range(nheads):
                if not _widen(xv[blk, b, h], src, buf):
                    return 1
                if grouping == GROUP_K_CHANNEL:
                    lo[:] = buf[0]
                    hi[:] = buf[0]
                    for t in range(1, t_len):
                        for c in range(d):
                            v = buf[t, c]
                            lo[c] = v if v < lo[c] else lo[c]
                            hi[c] = v if v > hi[c] else hi[c]
                else:
                    for t in range(t_len):
                        lo[t], hi[t] = _row_min_max(buf[t])
                g0 = (b * nheads + h) * n_groups
                for g in range(n_groups):
                    s, fine = _step(lo[g], hi[g], eb32)
                    if not fine:
                        return 1
                    st[g] = s
                    mn[blk, g0 + g] = lo[g]
                    step[blk, g0 + g] = s
                by_col = grouping == GROUP_K_CHANNEL
                _quantize_tile(buf, lo, st, by_col, src, qmax, q, err_max, err_sq, norm)
                w = _emit_symbols(q, st, by_col, syms, w, hist4)
        for k in range(4):
            for sym in range(qmax + 1):
                hist[blk, sym] += hist4[k, sym]
        counts[blk] = w - start
    acc[0] = max(acc[0], err_max.max())
    acc[1] += err_sq.sum()
    acc[2] += norm.sum()
    return 0


@njit(nogil=True, error_model="numpy")
def _quantize_k_block(
    blk: np.ndarray,
    src: int,
    eb32: np.float32,
    qmax: int,
    syms: np.ndarray,
    w: int,
    mn: np.ndarray,
    step: np.ndarray,
    hist: np.ndarray,
    acc: np.ndarray,
) -> int:
    """K "block" grouping (one group per batch row of a block, m = H*T*d) of one block
    [B, H, T, d]: returns the next write position, or -1 on a non-finite value or overflow."""
    nbatch, nheads, t_len, _ = blk.shape
    for b in range(nbatch):
        grp = blk[b]
        v0, _ = _load(grp[0, 0, 0], src)
        lo, hi, ok = v0, v0, True
        for h in range(nheads):
            for t in range(t_len):
                lo, hi, ok = _row_range(grp[h, t], src, lo, hi, ok)
        st, fine = _step(lo, hi, eb32)
        if not (ok and fine):
            return -1
        mn[b] = lo
        step[b] = st
        for h in range(nheads):
            for t in range(t_len):
                if st != 0:
                    w = _row_quantize(grp[h, t], src, lo, st, qmax, syms, w, hist, acc)
                else:
                    acc[2] += grp.shape[2] * np.float64(lo) * np.float64(lo)
    return w


@_kernel
def dequantize_blocks(
    syms: np.ndarray,
    mn: np.ndarray,
    step: np.ndarray,
    grouping: int,
    dst: int,
    qmax: int,
    out: np.ndarray,
) -> int:
    """Inverse of quantize_blocks: x̂ = mn + q*step in fp32 with one rounding (q = 0 in constant
    groups), clamped to the finite range of float kind `dst` and rounded to it (nearest even),
    written as bits into out [nb, B, H, T, d] (any strides; uint16 for fp16/bf16, uint32 for
    fp32). syms: the live groups' symbols of all blocks back to back, exactly as many as they
    hold (as quantize_blocks writes them); mn/step: float32 [nb, G]. Returns -1, or the first
    block holding a symbol > qmax (its output is then partly written).
    """
    nb, nbatch, nheads, t_len, d = out.shape
    buf = np.empty((t_len, d), dtype=np.float32)
    buf_t = np.empty((d, t_len), dtype=np.float32)  # K channel groups: one row per channel
    r = 0
    for blk in range(nb):
        top = 0
        for b in range(nbatch):
            for h in range(nheads):
                # Reconstruct one [T, d] tile into a contiguous fp32 buffer, then narrow it to
                # `dst` in one loop: writing each value straight into the strided output did
                # not vectorise.
                if grouping == GROUP_K_CHANNEL:
                    g0 = (b * nheads + h) * d
                    for c in range(d):
                        st = step[blk, g0 + c]
                        if st != 0:
                            top = max(
                                top, _fill(syms[r : r + t_len], st, mn[blk, g0 + c], buf_t[c])
                            )
                            r += t_len
                        else:
                            buf_t[c] = _fma32(np.float32(0.0), st, mn[blk, g0 + c])
                    buf[:] = buf_t.T
                else:
                    for t in range(t_len):
                        g = b if grouping == GROUP_K_BLOCK else (b * nheads + h) * t_len + t
                        st = step[blk, g]
                        if st != 0:
                            top = max(top, _fill(syms[r : r + d], st, mn[blk, g], buf[t]))
                            r += d
                        else:
                            buf[t] = _fma32(np.float32(0.0), st, mn[blk, g])
                _narrow(buf, dst, out[blk, b, h])
        if top > qmax:
            return blk
    return -1


@njit(nogil=True, error_model="numpy")
def _fill(syms: np.ndarray, st: np.float32, lo: np.float32, dst: np.ndarray) -> int:
    """dst[i] = lo + syms[i] * st (fp32, one rounding); returns max(syms)."""
    top = 0
    for i in range(syms.shape[0]):
        s = syms[i]
        top = max(top, int(s))
        dst[i] = _fma32(np.float32(s), st, lo)
    return top


@njit(nogil=True, error_model="numpy")
def _narrow(buf: np.ndarray, dst: int, out: np.ndarray) -> None:
    """out[t, c] = bits of buf[t, c] (fp32 [T, m]) in float kind `dst`, as _store_value; one
    loop per kind so the kind test is outside the loop."""
    t_len, m = buf.shape
    if dst == FP32:
        for t in range(t_len):
            for c in range(m):
                out[t, c] = _store_value(buf[t, c], FP32)[0]
    elif dst == BF16:
        for t in range(t_len):
            for c in range(m):
                out[t, c] = _store_value(buf[t, c], BF16)[0]
    else:
        for t in range(t_len):
            for c in range(m):
                out[t, c] = _store_value(buf[t, c], FP16)[0]


def warm_up() -> None:
    """Compile (or load from the cache) every kernel for the argument types the codec uses, so
    the first request does not pay the JIT time (seconds when no cache is available)."""
    import torch  # the quantisation wrappers take tensors

    from kvpack.codec import huffman, quant  # both import this module, so not at the top

    for dtype in (np.uint8, np.uint16):
        syms = np.array([0, 1, 1, 2], dtype=dtype)
        counts = np.array([4], dtype=np.int64)
        lengths = huffman.code_lengths(block_histograms(syms, counts, 3)[0])
        payloads = huffman.encode_blocks(syms, counts, lengths)
        huffman.decode_blocks(payloads, [4], lengths)
        unpack_fixed(pack_fixed(syms, 2), 4, 2)
    # Every float dtype, uint8 and uint16 symbols, and both array layouts numba tells apart
    # (one block of one head is C-contiguous once transposed; anything larger is strided).
    for float_dtype in (torch.float32, torch.float16, torch.bfloat16):
        for heads, tokens in ((1, 2), (2, 4)):
            x = torch.ones(1, heads, tokens, 2, dtype=float_dtype)
            for eb in (0.5, 2.0**-12):
                qz = quant.quantize_blocks(x, "v", 2, eb)
                symbols = qz.symbols.astype(np.uint16)
                quant.dequantize_blocks(symbols, qz.mn, qz.step, "v", quant.levels(eb), x)
