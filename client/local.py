"""In-process kvpack: the server's compress engine run locally with an in-memory store
(notebooks, tests, evaluation).

Same methods, arguments, results and exception types as :class:`kvpack.client.KVPackClient`
(both are :class:`kvpack.client.api.KVPack`), without a server: ``compress`` runs the engine
the server runs (``kvpack.engine``), so for the same input it keeps the same tokens, writes the
same container bytes under the same key and Stat reports the same settings. Keys live in this
object only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Unpack

import torch

from kvpack import __version__, codec
from kvpack.client import messages
from kvpack.client.api import CompressOptions, Layers, Tensors
from kvpack.client.result import CompressResult, EntryInfo, ServerInfo
from kvpack.engine import POLICY_NAMES, CompressRequest, codec_name, compress_cache, entry_settings
from kvpack.engine.keys import blob_key, validate_key
from kvpack.errors import DataLoss, InvalidArgument, NotFound


@dataclass
class _Entry:
    blob: bytes
    settings: dict[str, str]
    created_unix: float


class LocalKVPack:
    """kvpack without a server: compress, store and fetch in this process."""

    def __init__(self) -> None:
        self._store: dict[str, _Entry] = {}

    def compress(
        self, keys: Tensors, values: Tensors, **options: Unpack[CompressOptions]
    ) -> CompressResult:
        """See :meth:`kvpack.client.KVPackClient.compress`; tensors stay on their device."""
        cache = messages.check_cache(keys, values, options)
        request = CompressRequest.from_options(cache.layout, options)
        out = compress_cache(request, cache.keys, cache.values, cache.stats)
        if out.stored is not None:
            self._store[out.stored.key] = _Entry(out.stored.blob, out.stored.settings, time.time())
        if not request.return_cache:
            return messages.compress_result(out.summary, [], [], [])
        results = out.results
        return messages.compress_result(
            out.summary,
            [r.keys for r in results],
            [r.values for r in results],
            [r.indices for r in results],
        )

    def _entry(self, key: str) -> _Entry:
        try:
            return self._store[key]
        except KeyError:
            raise NotFound(f"no entry {key!r}") from None

    def fetch_bytes(self, key: str, layers: Layers = None) -> bytes:
        blob = self._entry(key).blob
        request = messages.fetch_request(key, layers)
        if request.layer_end:
            try:
                blob = codec.slice_layers(blob, request.layer_start, request.layer_end)
            except ValueError as e:
                raise InvalidArgument(str(e)) from e
        return blob

    def fetch(
        self, key: str, layers: Layers = None, *, device: torch.device | str | None = None
    ) -> codec.DecodedCache:
        """``kvpack.codec.DecodedCache`` on ``device`` (default CPU)."""
        try:
            return codec.decode(
                self.fetch_bytes(key, layers), device=device, threads=messages.DECODE_THREADS
            )
        except codec.FormatError as e:
            raise DataLoss(f"stored entry is damaged: {e}") from e

    def put(self, blob: bytes, key: str | None = None) -> str:
        try:
            header = codec.verify(blob)
        except ValueError as e:
            raise InvalidArgument(f"uploaded container is invalid: {e}") from e
        key = validate_key(key) if key else blob_key(blob)
        self._store[key] = _Entry(bytes(blob), entry_settings(header.settings), time.time())
        return key

    def delete(self, key: str) -> None:
        self._entry(key)
        del self._store[key]

    def stat(self, key: str) -> EntryInfo:
        entry = self._entry(key)
        header = codec.read_header(entry.blob)
        return EntryInfo(
            key=key,
            stored_bytes=len(entry.blob),
            original_bytes=sum(header.raw_bytes),
            created_unix=entry.created_unix,
            num_layers=header.num_layers,
            dtype=str(codec.dtype_from_name(header.dtype)).removeprefix("torch."),
            codec=codec_name(header.settings),
            settings=dict(entry.settings),
        )

    def list(self, prefix: str = "", *, page_size: int = 0) -> Iterator[EntryInfo]:
        for key in sorted(k for k in self._store if k.startswith(prefix)):
            yield self.stat(key)

    def info(self) -> ServerInfo:
        return ServerInfo(
            version=f"{__version__} (local)",
            policies=list(POLICY_NAMES),
            quant_modes=list(codec.MODES),
            entropy_coders=list(codec.ENTROPY_CODERS),
            container_version=codec.CONTAINER_VERSION,
            store="local",
            auth_required=False,
            limits={},
        )

    def close(self) -> None:
        self._store.clear()

    def __enter__(self) -> LocalKVPack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
