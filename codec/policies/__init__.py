"""Eviction policies by name: KVCompose (the default) and the baselines it is compared with."""

from __future__ import annotations

from kvpack.codec.policies.base import EvictionInput, Policy
from kvpack.codec.policies.baselines import TOVA, KNorm, PyramidKV, Random, SnapKV, Streaming
from kvpack.codec.policies.kvcompose import KVCompose, KVComposeUniform, KVComposeUnstructured

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        KVCompose,
        KVComposeUnstructured,
        KVComposeUniform,
        Streaming,
        SnapKV,
        TOVA,
        PyramidKV,
        KNorm,
        Random,
    )
}

__all__ = ["POLICIES", "EvictionInput", "Policy"]
