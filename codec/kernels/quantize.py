"""Quantisation of every block of one stream in one call: widen, min/max, step, symbols,
histograms and error statistics (docs/FORMAT.md)."""

from __future__ import annotations

import numpy as np
from numba import njit

from kvpack.codec.kernels.floats import (
    BF16,
    FP16,
    FP32,
    GROUP_K_BLOCK,
    GROUP_K_CHANNEL,
    _f64_from_i64,
    _fma32,
    _i64_from_f64,
    _lattice,
    _load,
    _row_range_bits,
    _step,
    _store_value,
    _symbol,
    _widen,
)
from kvpack.codec.kernels.jit import _kernel


@njit(nogil=True, error_model="numpy", inline="always")
def _quantize_tile_as(
    buf: np.ndarray,
    lo: np.ndarray,
    div: np.ndarray,
    st: np.ndarray,
    by_col: bool,
    kind: int,
    qmax: int,
    qt: np.ndarray,
    back: np.ndarray,
) -> None:
    """qt[t, c] = symbol of buf[t, c] (fp32 [T, m]) in its group, whose minimum, divisor and
    step are lo[g], div[g], st[g] with g = c when by_col (K channel groups) else g = t (V token
    groups); back[t, c] = its reconstruction as decoded in float kind `kind` (widened to fp32).
    Constant groups (step 0, divisor 1) get symbol 0, which decodes to their value exactly.

    Inlined with `kind` a constant at each call site, so the kind test folds away and both
    loops vectorise (no reductions: the error statistics are _tile_stats's)."""
    t_len, m = buf.shape
    top = np.float32(qmax)
    zero = np.float32(0.0)
    if by_col:
        for t in range(t_len):
            for c in range(m):
                r = np.rint((buf[t, c] - lo[c]) / div[c])
                s = min(max(r, zero), top)
                qt[t, c] = s
                back[t, c] = _store_value(_fma32(s, st[c], lo[c]), kind)[1]
    else:
        for t in range(t_len):
            mn = lo[t]
            d = div[t]
            sp = st[t]
            for c in range(m):
                r = np.rint((buf[t, c] - mn) / d)
                s = min(max(r, zero), top)
                qt[t, c] = s
                back[t, c] = _store_value(_fma32(s, sp, mn), kind)[1]


@njit(nogil=True, error_model="numpy")
def _quantize_tile(
    buf: np.ndarray,
    lo: np.ndarray,
    div: np.ndarray,
    st: np.ndarray,
    by_col: bool,
    src: int,
    qmax: int,
    qt: np.ndarray,
    back: np.ndarray,
) -> None:
    """_quantize_tile_as for the float kind `src`, one specialised copy per kind."""
    if src == FP16:
        _quantize_tile_as(buf, lo, div, st, by_col, FP16, qmax, qt, back)
    elif src == BF16:
        _quantize_tile_as(buf, lo, div, st, by_col, BF16, qmax, qt, back)
    else:
        _quantize_tile_as(buf, lo, div, st, by_col, FP32, qmax, qt, back)


# Only the two sums may be reordered (they are reported, not stored, and compared with a 1e-9
# relative tolerance); the maximum is taken exactly, on the bits of the non-negative errors.
@njit(nogil=True, error_model="numpy", fastmath={"reassoc", "nnan", "ninf", "nsz"})
def _tile_stats(buf: np.ndarray, back: np.ndarray, acc: np.ndarray) -> None:
    """Fold max |back - buf|, sum (back - buf)^2 and sum buf^2 (float64) of a tile into acc."""
    a = buf.ravel()
    r = back.ravel()
    top = _i64_from_f64(acc[0])
    e_sq = 0.0
    norm = 0.0
    for i in range(a.shape[0]):
        v = np.float64(a[i])
        e = abs(np.float64(r[i]) - v)
        top = max(top, _i64_from_f64(e))
        e_sq += e * e
        norm += v * v
    acc[0] = _f64_from_i64(top)
    acc[1] += e_sq
    acc[2] += norm


@njit(nogil=True, error_model="numpy")
def _emit_symbols(q: np.ndarray, step: np.ndarray, by_col: bool, syms: np.ndarray, w: int) -> int:
    """Append the symbols of the live groups (step != 0) of tile q [T, m] to syms[w:] in group
    order (columns when by_col, else rows). Returns the next write position."""
    t_len, m = q.shape
    # Writes go through views indexed from 0: numba's negative-index wraparound check on a
    # runtime offset (syms[w + c]) keeps a loop from vectorising.
    if by_col:
        for c in range(m):
            if step[c] != 0:
                dst = syms[w : w + t_len]
                for t in range(t_len):
                    dst[t] = q[t, c]
                w += t_len
    else:
        for t in range(t_len):
            if step[t] != 0:
                dst = syms[w : w + m]
                row = q[t]
                for c in range(m):
                    dst[c] = row[c]
                w += m
    return w


@njit(nogil=True, error_model="numpy")
def _count(syms: np.ndarray, lo: int, hi: int, hist4: np.ndarray, hist: np.ndarray) -> None:
    """hist += histogram of syms[lo:hi], counted in four partial histograms hist4 [4, levels]
    (zeroed here) so that runs of equal symbols do not serialise on one counter."""
    hist4[:] = 0
    part = syms[lo:hi]
    n4 = part.shape[0] // 4 * 4
    for i in range(0, n4, 4):
        hist4[0, part[i]] += 1
        hist4[1, part[i + 1]] += 1
        hist4[2, part[i + 2]] += 1
        hist4[3, part[i + 3]] += 1
    for i in range(n4, part.shape[0]):
        hist4[0, part[i]] += 1
    for k in range(4):
        for s in range(hist.shape[0]):
            hist[s] += hist4[k, s]


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
    x4: np.ndarray,
    nb: int,
    t_len: int,
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
    lattice: bool,
    scode: np.ndarray,
    acode: np.ndarray,
) -> int:
    """Quantise every group of the first nb blocks of t_len tokens of one stream (docs/FORMAT.md).

    x4: element bits [B, H, n, d] (C-contiguous, n >= nb * t_len; uint16 for fp16/bf16, uint32
    for fp32) of float kind `src`; grouping: GROUP_V / GROUP_K_CHANNEL / GROUP_K_BLOCK; eb:
    relative error bound (used as fp32); qmax = levels - 1. Writes per block i the group minima
    mn[i] and steps step[i] (float32 [nb, G]; step 0 for a constant group), the symbols of its
    live groups in group order to syms (1-D, room for nb*G*m) at the running position, their
    count to counts[i] and their histogram to hist[i] (int64 [nb, levels], zeroed by the
    caller); folds the error statistics into acc (float64 [3]: max |x - x̂|, sum (x - x̂)^2,
    sum x^2; zeroed by the caller). With `lattice` (format v2) each live group's minimum and step
    are replaced by the compact anchor and step of floats._lattice before quantising, and their
    codes written to scode (uint16 [nb, G]; ESCAPE for a group kept in fp32) and acode (int16
    [nb, G]); mn and step then hold the anchor and step the decoder will use. Returns 0, or 1
    when a value is non-finite or a group range overflows fp32 (outputs then undefined).

    V and K-channel groups go tile by tile ([T, d] of one block, batch row and head): widen to
    fp32, min/max, quantise, error statistics, emit symbols; each of these loops is branch-free
    over a contiguous tile so it vectorises, where a single fused per-value loop did not.
    """
    nbatch, nheads, _, d = x4.shape
    eb32 = np.float32(eb)
    w = 0
    buf = np.empty((t_len, d), dtype=np.float32)
    back = np.empty((t_len, d), dtype=np.float32)
    qt = np.empty((t_len, d), dtype=syms.dtype)
    hist4 = np.zeros((4, qmax + 1), dtype=np.int64)
    n_groups = d if grouping == GROUP_K_CHANNEL else t_len
    lo = np.empty(n_groups, dtype=np.float32)
    hi = np.empty(n_groups, dtype=np.float32)
    st = np.empty(n_groups, dtype=np.float32)
    div = np.empty(n_groups, dtype=np.float32)
    by_col = grouping == GROUP_K_CHANNEL
    for blk in range(nb):
        start = w
        if grouping == GROUP_K_BLOCK:
            tokens = x4[:, :, blk * t_len : (blk + 1) * t_len]
            w = _quantize_k_block(
                tokens,
                src,
                eb32,
                qmax,
                syms,
                w,
                mn[blk],
                step[blk],
                hist[blk],
                acc,
                lattice,
                scode[blk],
                acode[blk],
            )
            if w < 0:
                return 1
            counts[blk] = w - start
            continue
        for b in range(nbatch):
            for h in range(nheads):
                tile = x4[b, h, blk * t_len : (blk + 1) * t_len]
                if not _widen(tile, src, buf):
                    return 1
                if by_col:
                    lo[:] = buf[0]
                    hi[:] = buf[0]
                    for t in range(1, t_len):
                        for c in range(d):
                            v = buf[t, c]
                            lo[c] = v if v < lo[c] else lo[c]
                            hi[c] = v if v > hi[c] else hi[c]
                else:
                    for t in range(t_len):
                        lo[t], hi[t] = _row_range_bits(tile[t], src)
                g0 = (b * nheads + h) * n_groups
                for g in range(n_groups):
                    s, fine = _step(lo[g], hi[g], eb32)
                    if not fine:
                        return 1
                    if lattice:
                        a, s, sc, ac = _lattice(lo[g], hi[g], s, qmax)
                        lo[g] = a
                        scode[blk, g0 + g] = sc
                        acode[blk, g0 + g] = ac
                    st[g] = s
                    div[g] = s if s != 0 else np.float32(1.0)
                    mn[blk, g0 + g] = lo[g]
                    step[blk, g0 + g] = s
                _quantize_tile(buf, lo, div, st, by_col, src, qmax, qt, back)
                _tile_stats(buf, back, acc)
                w = _emit_symbols(qt, st, by_col, syms, w)
        _count(syms, start, w, hist4, hist[blk])
        counts[blk] = w - start
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
    lattice: bool,
    scode: np.ndarray,
    acode: np.ndarray,
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
        if lattice:
            lo, st, sc, ac = _lattice(lo, hi, st, qmax)
            scode[b] = sc
            acode[b] = ac
        mn[b] = lo
        step[b] = st
        for h in range(nheads):
            for t in range(t_len):
                if st != 0:
                    w = _row_quantize(grp[h, t], src, lo, st, qmax, syms, w, hist, acc)
                else:
                    acc[2] += grp.shape[2] * np.float64(lo) * np.float64(lo)
    return w
