"""Eviction policies by name: kvpack's own policy, KVCompose and the baselines they are compared
with."""

from __future__ import annotations

from kvpack.codec.policies.base import EvictionInput, Policy
from kvpack.codec.policies.baselines import TOVA, KNorm, PyramidKV, Random, SnapKV, Streaming
from kvpack.codec.policies.kvcompose import KVCompose, KVComposeUniform, KVComposeUnstructured
from kvpack.codec.policies.kvpack import KVPack

#: The policy of a request that names none (codec.select, the engine, the clients): kvpack's
#: own, ahead of KVCompose on the reference model at every ratio (docs/QUALITY.md, issue #22).
DEFAULT_POLICY = "kvpack"

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

__all__ = ["DEFAULT_POLICY", "POLICIES", "EvictionInput", "Policy"]
