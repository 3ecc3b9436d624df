"""kvpack behind LMCache (vLLM, SGLang): a storage plugin and a serde plugin for LMCache 0.5.6.

- ``kvpack.client.lmcache.connector.KVPackConnector``: a RemoteConnector that stores every KV
  chunk LMCache offloads in a kvpack service, encoded by kvpack's codec, and decodes it into the
  memory object LMCache hands it on a hit (``remote_storage_plugins: [kvpack]``).
- ``kvpack.client.lmcache.serde``: registers the serde type ``kvpack`` in LMCache's serde
  factory, for deployments that keep LMCache's own L2 storage but want kvpack's compression.

Configuration, measurements and limits: docs/LMCACHE.md. Install next to LMCache with
``pip install -c constraints.txt 'kvpack[lmcache]'``.

This package's ``__init__`` imports nothing from LMCache: keys, settings, layout, chunk_codec,
sizing and ratelimit are plain kvpack code (tested without LMCache); connector, serde and cli
import LMCache.
"""
