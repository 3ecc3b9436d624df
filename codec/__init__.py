"""kvpack.codec: pure, device-agnostic tensor code (no gRPC, no network, no files).

Eviction (KVCompose and baselines) decides which tokens survive; lossy encoding (KVComp) decides
how many bits each survivor costs; the container format stores the result.
"""

# eviction (KVCompose + baselines)
from kvpack.codec.composite import gather as gather
from kvpack.codec.policies import POLICIES as POLICIES
from kvpack.codec.selection import select as select
from kvpack.codec.stats import reduce_gqa as reduce_gqa
from kvpack.codec.stats import scores_from_attention as scores_from_attention
from kvpack.codec.stats import scores_from_window as scores_from_window
