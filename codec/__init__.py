"""kvpack.codec: pure, device-agnostic tensor code (no gRPC, no network, no files).

Eviction (KVCompose and baselines) decides which tokens survive; lossy encoding (KVComp) decides
how many bits each survivor costs; the container format stores the result.
"""

# eviction (KVCompose + baselines)
from kvpack.codec.composite import gather as gather
from kvpack.codec.policies import POLICIES as POLICIES
from kvpack.codec.policies.base import Policy as Policy
from kvpack.codec.policy_settings import PolicySettings as PolicySettings
from kvpack.codec.selection import make_policy as make_policy
from kvpack.codec.selection import policy_for_layout as policy_for_layout
from kvpack.codec.selection import select as select
from kvpack.codec.stats import reduce_gqa as reduce_gqa
from kvpack.codec.stats import scores_from_attention as scores_from_attention
from kvpack.codec.stats import scores_from_window as scores_from_window

# isort: split
# lossy encoding + container
from kvpack.codec.container import CONTAINER_VERSION as CONTAINER_VERSION
from kvpack.codec.container import MAX_META_CHARS as MAX_META_CHARS
from kvpack.codec.container import ContainerHeader as ContainerHeader
from kvpack.codec.container import DecodedCache as DecodedCache
from kvpack.codec.container import append as append
from kvpack.codec.container import assemble as assemble
from kvpack.codec.container import decode as decode
from kvpack.codec.container import encode as encode
from kvpack.codec.container import read_header as read_header
from kvpack.codec.container import slice_layers as slice_layers
from kvpack.codec.container import verify as verify
from kvpack.codec.format_error import FormatError as FormatError
from kvpack.codec.layer_codec import EncodedLayer as EncodedLayer
from kvpack.codec.layer_codec import LayerStats as LayerStats
from kvpack.codec.layer_codec import encode_layer as encode_layer
from kvpack.codec.quant_settings import ENTROPY_CODERS as ENTROPY_CODERS
from kvpack.codec.quant_settings import K_GROUPINGS as K_GROUPINGS
from kvpack.codec.quant_settings import MODES as MODES
from kvpack.codec.quant_settings import QuantSettings as QuantSettings
from kvpack.codec.rawbytes import dtype_from_name as dtype_from_name
from kvpack.codec.rawbytes import dtype_name as dtype_name
from kvpack.codec.rawbytes import tensor_from_bytes as tensor_from_bytes
from kvpack.codec.rawbytes import tensor_to_bytes as tensor_to_bytes
from kvpack.codec.warmup import warm_up as warm_up
