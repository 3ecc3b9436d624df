"""LMCache RemoteConnector that stores each KV chunk in a kvpack service, lossy-encoded.

Turned on by LMCache's plugin mechanism (LMCache 0.5.6, ``remote_storage_plugins``)::

    remote_serde: naive                 # the plugin encodes; LMCache must hand it raw KV
    remote_storage_plugins: ["kvpack"]
    extra_config:
      remote_storage_plugin.kvpack.module_path: kvpack.client.lmcache.connector
      remote_storage_plugin.kvpack.class_name: KVPackConnector
      remote_storage_plugin.kvpack.target: "kvpack.internal:50051"
      remote_storage_plugin.kvpack.token: "..."       # options: kvpack.client.lmcache.settings

LMCache builds the connector with only ``loop``, ``local_cpu_backend`` and ``config`` (its
DynamicConnectorAdapter); the model metadata comes from ``local_cpu_backend.metadata`` and the
plugin's name from the config. Contracts honoured here:

- Methods are coroutines on LMCache's event loop; encoding, decoding and the blocking kvpack
  calls run on a small thread pool (``workers``) so the loop never stalls.
- ``put`` has finished reading the memory object when it returns (LMCache releases it then).
- Nothing raises into the engine: an unreachable service, a timeout, a damaged or foreign entry
  is a miss (``get`` None, ``exists`` False, ``put`` dropped) plus a rate-limited warning. After
  an unreachable call the plugin answers "miss" for ``down_for`` seconds without calling.
- ``get`` allocates the memory object from LMCache's local CPU backend with the shapes recorded
  in the entry (so partial chunks round-trip) and releases it again if decoding fails.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from lmcache.logging import init_logger
from lmcache.v1.health_monitor.constants import PING_GENERIC_ERROR_CODE
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector

from kvpack import codec
from kvpack.client import KVPackClient
from kvpack.client.lmcache import chunk_codec, settings
from kvpack.client.lmcache.keys import kvpack_key, lmcache_key
from kvpack.client.lmcache.ratelimit import RateLimitedLog
from kvpack.codec import FormatError, QuantSettings
from kvpack.errors import DataLoss, DeadlineExceeded, KVPackError, NotFound, Unavailable

logger = init_logger(__name__)
T = TypeVar("T")


def find_plugin_name(config: Any, cls: type) -> str:
    """The ``remote_storage_plugins`` entry whose module_path/class_name name ``cls``.

    LMCache 0.5.6 does not tell a dynamically loaded connector its instance name, so it is
    recovered from the config; two kvpack entries in one config cannot be told apart."""
    extra = config.extra_config or {}
    names = [
        n
        for n in (config.remote_storage_plugins or [])
        if extra.get(settings.PLUGIN_OPTION.format(name=n, option="class_name")) == cls.__name__
        and extra.get(settings.PLUGIN_OPTION.format(name=n, option="module_path")) == cls.__module__
    ]
    if len(names) != 1:
        raise ValueError(
            f"expected exactly one remote_storage_plugins entry whose module_path/class_name are "
            f"{cls.__module__}/{cls.__name__}, found {names or 'none'}"
        )
    return names[0]


def _shown(key: Any) -> str:
    """An LMCache key as LMCache prints it (``model@world@worker@hash@dtype``)."""
    to_string = getattr(key, "to_string", None)
    return str(to_string()) if callable(to_string) else str(key)


def is_health_probe(key: Any) -> bool:
    """LMCache's health monitor stores this key and, to call the backend healthy again after a
    failure, compares what comes back byte for byte -- which a lossy codec cannot pass. The
    plugin stores it losslessly (see RemoteBackendHealthCheck._resource_manager)."""
    return bool(
        key.model_name == "test"
        and key.chunk_hash == 0
        and key.world_size == 1
        and key.worker_id == 0
    )


class KVPackConnector(RemoteConnector):
    """Stores LMCache chunks in a kvpack service (see the module docstring)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        local_cpu_backend: Any,
        config: Any,
        plugin_name: str | None = None,
    ) -> None:
        metadata = getattr(local_cpu_backend, "metadata", None)
        if metadata is None:
            raise ValueError(
                "the kvpack plugin needs LMCache's local CPU backend and its model metadata "
                "(worker role, max_local_cpu_size > 0)"
            )
        super().__init__(config, metadata)
        name = plugin_name or find_plugin_name(config, type(self))
        self.settings = settings.parse(settings.plugin_options(config.extra_config, name), name)
        if config.remote_serde not in (None, "naive"):
            raise ValueError(
                f"remote_serde is {config.remote_serde!r}: the kvpack plugin encodes chunks "
                "itself and needs LMCache's raw KV layout; set remote_serde: naive"
            )
        self.loop = loop
        self.local_cpu_backend = local_cpu_backend
        # kv_shape is (layers, 2, chunk_size, kv_heads, head_size).
        self.head_dim = self.settings.head_dim or int(metadata.kv_shape[4])
        self.lossless = QuantSettings(
            mode="lossless", k_window=0, v_window=0, block_tokens=self.settings.quant.block_tokens
        )
        s = self.settings
        self._client = self._new_client()
        self.pool = ThreadPoolExecutor(s.workers, thread_name_prefix="kvpack-lmcache")
        self.log = RateLimitedLog(logger, s.log_interval)
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._reconnect = False
        # Compile (or load from numba's cache) the codec's kernels now, in the background: the
        # first get would otherwise pay it inside LMCache's blocking_timeout_secs.
        self.pool.submit(self._warm_up)
        logger.info(
            "kvpack plugin %r: target %s, %s TLS, quant %s, head_dim %d, key prefix %r",
            name,
            s.target,
            "with" if s.tls else "no",
            s.quant.to_dict(),
            self.head_dim,
            s.key_prefix,
        )

    # -- plumbing ---------------------------------------------------------------------------

    def _warm_up(self) -> None:
        try:
            codec.warm_up()
        except Exception as e:  # a slower first chunk, not a broken plugin
            logger.warning("kvpack plugin: codec warm-up failed (%s: %s)", type(e).__name__, e)

    def _new_client(self) -> KVPackClient:
        s = self.settings
        return KVPackClient(
            s.target,
            token=s.token,
            tls=s.tls,
            timeout=s.timeout,
            timeout_per_mib=s.timeout_per_mib,
            retries=s.retries,
        )

    @property
    def client(self) -> KVPackClient:
        """The kvpack client; a fresh one (new channel) after the service was unreachable:
        gRPC's reconnect backoff on the old channel grows to 120 s, so a restarted service
        would otherwise stay unused for minutes. The old channel closes once its calls end."""
        with self._lock:
            if self._reconnect:
                self._client, self._reconnect = self._new_client(), False
            return self._client

    def _key(self, key: Any) -> str:
        return kvpack_key(key.to_string(), self.settings.key_prefix)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _reachable(self, op: str, key: Any) -> bool:
        """False (and a rate-limited line) while the service counts as down."""
        with self._lock:
            down = time.monotonic() < self._down_until
        if down:
            self.log.warning(
                "down", "kvpack %s of %s skipped: service unreachable", op, _shown(key)
            )
        return not down

    def _failed(self, op: str, key: Any, exc: BaseException) -> None:
        """Account a failed call: unreachable -> down for down_for seconds; log rate-limited."""
        if isinstance(exc, Unavailable | DeadlineExceeded):
            with self._lock:
                self._down_until = time.monotonic() + self.settings.down_for
                self._reconnect = self._reconnect or isinstance(exc, Unavailable)
            kind, what = "unreachable", "kvpack unreachable"
        elif isinstance(exc, DataLoss | FormatError):
            kind, what = "damaged", "damaged entry"
        else:
            kind, what = f"error:{op}", "failed"
        self.log.warning(
            kind,
            "kvpack %s of %s: %s (%s: %s); LMCache sees a miss",
            op,
            _shown(key),
            what,
            type(exc).__name__,
            exc,
            # kvpack's own errors carry the server's message; anything else is a bug to trace.
            exc_info=None if isinstance(exc, KVPackError | FormatError) else exc,
        )

    # -- encode / decode (pool threads) -----------------------------------------------------

    def _encode(self, key: Any, memory_obj: Any) -> bytes:
        tensors = [memory_obj.get_tensor(i) for i in range(len(memory_obj.get_shapes()))]
        fmt = memory_obj.get_memory_format().name
        quant = self.lossless if is_health_probe(key) else self.settings.quant
        try:
            return chunk_codec.encode_chunk(tensors, fmt, self.head_dim, quant, key.to_string())
        except ValueError as e:
            if quant.mode == "lossless" or "non-finite" not in str(e):
                raise
        # Lossy modes refuse inf/nan and fp32-overflowing ranges (no error bound exists for
        # them): keep such a chunk exactly rather than not at all.
        return chunk_codec.encode_chunk(tensors, fmt, self.head_dim, self.lossless, key.to_string())

    def _decode(self, key: Any, blob: bytes) -> Any:
        """A memory object holding the decoded chunk, or None (miss; logged)."""
        try:
            chunk = chunk_codec.read_layout(blob)
        except FormatError as e:
            self._failed("get", key, e)
            return None
        memory_obj = self.local_cpu_backend.allocate(
            [torch.Size(s) for s in chunk.shapes],
            [chunk.dtype] * len(chunk.shapes),
            MemoryFormat[chunk.fmt],
        )
        if memory_obj is None:
            self.log.warning(
                "alloc", "kvpack get of %s: LMCache's CPU buffer is full; a miss", _shown(key)
            )
            return None
        try:
            tensors = [memory_obj.get_tensor(i) for i in range(len(chunk.shapes))]
            chunk_codec.decode_into(blob, tensors, chunk)
        except Exception as e:
            memory_obj.ref_count_down()
            self._failed("get", key, e)
            return None
        return memory_obj

    # -- RemoteConnector --------------------------------------------------------------------

    async def exists(self, key: Any) -> bool:
        return await self._run(self.exists_sync, key)

    def exists_sync(self, key: Any) -> bool:
        if not self._reachable("exists", key):
            return False
        try:
            self.client.stat(self._key(key))
            return True
        except NotFound:
            return False
        except Exception as e:
            self._failed("exists", key, e)
            return False

    async def get(self, key: Any) -> Any:
        if not self._reachable("get", key):
            return None
        try:
            blob = await self._run(self.client.fetch_bytes, self._key(key))
        except NotFound:
            return None
        except Exception as e:
            self._failed("get", key, e)
            return None
        return await self._run(self._decode, key, blob)

    async def put(self, key: Any, memory_obj: Any) -> None:
        if not self._reachable("put", key):
            return
        try:
            # Encoding reads the whole chunk before put returns and LMCache releases it.
            blob = await self._run(self._encode, key, memory_obj)
        except Exception as e:
            self.log.warning(
                "encode", "kvpack put of %s: not encodable (%s); not stored", _shown(key), e
            )
            return
        try:
            await self._run(self.client.put, blob, self._key(key))
        except Exception as e:
            self._failed("put", key, e)

    def support_batched_get(self) -> bool:
        return True

    async def batched_get(self, keys: Sequence[Any]) -> list[Any]:
        return list(await asyncio.gather(*(self.get(k) for k in keys)))

    def support_batched_put(self) -> bool:
        return True

    async def batched_put(self, keys: Sequence[Any], memory_objs: Sequence[Any]) -> None:
        await asyncio.gather(*(self.put(k, m) for k, m in zip(keys, memory_objs, strict=True)))

    def remove_sync(self, key: Any) -> bool:
        try:
            self.client.delete(self._key(key))
            return True
        except NotFound:
            return False
        except Exception as e:
            self._failed("remove", key, e)
            return False

    async def list(self) -> list[str]:
        """LMCache key strings of the stored chunks (kvpack keys for hashed, long keys)."""
        prefix = self.settings.key_prefix
        try:
            entries = await self._run(lambda: [e.key for e in self.client.list(prefix)])
        except Exception as e:
            self._failed("list", prefix, e)
            return []
        return [lmcache_key(k, prefix) or k for k in entries]

    def support_ping(self) -> bool:
        return True

    async def ping(self) -> int:
        """0 when the service answers Info, LMCache's generic error code otherwise."""
        try:
            await self._run(self.client.info)
            return 0
        except Exception as e:
            self._failed("ping", "-", e)
            return int(PING_GENERIC_ERROR_CODE)

    async def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()
        logger.info("kvpack plugin closed")
