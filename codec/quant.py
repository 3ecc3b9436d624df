"""Error-bounded uniform quantisation (KVComp §2) and the fixed-width bit packing of the baseline.

A group is a row of `m` values. With mn/mx its min/max and eb the relative bound:
step = max(eb*(mx-mn), 2^-126), q = clamp(round((x-mn)/step), 0, qmax), x̂ = mn + q*step,
all in fp32, so |x - x̂| <= step/2 up to fp32 rounding (docs/FORMAT.md states the exact bound).
A constant group (mx == mn) is stored with step 0 and contributes no symbols.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kvpack.codec import kernels

# Smallest normal fp32: a step below it would lose relative precision (subnormal), which would
# break the bound; such groups span < 2^-126/eb and are still reconstructed within step/2.
MIN_STEP = 2.0**-126


def levels(eb: float) -> int:
    """Number of quantisation levels for relative error bound eb: ceil(1/eb) + 1 (21 at 0.05)."""
    # The 1e-9 keeps 1/0.05 == 20.000000000000004-style float noise from adding a level.
    return math.ceil(1.0 / eb - 1e-9) + 1


def symbol_dtype(n_levels: int) -> torch.dtype:
    """uint8 symbols up to 256 levels, int16 (values < 2^15) above."""
    return torch.uint8 if n_levels <= 256 else torch.int16


def fixed_bits(n_levels: int) -> int:
    """Bits per value of the fixed-width baseline: ceil(log2(levels)), at least 1."""
    return max(1, math.ceil(math.log2(n_levels)))


def group_k(x: torch.Tensor, grouping: str, block_tokens: int) -> torch.Tensor:
    """Keys [B, H, nb*T, d] -> groups [nb, G, m]: "channel" G = B*H*d, m = T (one range per
    block, row, head, channel); "block" G = B, m = H*T*d (one range per block and row)."""
    b, h, n, d = x.shape
    nb = n // block_tokens
    x = x.reshape(b, h, nb, block_tokens, d)
    if grouping == "channel":
        return x.permute(2, 0, 1, 4, 3).reshape(nb, b * h * d, block_tokens)
    return x.permute(2, 0, 1, 3, 4).reshape(nb, b, h * block_tokens * d)


def ungroup_k(g: torch.Tensor, shape: tuple[int, int, int, int], grouping: str) -> torch.Tensor:
    """Inverse of group_k: groups [nb, G, m] -> keys of `shape` [B, H, nb*T, d]."""
    b, h, n, d = shape
    nb = g.shape[0]
    t = n // nb if nb else 0
    if grouping == "channel":
        x = g.reshape(nb, b, h, d, t).permute(1, 2, 0, 4, 3)
    else:
        x = g.reshape(nb, b, h, t, d).permute(1, 2, 0, 3, 4)
    return x.reshape(b, h, n, d)


def group_v(x: torch.Tensor, block_tokens: int) -> torch.Tensor:
    """Values [B, H, nb*T, d] -> groups [nb, B*H*T, d] (one range per token and head)."""
    b, h, n, d = x.shape
    nb = n // block_tokens
    x = x.reshape(b, h, nb, block_tokens, d).permute(2, 0, 1, 3, 4)
    return x.reshape(nb, b * h * block_tokens, d)


def ungroup_v(g: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Inverse of group_v: groups [nb, B*H*T, d] -> values of `shape` [B, H, nb*T, d]."""
    b, h, n, d = shape
    nb = g.shape[0]
    t = n // nb if nb else 0
    return g.reshape(nb, b, h, t, d).permute(1, 2, 0, 3, 4).reshape(b, h, n, d)


def quantize(groups: torch.Tensor, eb: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise groups [..., G, m] (any float dtype, any device) with relative bound eb.

    Returns (q [..., G, m] uint8/int16 in [0, levels(eb)-1], mn [..., G] fp32,
    step [..., G] fp32 with 0 marking a constant group). ValueError on non-finite values or a
    range that overflows fp32 (use mode "lossless" for such data).
    """
    x = groups.to(torch.float32)
    if x.numel() == 0:
        shape = x.shape[:-1]
        zeros = torch.zeros(shape, dtype=torch.float32, device=x.device)
        return torch.zeros(x.shape, dtype=symbol_dtype(levels(eb)), device=x.device), zeros, zeros
    mn = x.amin(-1)
    rng = x.amax(-1) - mn
    if not bool(torch.isfinite(rng).all()):
        raise ValueError("non-finite values or a group range beyond fp32; use mode 'lossless'")
    const = rng == 0
    step = torch.clamp(rng * eb, min=MIN_STEP)
    q = torch.round((x - mn.unsqueeze(-1)) / step.unsqueeze(-1))
    q = q.clamp_(0, levels(eb) - 1).to(symbol_dtype(levels(eb)))
    return q, mn, torch.where(const, torch.zeros_like(step), step)


def dequantize(
    q: torch.Tensor, mn: torch.Tensor, step: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """x̂ = mn + q*step in fp32 for q [..., G, m], mn/step [..., G]; cast to `dtype`.

    Values are clamped to the finite range of `dtype` first: the input was finite there, so the
    clamp never increases the error and a top level just above a max-range value cannot become inf.
    """
    x = torch.addcmul(mn.unsqueeze(-1), q.to(torch.float32), step.unsqueeze(-1))
    if dtype != torch.float32:
        big = torch.finfo(dtype).max
        x = x.clamp_(-big, big)
    return x.to(dtype)


def pack_fixed(symbols: np.ndarray, bits: int) -> bytes:
    """Bit-pack non-negative integer symbols (1-D, each < 2^bits) with `bits` (<= 16) bits each,
    MSB first, zero-padded to a byte."""
    return kernels.pack_fixed(np.ascontiguousarray(symbols).reshape(-1), bits).tobytes()


def unpack_fixed(data: bytes | memoryview, count: int, bits: int) -> np.ndarray:
    """Inverse of pack_fixed: `count` symbols (uint16 [count]) from ceil(count*bits/8) bytes."""
    return kernels.unpack_fixed(np.frombuffer(data, dtype=np.uint8), count, bits)
