"""What a compression returns: the composite cache and the server's figures."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LayerStats:
    """One layer's figures from the server's summary (bytes; errors in K/V units)."""

    layer: int
    kept_tokens: int  # b_l per head
    input_bytes: int
    stored_bytes: int
    key_max_abs_error: float
    value_max_abs_error: float
    key_rel_error: float
    value_rel_error: float
    k_error_bound: float = 0.0  # bounds the layer was encoded with (0: not stored / lossless)
    v_error_bound: float = 0.0


@dataclass(frozen=True)
class BudgetChoice:
    """What budget mode chose (``target_ratio`` / ``target_bytes``): ``stored_bytes`` never
    exceeds ``budget_bytes``; ``fp16_bytes`` is the cache's K+V size in fp16; ``token_ratio`` the
    fraction of KV entries evicted; the error bounds and block the container was encoded with;
    ``estimated_damage`` the damage estimate of the choice (attention-mass units, see
    docs/ALGORITHMS.md); ``encodes`` the whole-cache encodings the final check needed."""

    budget_bytes: int
    stored_bytes: int
    fp16_bytes: int
    token_ratio: float
    k_error_bound: float
    v_error_bound: float
    block_tokens: int
    estimated_damage: float
    encodes: int


@dataclass
class CompressResult:
    """A compressed cache.

    Attributes:
        keys, values: per-layer composite K/V ``[B, Hkv, b_l, d]`` on the caller's device (empty
            lists when the cache was not asked back).
        indices: per-layer kept positions ``[B, Hkv, b_l]`` (int64; -1 pads rows/heads that
            keep fewer).
        key: the store key ('' when not stored).
        input_bytes, kept_bytes, stored_bytes: raw uploaded, raw composite and stored bytes.
        token_ratio: fraction of KV entries removed.
        compression_ratio: input_bytes / stored_bytes (x; 0 when not stored).
        timings_seconds: server stage -> seconds.
        budget: what budget mode chose (None without ``target_ratio`` / ``target_bytes``).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    indices: list[torch.Tensor]
    key: str
    layers: list[LayerStats] = field(default_factory=list)
    input_bytes: int = 0
    kept_bytes: int = 0
    stored_bytes: int = 0
    token_ratio: float = 0.0
    compression_ratio: float = 0.0
    timings_seconds: dict[str, float] = field(default_factory=dict)
    budget: BudgetChoice | None = None


@dataclass(frozen=True)
class EntryInfo:
    """A stored entry (Stat / List)."""

    key: str
    stored_bytes: int
    original_bytes: int  # raw bytes of the cache it decodes to
    created_unix: float  # seconds since the epoch
    num_layers: int
    dtype: str  # "float16", "bfloat16", "float32" ('' when unknown)
    codec: str  # e.g. "lossy/huffman"
    settings: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerInfo:
    """What a server offers (Info)."""

    version: str
    policies: list[str]
    quant_modes: list[str]
    entropy_coders: list[str]
    container_version: int
    store: str
    auth_required: bool
    limits: dict[str, int]  # proto Limits field -> value
