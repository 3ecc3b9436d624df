"""Quantisation of every block of one stream in one call: widen, min/max, step, symbols,
histograms and error statistics (docs/FORMAT.md)."""

from __future__ import annotations

import numpy as np
from numba import njit

from kvpack.codec.kernels.floats import (
    GROUP_K_BLOCK,
    GROUP_K_CHANNEL,
    _fma32,
    _load,
    _row_min_max,
    _step,
    _store_value,
    _symbol,
    _widen,
)
from kvpack.codec.kernels.jit import _kernel


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
