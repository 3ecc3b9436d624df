"""kvpack.codec: pure, device-agnostic tensor code (no gRPC, no network, no files).

Eviction (KVCompose and baselines) decides which tokens survive; lossy encoding (KVComp) decides
how many bits each survivor costs; the container format stores the result.
"""
