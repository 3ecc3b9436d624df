"""Error-bounded uniform quantisation (KVComp §2) and the fixed-width bit packing of the baseline.

A group is a row of `m` values. With mn/mx its min/max and eb the relative bound:
step = max(eb*(mx-mn), 2^-126), q = clamp(round((x-mn)/step), 0, qmax), x̂ = mn + q*step,
all in fp32, so |x - x̂| <= step/2 up to fp32 rounding (docs/FORMAT.md states the exact bound).
A constant group (mx == mn) is stored with step 0 and contributes no symbols.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvpack.codec import kernels
from kvpack.codec.stream import fixed_bits as fixed_bits
from kvpack.codec.stream import group_shape as group_shape
from kvpack.codec.stream import levels as levels

_GROUPINGS = {
    "v": kernels.GROUP_V,
    "channel": kernels.GROUP_K_CHANNEL,
    "block": kernels.GROUP_K_BLOCK,
}


@dataclass(frozen=True)
class Quantized:
    """One stream's blocks, quantised: `symbols` of the live groups (1-D uint8, uint16 above 256
    levels) block after block, `counts` (int64 [nb]) symbols per block, group minima `mn` and
    steps `step` (float32 [nb, G], step 0 = constant group), per-block symbol histograms `hist`
    (int64 [nb, levels]); errors of the decoded values (in the input dtype) against the input:
    max |x - x̂| and sum (x - x̂)^2, and the input's sum x^2 (float64 sums).

    Quantised with `lattice` (container format v2), `mn` holds each group's anchor (the value of
    symbol 0: the minimum rounded to the compact grid, within step/2 of it) and `step` its
    compact step; `step_codes` (uint16 [nb, G], kernels.ESCAPE = stored as fp32 mn and step)
    and `anchor_codes` (int16 [nb, G]) are their codes. Both are None otherwise."""

    symbols: np.ndarray
    counts: np.ndarray
    mn: np.ndarray
    step: np.ndarray
    hist: np.ndarray
    max_err: float
    sq_err: float
    sq_norm: float
    step_codes: np.ndarray | None = None
    anchor_codes: np.ndarray | None = None


def _float_kind(dtype: torch.dtype) -> int:
    return {torch.float32: kernels.FP32, torch.float16: kernels.FP16}.get(dtype, kernels.BF16)


def _bits(x: torch.Tensor) -> np.ndarray:
    """Element bits of CPU tensor x as a numpy view of the same shape and strides (uint16 for
    fp16/bf16, uint32 for fp32)."""
    bits = x.view(torch.int32 if x.element_size() == 4 else torch.int16).numpy()
    return bits.view(np.uint32 if x.element_size() == 4 else np.uint16)


def quantize_blocks(
    x: torch.Tensor,
    grouping: str,
    block_tokens: int,
    eb: float,
    n_blocks: int | None = None,
    *,
    lattice: bool = False,
) -> Quantized:
    """Quantise the first n_blocks blocks of block_tokens tokens (default: all whole blocks) of
    x [B, H, n, d] (fp32/fp16/bf16, any device) with relative bound eb and `grouping` ("v",
    "channel" or "block", see group_shape), as docs/FORMAT.md; `lattice`: against format v2's
    compact anchors and steps (fp32 minima and steps without).

    ValueError on non-finite values or a group range that overflows fp32 (use mode "lossless").
    """
    x = x.detach().to("cpu")
    nb = x.shape[2] // block_tokens if n_blocks is None else n_blocks
    if nb * block_tokens > x.shape[2]:
        raise ValueError(f"{nb} blocks of {block_tokens} tokens exceed {x.shape[2]} tokens")
    g, m = group_shape(grouping, x.shape, block_tokens)
    n_levels = levels(eb)
    symbols = np.empty(nb * g * m, dtype=np.uint8 if n_levels <= 256 else np.uint16)
    counts = np.zeros(nb, dtype=np.int64)
    mn = np.zeros((nb, g), dtype=np.float32)
    step = np.zeros((nb, g), dtype=np.float32)
    hist = np.zeros((nb, n_levels), dtype=np.int64)
    acc = np.zeros(3, dtype=np.float64)
    step_codes = np.full((nb, g), kernels.ESCAPE, dtype=np.uint16)
    anchor_codes = np.zeros((nb, g), dtype=np.int16)
    if nb and g * m:
        # The kernel reads contiguous [T, d] tiles: a strided input is copied once here.
        bad = kernels.quantize_blocks(
            _bits(x.contiguous()),
            nb,
            block_tokens,
            _float_kind(x.dtype),
            _GROUPINGS[grouping],
            eb,
            n_levels - 1,
            symbols,
            counts,
            mn,
            step,
            hist,
            acc,
            lattice,
            step_codes,
            anchor_codes,
        )
        if bad:
            raise ValueError("non-finite values or a group range beyond fp32; use mode 'lossless'")
    live = int(counts.sum())
    codes = (step_codes, anchor_codes) if lattice else (None, None)
    return Quantized(
        symbols[:live],
        counts,
        mn,
        step,
        hist,
        float(acc[0]),
        float(acc[1]),
        float(acc[2]),
        *codes,
    )


def dequantize_blocks(
    symbols: np.ndarray,
    mn: np.ndarray,
    step: np.ndarray,
    grouping: str,
    n_levels: int,
    out: torch.Tensor,
    block_tokens: int | None = None,
) -> None:
    """Write x̂ = mn + q*step (fp32, one rounding), clamped to the finite range of out's dtype and
    rounded to it (nearest even), into the first nb = len(mn) blocks of block_tokens tokens
    (default: out holds exactly nb blocks) of out [B, H, n, d] (a CPU fp32/fp16/bf16 tensor;
    contiguous is fastest, any strides work).

    symbols: the live groups' symbols of all blocks back to back (1-D uint8/uint16); mn/step:
    float32 [nb, G]. ValueError when their number does not match the live groups, or naming
    the first block with a symbol >= n_levels.
    """
    nb = mn.shape[0]
    if nb == 0 or out.numel() == 0:
        return
    if block_tokens is None:
        block_tokens = out.shape[2] // nb
    if nb * block_tokens > out.shape[2]:
        raise ValueError(f"{nb} blocks of {block_tokens} tokens exceed {out.shape[2]} tokens")
    _, m = group_shape(grouping, tuple(out.shape), block_tokens)
    need = int((step != 0).sum()) * m
    if symbols.size != need:
        raise ValueError(f"{symbols.size} symbols for {need} values of live groups")
    # The kernel writes contiguous [T, d] tiles of a C-contiguous [B, H, n, d] array: a
    # strided `out` gets a contiguous copy written and copied back.
    target = out if out.is_contiguous() else out.contiguous()
    bad = kernels.dequantize_blocks(
        np.ascontiguousarray(symbols),
        np.ascontiguousarray(mn, dtype=np.float32),
        np.ascontiguousarray(step, dtype=np.float32),
        _GROUPINGS[grouping],
        _float_kind(out.dtype),
        n_levels - 1,
        block_tokens,
        _bits(target),
    )
    if bad >= 0:
        raise ValueError(f"block {bad}: symbol outside {n_levels} levels")
    if target is not out:
        out.copy_(target)


def pack_fixed(symbols: np.ndarray, bits: int) -> bytes:
    """Bit-pack non-negative integer symbols (1-D, each < 2^bits) with `bits` (<= 16) bits each,
    MSB first, zero-padded to a byte."""
    return kernels.pack_fixed(np.ascontiguousarray(symbols).reshape(-1), bits).tobytes()


def unpack_fixed(data: bytes | memoryview, count: int, bits: int) -> np.ndarray:
    """Inverse of pack_fixed: `count` symbols (uint16 [count]) from ceil(count*bits/8) bytes."""
    return kernels.unpack_fixed(np.frombuffer(data, dtype=np.uint8), count, bits)
