"""The torch formulation of grouping and quantisation that the codec used before its fused
numba kernels (kvpack.codec.kernels.quantize_blocks / dequantize_blocks): the reference those
kernels must match bit for bit, and the group order used by the error-bound checks."""

from __future__ import annotations

import torch

from kvpack.codec.quant import levels

MIN_STEP = 2.0**-126


def symbol_dtype(n_levels: int) -> torch.dtype:
    """uint8 symbols up to 256 levels, int16 (values < 2^15) above."""
    return torch.uint8 if n_levels <= 256 else torch.int16


def group_k(x: torch.Tensor, grouping: str, block_tokens: int) -> torch.Tensor:
    """Keys [B, H, nb*T, d] -> groups [nb, G, m]: "channel" G = B*H*d, m = T (one range per
    block, row, head, channel); "block" G = B, m = H*T*d (one range per block and row)."""
    b, h, n, d = x.shape
    nb = n // block_tokens
    x = x.reshape(b, h, nb, block_tokens, d)
    if grouping == "channel":
        return x.permute(2, 0, 1, 4, 3).reshape(nb, b * h * d, block_tokens)
    return x.permute(2, 0, 1, 3, 4).reshape(nb, b, h * block_tokens * d)


def group_v(x: torch.Tensor, block_tokens: int) -> torch.Tensor:
    """Values [B, H, nb*T, d] -> groups [nb, B*H*T, d] (one range per token and head)."""
    b, h, n, d = x.shape
    nb = n // block_tokens
    x = x.reshape(b, h, nb, block_tokens, d).permute(2, 0, 1, 3, 4)
    return x.reshape(nb, b * h * block_tokens, d)


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
