"""kvpack.client: talk to a kvpack server (sync or asyncio) or run kvpack in-process.

``KVPackClient`` / ``AsyncKVPackClient`` stream caches to a server and decode fetched entries
locally; ``LocalKVPack`` offers the same methods without a server. The Hugging Face integration
lives in ``kvpack.client.hf`` (needs the ``hf`` extra).
"""

from kvpack.client.aio import AsyncKVPackClient as AsyncKVPackClient
from kvpack.client.channel import TLS as TLS
from kvpack.client.local import LocalKVPack as LocalKVPack
from kvpack.client.result import CompressResult as CompressResult
from kvpack.client.result import EntryInfo as EntryInfo
from kvpack.client.result import LayerStats as LayerStats
from kvpack.client.result import ServerInfo as ServerInfo
from kvpack.client.sync import KVPackClient as KVPackClient
