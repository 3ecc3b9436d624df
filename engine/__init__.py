"""kvpack.engine: the one compress pipeline, run by the server and by LocalKVPack.

A :class:`CompressRequest` (layout, budget, parsed policy, QuantSettings, store key inputs) is
built once, from a Compress header or from ``compress``'s Python arguments, and validated there;
a :class:`Compression` runs the pipeline over it (select, gather, encode per layer as layers
arrive; assemble, key, summary). Pure of gRPC transport and I/O: it uses the protobuf messages
(the header is one of its inputs, the summary its output) and :mod:`kvpack.errors`, and depends
on :mod:`kvpack.codec`; ``kvpack.server`` and ``kvpack.client`` depend on it, never it on them.
"""

from kvpack.engine.entries import Stored as Stored
from kvpack.engine.entries import codec_name as codec_name
from kvpack.engine.entries import entry_settings as entry_settings
from kvpack.engine.pipeline import Compression as Compression
from kvpack.engine.pipeline import LayerResult as LayerResult
from kvpack.engine.pipeline import Outcome as Outcome
from kvpack.engine.pipeline import compress_cache as compress_cache
from kvpack.engine.request import POLICY_NAMES as POLICY_NAMES
from kvpack.engine.request import STATS_KINDS as STATS_KINDS
from kvpack.engine.request import Allocation as Allocation
from kvpack.engine.request import CompressRequest as CompressRequest
from kvpack.engine.request import Layout as Layout
from kvpack.engine.request import RequestOptions as RequestOptions
from kvpack.engine.request import StatsKind as StatsKind
from kvpack.engine.request import compress_header as compress_header
