"""Eviction policies by name: kvpack's own policy, KVCompose and the baselines they are compared
with."""

from __future__ import annotations

from kvpack.codec.policies.base import EvictionInput, Policy
from kvpack.codec.policies.baselines import TOVA, KNorm, PyramidKV, Random, SnapKV, Streaming
from kvpack.codec.policies.kvcompose import KVCompose, KVComposeUniform, KVComposeUnstructured
from kvpack.codec.policies.kvpack import KVPack

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        KVPack,
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
