"""LMCache chunk layouts as kvpack's per-layer K and V ``[B, H, n, d]`` -- as views, no copies.

An LMCache memory object holds one tensor per layer group, laid out by its ``MemoryFormat``
(T = tokens of the chunk, L = layers, Hd = KV heads x head size):

    KV_2LTD     [2, L, T, Hd]   K and V of every layer (the usual chunk)
    KV_T2D      [T, 2, Hd]      one layer (layer-wise mode)
    KV_2TD      [2, T, Hd]      one layer
    KV_MLA_FMT  [1, L, T, D]    MLA: one latent vector per token and layer, no separate V

A stream ``[T, Hd]`` of one layer is viewed as ``[1, H, T, d]`` (``view`` + ``permute``): the
codec quantises strided views in place, and decoding writes back through the same views into
the memory object LMCache allocated, so neither direction copies the chunk. MLA latents travel as
K with H = 1; their V is an empty ``[1, 1, T, 0]`` view (the container needs both streams).
"""

from __future__ import annotations

import torch

FORMATS = ("KV_2LTD", "KV_T2D", "KV_2TD", "KV_MLA_FMT")

LayerKV = tuple[torch.Tensor, torch.Tensor]


def heads(hidden: int, head_dim: int | None) -> tuple[int, int]:
    """(H, d) for a hidden size: heads of ``head_dim`` if it divides ``hidden``, else one head
    of the whole vector (the codec's channel grouping is per channel either way)."""
    if head_dim and hidden % head_dim == 0:
        return hidden // head_dim, head_dim
    return 1, hidden


def _as_heads(stream: torch.Tensor, head_dim: int | None) -> torch.Tensor:
    """A ``[T, Hd]`` stream (last dimension contiguous) as a ``[1, H, T, d]`` view."""
    t, hidden = stream.shape
    h, d = heads(hidden, head_dim)
    return stream.view(t, h, d).permute(1, 0, 2).unsqueeze(0)


def num_layers(shape: torch.Size | tuple[int, ...], fmt: str) -> int:
    """Layers held by one group tensor of ``shape`` in format ``fmt``."""
    check_format(fmt, shape)
    return int(shape[1]) if fmt in ("KV_2LTD", "KV_MLA_FMT") else 1


def num_tokens(shape: torch.Size | tuple[int, ...], fmt: str) -> int:
    """Tokens (T) of one group tensor of ``shape`` in format ``fmt``."""
    check_format(fmt, shape)
    return int(shape[{"KV_2LTD": 2, "KV_T2D": 0, "KV_2TD": 1, "KV_MLA_FMT": 2}[fmt]])


def check_format(fmt: str, shape: torch.Size | tuple[int, ...]) -> None:
    """ValueError unless ``fmt`` is supported and ``shape`` fits it."""
    want = {"KV_2LTD": (4, 0, 2), "KV_T2D": (3, 1, 2), "KV_2TD": (3, 0, 2), "KV_MLA_FMT": (4, 0, 1)}
    if fmt not in want:
        raise ValueError(
            f"LMCache memory format {fmt} is not a KV layout kvpack encodes (supported: "
            f"{', '.join(FORMATS)}); set remote_serde: naive so the plugin gets raw KV chunks"
        )
    rank, kv_dim, kv_size = want[fmt]
    if len(shape) != rank or int(shape[kv_dim]) != kv_size:
        raise ValueError(
            f"{fmt} tensor must be {rank}-D with {kv_size} at dim {kv_dim}, got {shape}"
        )


def layers(tensor: torch.Tensor, fmt: str, head_dim: int | None) -> list[LayerKV]:
    """Per layer, (K, V) views ``[1, H, T, d]`` of a group tensor in format ``fmt``.

    Writing into the views writes into ``tensor`` (that is how a decoded chunk lands in the
    memory object LMCache hands the plugin)."""
    check_format(fmt, tensor.shape)
    if fmt == "KV_2LTD":
        return [
            (_as_heads(tensor[0, i], head_dim), _as_heads(tensor[1, i], head_dim))
            for i in range(tensor.shape[1])
        ]
    if fmt == "KV_T2D":
        return [(_as_heads(tensor[:, 0], head_dim), _as_heads(tensor[:, 1], head_dim))]
    if fmt == "KV_2TD":
        return [(_as_heads(tensor[0], head_dim), _as_heads(tensor[1], head_dim))]
    out = []
    for i in range(tensor.shape[1]):  # KV_MLA_FMT
        k = _as_heads(tensor[0, i], None)
        out.append((k, k[..., :0]))
    return out
