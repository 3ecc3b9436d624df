"""Tensor <-> raw little-endian bytes, and the dtype names used on the wire and in containers.

bf16 has no numpy dtype, so every tensor travels as its `uint8` view; nothing here goes through a
numpy float dtype. The server and the client use these functions for the gRPC wire format too.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
FLOAT_DTYPES = ("fp32", "fp16", "bf16")
_NAMES = {v: k for k, v in DTYPES.items()}
_LITTLE = sys.byteorder == "little"


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name ("fp32", "fp16", "bf16", "int64", "int32", "uint8") of a torch dtype."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}; supported: {sorted(DTYPES)}") from None


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype of a wire name; ValueError on an unknown name."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype name {name!r}; known: {sorted(DTYPES)}") from None


def itemsize(name: str) -> int:
    """Bytes per element of the named dtype."""
    return dtype_from_name(name).itemsize


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of `t` (any shape, any device) in row-major order."""
    dtype_name(t.dtype)
    flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    if not _LITTLE and t.element_size() > 1:
        flat = flat.reshape(-1, t.element_size())[:, ::-1]
    return flat.tobytes()


def tensor_to_array(t: torch.Tensor) -> np.ndarray:
    """Raw little-endian bytes of `t` (any shape, any device) in row-major order as a 1-D uint8
    array: a view of `t` where it is a contiguous CPU tensor on a little-endian host, else a
    copy (tensor_to_bytes without the final copy into a bytes object)."""
    dtype_name(t.dtype)
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return np.zeros(0, dtype=np.uint8)
    flat = t.reshape(-1).view(torch.uint8).numpy()
    if not _LITTLE and t.element_size() > 1:
        flat = np.ascontiguousarray(flat.reshape(-1, t.element_size())[:, ::-1]).reshape(-1)
    return flat


def tensor_from_bytes(
    data: bytes | bytearray | memoryview,
    name: str,
    shape: tuple[int, ...] | list[int],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Tensor of dtype `name` and `shape` from raw little-endian bytes (copied; `data` may be
    read-only). ValueError when the byte count does not match the shape."""
    dtype = dtype_from_name(name)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    numel = 1
    for s in shape:
        numel *= s
    size = dtype.itemsize
    if len(data) != numel * size:
        raise ValueError(f"{len(data)} bytes do not hold a {name} tensor of shape {shape}")
    raw = np.frombuffer(data, dtype=np.uint8).copy()
    if not _LITTLE and size > 1:
        raw = np.ascontiguousarray(raw.reshape(-1, size)[:, ::-1]).reshape(-1)
    if numel == 0:  # a 0-element uint8 tensor has stride 0 and refuses .view(dtype)
        out = torch.empty(shape, dtype=dtype)
    else:
        out = torch.from_numpy(raw).view(dtype).reshape(shape)
    return out if device is None else out.to(device)
