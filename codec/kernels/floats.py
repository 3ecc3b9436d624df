"""Scalar float helpers of the quantisation kernels: bit casts, exact widening of fp16/bf16/fp32
bits, rounding back to a dtype, the group step and symbol rules (docs/FORMAT.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np
from llvmlite import ir  # type: ignore[import-untyped]
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

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
def _i64_from_f64(typingctx: Any, f: Any) -> Any:
    """Reinterpret float64 bits as int64: for non-negative doubles the integer order is the
    numeric order, and integer max reductions vectorise where float ones do not."""
    sig = types.int64(types.float64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.IntType(64))

    return sig, codegen


@_intrinsic
def _f64_from_i64(typingctx: Any, u: Any) -> Any:
    """Reinterpret int64 bits as float64 (inverse of _i64_from_f64)."""
    sig = types.float64(types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.DoubleType())

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


@njit(nogil=True, error_model="numpy")
def _row_range_bits(row: np.ndarray, kind: int) -> tuple[np.float32, np.float32]:
    """(min, max) as fp32 of a row of finite element bits of float kind `kind`.

    Computed on order keys (sign-magnitude bits mapped to unsigned integers in numeric order):
    integer min/max reductions vectorise where float ones do not (0.16 vs 0.5 ns/value). The
    only difference from a float minimum: -0 sorts below +0, which decode alike."""
    if kind == FP32:
        lo32 = np.uint32(0xFFFFFFFF)
        hi32 = np.uint32(0)
        for c in range(row.shape[0]):
            u = np.uint32(row[c])
            k = u ^ (((u >> np.uint32(31)) * np.uint32(0x7FFFFFFF)) | np.uint32(0x80000000))
            lo32 = min(lo32, k)
            hi32 = max(hi32, k)
        return _from_key32(lo32), _from_key32(hi32)
    lo = np.uint32(0xFFFF)
    hi = np.uint32(0)
    for c in range(row.shape[0]):
        u = np.uint32(row[c])
        k = u ^ (((u >> np.uint32(15)) * np.uint32(0x7FFF)) | np.uint32(0x8000))
        lo = min(lo, k)
        hi = max(hi, k)
    return _from_key16(lo, kind), _from_key16(hi, kind)


@njit(nogil=True, error_model="numpy")
def _from_key32(k: np.uint32) -> np.float32:
    u = k ^ np.uint32(0x80000000) if k & np.uint32(0x80000000) else ~k
    return _f32_from_u32(np.uint32(u))


@njit(nogil=True, error_model="numpy")
def _from_key16(k: np.uint32, kind: int) -> np.float32:
    u = k ^ np.uint32(0x8000) if k & np.uint32(0x8000) else ~k & np.uint32(0xFFFF)
    return _load(u, kind)[0]


# Format v2's compact group metadata (docs/FORMAT.md "Group metadata"): a step on a grid of
# 64 steps per octave, STEP_MANTISSAS[i] * 2^e with STEP_MANTISSAS[i] = fp32(2^(i/64)), and an
# anchor (the value of symbol 0) on the lattice of step/ANCHOR_DIVISOR. Both are small integers
# that entropy-code well, where fp32 minima and steps cost 64 bits per group.
STEP_MANTISSAS = np.array([2.0 ** (i / 64) for i in range(64)], dtype=np.float32)
STEP_EXP_BIAS = 150  # code = (e + STEP_EXP_BIAS) * 64 + i; e in [STEP_MIN_EXP, 127]
STEP_MIN_EXP = -123  # the anchor unit step/8 stays a normal fp32 (relative precision kept)
# Largest i with STEP_MANTISSAS[i] <= 1 + k/256, per top-8-mantissa-bit bucket k: the search
# for a step's grid index starts there and moves at most one place (buckets are narrower
# than the grid's 2^(1/64) spacing), with no log2 per group.
_GRID_START = np.array(
    [
        int(np.searchsorted(STEP_MANTISSAS, np.float32(1 + k / 256), side="right")) - 1
        for k in range(256)
    ],
    dtype=np.int64,
)
_GRID_MANT = (STEP_MANTISSAS.view(np.uint32) & np.uint32(0x7FFFFF)).astype(np.int64)
ESCAPE = 0xFFFF  # step code of a group stored as fp32 minimum and step (constant, or no fit)
ANCHOR_DIVISOR = 8
ANCHOR_MAX = 32767  # anchor codes are int16


@njit(nogil=True, error_model="numpy")
def step_of_code(code: int) -> np.float32:
    """The fp32 step of a (non-escape) step code: STEP_MANTISSAS[code % 64] * 2^e, exact (the
    mantissas lie in [1, 2): e goes straight into the exponent bits)."""
    e = (code >> 6) - STEP_EXP_BIAS
    bits = np.int64(_u32_from_f32(STEP_MANTISSAS[code & 63])) + (np.int64(e) << 23)
    return _f32_from_u32(np.uint32(bits))


@njit(nogil=True, error_model="numpy")
def anchor_of_code(code: int, step: np.float32) -> np.float32:
    """The fp32 anchor of anchor code `code` for a group of step `step`: one fp32 product."""
    return np.float32(code) * np.float32(step / np.float32(ANCHOR_DIVISOR))


@njit(nogil=True, error_model="numpy")
def _lattice(
    lo: np.float32, hi: np.float32, step: np.float32, qmax: int
) -> tuple[np.float32, np.float32, int, int]:
    """(anchor, step, step code, anchor code) of a live group with minimum lo, maximum hi and
    fp32 step `step` (docs/FORMAT.md): the largest grid step <= `step`, and an anchor on the
    lattice of step/8 such that lo and hi lie within the symbols' reach (anchor - step/2 and
    anchor + (qmax + 1/2)*step) with a margin of 2^-22 * max(|lo|, |hi|) for fp32 rounding.
    The step code is ESCAPE (and lo, step are returned) when no such pair exists.

    The step only shrinks (the error bound eb*range/2 keeps holding); the half step of room at
    each end of a group's symbol range, (qmax + 1)*step - range >= step, pays for rounding the
    step down (qmax * 2^(1/64) relative) and the anchor to its lattice (step/8)."""
    if step == 0:
        return lo, step, ESCAPE, 0
    bits = np.int64(_u32_from_f32(step))  # a normal fp32 (steps are >= 2^-126): m2 * 2^e
    e = ((bits >> 23) & 0xFF) - 127
    if e < STEP_MIN_EXP or e > 127:
        return lo, step, ESCAPE, 0
    # The grid index from the mantissa bits (integer compares: same order as the values).
    mant = bits & 0x7FFFFF
    i = _GRID_START[mant >> 15]
    while i < 63 and _GRID_MANT[i + 1] <= mant:
        i += 1
    code = int((e + STEP_EXP_BIAS) * 64 + i)
    s = _f32_from_u32(np.uint32(_GRID_MANT[i] | (bits & 0x7F800000)))  # = step_of_code(code)
    s64 = np.float64(s)
    lo64 = np.float64(lo)
    hi64 = np.float64(hi)
    margin = 2.0**-22 * max(abs(lo64), abs(hi64))
    low = lo64 - margin + 0.5 * s64  # the anchor may not exceed this
    high = hi64 + margin - (qmax + 0.5) * s64  # nor fall below this
    j = np.floor(low / (s64 / ANCHOR_DIVISOR))
    for _ in range(2):  # the floor's rounding can leave j one too high
        if abs(j) <= ANCHOR_MAX:
            a = anchor_of_code(int(j), s)
            a64 = np.float64(a)
            if high <= a64 <= low:
                return a, s, code, int(j)
        j -= 1.0
    return lo, step, ESCAPE, 0
