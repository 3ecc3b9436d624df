"""kvpack.client: talk to a kvpack server (sync or asyncio) or run kvpack in-process.

``KVPackClient`` / ``AsyncKVPackClient`` stream caches to a server and decode fetched entries
locally; ``LocalKVPack`` offers the same methods without a server (running the server's engine).
``KVPack`` / ``AsyncKVPack`` are the protocols they implement, ``CompressOptions`` the keyword
arguments of ``compress``. The Hugging Face integration lives in ``kvpack.client.hf`` (needs the
``hf`` extra).
"""

from typing import TYPE_CHECKING

from kvpack.client.aio import AsyncKVPackClient as AsyncKVPackClient
from kvpack.client.api import AsyncKVPack as AsyncKVPack
from kvpack.client.api import CompressOptions as CompressOptions
from kvpack.client.api import KVPack as KVPack
from kvpack.client.channel import TLS as TLS
from kvpack.client.local import LocalKVPack as LocalKVPack
from kvpack.client.result import CompressResult as CompressResult
from kvpack.client.result import EntryInfo as EntryInfo
from kvpack.client.result import LayerStats as LayerStats
from kvpack.client.result import ServerInfo as ServerInfo
from kvpack.client.sync import KVPackClient as KVPackClient

if TYPE_CHECKING:  # mypy checks that the three implementations satisfy the protocols

    def _implementations(
        sync: KVPackClient, local: LocalKVPack, aio: AsyncKVPackClient
    ) -> tuple[KVPack, KVPack, AsyncKVPack]:
        return sync, local, aio
