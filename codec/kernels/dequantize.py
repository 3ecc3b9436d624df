"""Dequantisation of every block of one stream in one call, into the output layout."""

from __future__ import annotations

import numpy as np
from numba import njit

from kvpack.codec.kernels.floats import (
    BF16,
    FP16,
    FP32,
    GROUP_K_BLOCK,
    GROUP_K_CHANNEL,
    _fma32,
    _store_value,
)
from kvpack.codec.kernels.jit import _kernel


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
