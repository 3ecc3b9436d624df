"""In-process kvpack: the codec run locally with an in-memory store (notebooks, tests).

Same methods, arguments, results and exception types as :class:`kvpack.client.KVPackClient`,
without a server. Keys live in this object only.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvpack import codec
from kvpack.client import messages
from kvpack.client.result import CompressResult, EntryInfo, LayerStats, ServerInfo
from kvpack.codec.selection import policy_for_layout
from kvpack.errors import DataLoss, InvalidArgument, NotFound
from kvpack.v1 import kvpack_pb2 as pb

# proto3 strings have no presence (empty = unset); the numeric fields are `optional`.
_STRING_FIELDS = ("mode", "k_grouping", "entropy")
_OPTIONAL_FIELDS = ("k_error_bound", "v_error_bound", "block_tokens", "k_window", "v_window")


@dataclass
class _Entry:
    blob: bytes
    created_unix: float


def _quant_settings(quant: Any, num_layers: int, seq_len: int) -> Any:
    """``codec.QuantSettings`` from whatever ``compress`` accepts (fields left unset keep the
    codec's defaults), checked against the layout as the server checks it."""
    msg = messages.quant_message(quant)
    given: dict[str, Any] = {n: getattr(msg, n) for n in _STRING_FIELDS if getattr(msg, n)}
    given |= {n: getattr(msg, n) for n in _OPTIONAL_FIELDS if msg.HasField(n)}  # type: ignore[arg-type]
    try:
        settings = codec.QuantSettings(**given)
        settings.validate_for_layout(num_layers=num_layers, seq_len=seq_len)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"quant: {e}") from e
    return settings


def _container_meta(header: pb.CompressHeader) -> dict[str, str]:
    """The container meta the server writes for a Compress ``header`` (policy, model, budget)."""
    meta = {"policy": header.policy, **({"model": header.model} if header.model else {})}
    if header.HasField("ratio"):
        meta["ratio"] = repr(header.ratio)
    elif header.HasField("n_keep"):
        meta["n_keep"] = str(header.n_keep)
    return meta


def _max_errors(original: torch.Tensor, decoded: torch.Tensor) -> tuple[float, float]:
    """(max |x - x^|, ||x - x^||_F / ||x||_F) in float32."""
    diff = (original.float() - decoded.float().to(original.device)).abs()
    norm = float(original.float().norm())
    return float(diff.max()) if diff.numel() else 0.0, float(diff.norm()) / norm if norm else 0.0


class LocalKVPack:
    """kvpack without a server: compress, store and fetch in this process."""

    def __init__(self) -> None:
        self._store: dict[str, _Entry] = {}

    def compress(
        self,
        keys: Sequence[torch.Tensor] | torch.Tensor,
        values: Sequence[torch.Tensor] | torch.Tensor,
        *,
        scores: torch.Tensor | None = None,
        window_queries: torch.Tensor | None = None,
        policy: str = "kvcompose",
        ratio: float | None = None,
        n_keep: int | None = None,
        policy_settings: Mapping[str, Any] | None = None,
        quant: Any = None,
        store: bool = True,
        key: str | None = None,
        model: str | None = None,
        token_ids: Sequence[int] | torch.Tensor | None = None,
        return_cache: bool = True,
    ) -> CompressResult:
        """See :meth:`kvpack.client.KVPackClient.compress`."""
        upload = messages.compress_upload(
            keys, values, scores=scores, window_queries=window_queries, policy=policy,
            ratio=ratio, n_keep=n_keep, policy_settings=policy_settings, quant=quant,
            store=store, key=key, model=model, token_ids=token_ids, return_cache=return_cache,
        )  # fmt: skip
        k_layers, v_layers = upload.keys, upload.values
        batch, kv_heads, n, _ = k_layers[0].shape
        # Every setting against the layout before any work, as the server's plan() does.
        settings: Any = _quant_settings(quant, len(k_layers), n) if store else None
        if policy != "none":
            try:
                policy_for_layout(
                    policy,
                    dict(policy_settings or {}),
                    num_layers=len(k_layers),
                    seq_len=n,
                    ratio=ratio,
                    n_keep=n_keep,
                )
            except ValueError as e:
                raise InvalidArgument(f"policy {policy}: {e}") from e
        timings: dict[str, float] = {}
        start = time.perf_counter()
        try:
            if policy == "none":
                kept = torch.arange(n, device=k_layers[0].device).expand(batch, kv_heads, n)
                indices = [kept.clone() for _ in k_layers]
            else:
                if window_queries is not None:
                    scores = torch.stack(
                        [
                            codec.scores_from_window(q, k)
                            for q, k in zip(window_queries.unbind(0), k_layers, strict=True)
                        ]
                    )
                indices = codec.select(
                    None if scores is None else scores.to(k_layers[0].device),
                    ratio,
                    policy,
                    n_keep=n_keep,
                    num_kv_heads=kv_heads,
                    keys=k_layers,
                    values=v_layers,
                    **dict(policy_settings or {}),
                )
            timings["select"] = time.perf_counter() - start
            comp_k, comp_v = codec.gather(k_layers, v_layers, indices)
        except ValueError as e:
            raise InvalidArgument(str(e)) from e

        layer_bytes = [k.numel() * k.element_size() * 2 for k in k_layers]
        kept_bytes = sum(k.numel() * k.element_size() * 2 for k in comp_k)
        stats = [
            LayerStats(layer, int(idx.shape[-1]), layer_bytes[layer], 0, 0.0, 0.0, 0.0, 0.0)
            for layer, idx in enumerate(indices)
        ]
        stored_key, stored_bytes = "", 0
        if store:
            start = time.perf_counter()
            blob = codec.encode(
                comp_k,
                comp_v,
                # As the server stores them, so both give byte-identical containers.
                indices=None if policy == "none" else indices,
                settings=settings,
                meta=_container_meta(upload.header),
                seq_len=n,
            )
            timings["encode"] = time.perf_counter() - start
            stored_key = key or self._content_key(blob)
            self._store[stored_key] = _Entry(blob, time.time())
            stored_bytes = len(blob)
            decoded = codec.decode(blob)
            stats = [
                LayerStats(
                    layer,
                    s.kept_tokens,
                    s.input_bytes,
                    decoded.header.stored_bytes[layer],
                    *_errors(
                        comp_k[layer], decoded.keys[layer], comp_v[layer], decoded.values[layer]
                    ),
                )
                for layer, s in enumerate(stats)
            ]
        total_entries = len(k_layers) * batch * kv_heads * n
        kept_entries = sum(int((idx >= 0).sum()) for idx in indices)
        return CompressResult(
            keys=comp_k if return_cache else [],
            values=comp_v if return_cache else [],
            indices=list(indices) if return_cache else [],
            key=stored_key,
            layers=stats,
            input_bytes=sum(layer_bytes),
            kept_bytes=kept_bytes,
            stored_bytes=stored_bytes,
            token_ratio=1.0 - kept_entries / total_entries,
            compression_ratio=sum(layer_bytes) / stored_bytes if stored_bytes else 0.0,
            timings_seconds=timings,
        )

    @staticmethod
    def _content_key(blob: bytes) -> str:
        return "sha256:" + hashlib.sha256(blob).hexdigest()

    def _entry(self, key: str) -> _Entry:
        try:
            return self._store[key]
        except KeyError:
            raise NotFound(f"no entry {key!r}") from None

    def fetch_bytes(self, key: str, layers: tuple[int, int] | range | None = None) -> bytes:
        blob = self._entry(key).blob
        request = messages.fetch_request(key, layers)
        if request.layer_end:
            try:
                blob = codec.slice_layers(blob, request.layer_start, request.layer_end)
            except ValueError as e:
                raise InvalidArgument(str(e)) from e
        return blob

    def fetch(
        self,
        key: str,
        layers: tuple[int, int] | range | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> Any:
        """``kvpack.codec.DecodedCache`` on ``device`` (default CPU)."""
        try:
            return codec.decode(self.fetch_bytes(key, layers), device=device)
        except codec.FormatError as e:
            raise DataLoss(f"stored entry is damaged: {e}") from e

    def put(self, blob: bytes, key: str | None = None) -> str:
        try:
            codec.verify(blob)
        except ValueError as e:
            raise InvalidArgument(f"uploaded container is invalid: {e}") from e
        key = key or self._content_key(blob)
        self._store[key] = _Entry(bytes(blob), time.time())
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
            codec=f"{header.settings.mode}/{header.settings.entropy}",
            settings={},
        )

    def list(self, prefix: str = "", *, page_size: int = 0) -> Iterator[EntryInfo]:
        for key in sorted(k for k in self._store if k.startswith(prefix)):
            yield self.stat(key)

    def info(self) -> ServerInfo:
        return ServerInfo(
            version="local",
            policies=[*sorted(codec.POLICIES), "none"],
            quant_modes=["lossy", "fixed", "lossless"],
            entropy_coders=["auto", "huffman", "zstd"],
            container_version=int(getattr(codec, "CONTAINER_VERSION", 0)),
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


def _errors(
    k: torch.Tensor, k_hat: torch.Tensor, v: torch.Tensor, v_hat: torch.Tensor
) -> tuple[float, float, float, float]:
    """(key max abs, value max abs, key rel, value rel) reconstruction errors."""
    k_max, k_rel = _max_errors(k, k_hat)
    v_max, v_rel = _max_errors(v, v_hat)
    return k_max, v_max, k_rel, v_rel
