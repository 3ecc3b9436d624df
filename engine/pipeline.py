"""The compress pipeline over a :class:`~kvpack.engine.request.CompressRequest`.

One :class:`Compression` per request: :meth:`~Compression.start` once with the statistics (or
none), :meth:`~Compression.layer` for every layer as its K/V arrive (select if the allocation is
per layer, gather, encode; thread-safe, so layers can run in parallel), then
:meth:`~Compression.store` (assemble the container, its key and entry settings) and
:meth:`~Compression.summary`. The server drives it from the gRPC stream (``server.compress``),
LocalKVPack from its arguments (:func:`compress_cache`); neither has pipeline logic of its own,
so both keep the same tokens and write the same bytes under the same key.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvpack import codec
from kvpack.codec import EncodedLayer
from kvpack.codec.selection import all_finite, layer_shares
from kvpack.engine.entries import Stored, entry_settings
from kvpack.engine.keys import CONTENT_KEY_PREFIX
from kvpack.engine.request import Allocation, CompressRequest, StatsKind
from kvpack.errors import InvalidArgument
from kvpack.v1 import kvpack_pb2 as pb


@dataclass
class LayerResult:
    """What one layer produced (tensors on the device of the layer's K/V)."""

    layer: int
    keys: torch.Tensor  # [B, Hkv, b_l, d] composite
    values: torch.Tensor
    indices: torch.Tensor  # [B, Hkv, b_l] int64, -1 padded
    encoded: EncodedLayer | None  # None when the cache is not stored
    input_bytes: int  # raw K+V bytes uploaded
    kept_bytes: int  # raw K+V bytes of the composite layer
    timings: dict[str, float]  # stage -> seconds


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _timed(timings: dict[str, float], stage: str, start: float) -> None:
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


class Compression:
    """The pipeline state of one request (see the module docstring).

    ``timings``: stage -> seconds over the whole call (per-layer stages once :meth:`record`
    has seen the layer).
    """

    def __init__(self, request: CompressRequest) -> None:
        self.request = request
        self.allocation: Allocation | None = None
        self.timings: dict[str, float] = {}
        self._statistics: dict[str, object] | None = None  # what the policy read, for the key
        self._indices: list[torch.Tensor] | None = None  # GLOBAL: every layer's kept positions
        self._scores: torch.Tensor | None = None  # PER_LAYER: [L, B, H, n]
        self._queries: torch.Tensor | None = None  # PER_LAYER: [L, B, Hq, W, d]
        self._shares: list[int] = []  # PER_LAYER: token slots per layer

    def start(self, kind: StatsKind | None = None, stats: torch.Tensor | None = None) -> None:
        """Fix the allocation, once, before layer 0: ``stats`` is the statistics tensor the
        client sent (``kind`` says which), None when it sent none. With a GLOBAL allocation this
        runs the selection of every layer (CPU-heavy: the server calls it on its codec pool)."""
        r, pol = self.request, self.request.selector
        if kind is not None:
            assert stats is not None
            r.layout.check_statistics(kind, stats.shape, stats.dtype)
        self.allocation = r.allocation(kind)
        if pol is None:
            return
        if pol.needs_scores:
            assert stats is not None
            self._statistics = {"kind": kind, "shape": list(stats.shape)}
        else:
            stats = None  # statistics are optional for this policy and unused
        if self.allocation is Allocation.PER_LAYER:
            assert r.budget is not None
            self._shares = layer_shares(pol, r.budget)
            if kind == "window_queries":
                self._queries = stats
            else:
                self._scores = stats
            return
        lay = r.layout
        shape = (lay.num_layers, lay.batch_size, lay.num_kv_heads, lay.seq_len)
        start = time.perf_counter()
        try:
            self._indices = codec.select(
                stats, policy=r.policy, num_kv_heads=lay.num_kv_heads, shape=shape,
                **r.budget_kwargs(), **r.settings,
            )  # fmt: skip
        except ValueError as e:
            raise InvalidArgument(f"select: {e}") from e
        finally:
            _timed(self.timings, "select", start)

    def layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> LayerResult:
        """Select (per-layer allocation), gather and encode (when stored) layer ``layer``:
        ``k``, ``v`` ``[B, Hkv, n, d]``. Thread-safe."""
        r = self.request
        t: dict[str, float] = {}
        idx = self._select(layer, k, v, t)
        start = time.perf_counter()
        if self.allocation is Allocation.NONE:
            ck, cv = k, v
        else:
            try:
                (ck,), (cv,) = codec.gather([k], [v], [idx])
            except ValueError as e:
                raise InvalidArgument(f"gather (layer {layer}): {e}") from e
        _timed(t, "gather", start)
        encoded = None
        if r.store:
            if r.quant.mode != "lossless":
                _require_finite(layer, ck, cv)
            start = time.perf_counter()
            kept = None if self.allocation is Allocation.NONE else idx
            try:
                encoded = codec.encode_layer(ck, cv, kept, r.quant)
            except ValueError as e:
                raise InvalidArgument(f"encode (layer {layer}): {e}") from e
            _timed(t, "encode", start)
        return LayerResult(
            layer, ck, cv, idx, encoded, _nbytes(k) + _nbytes(v), _nbytes(ck) + _nbytes(cv), t
        )

    def _select(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, t: dict[str, float]
    ) -> torch.Tensor:
        r = self.request
        if self.allocation is Allocation.NONE:
            n = r.layout.seq_len
            return torch.arange(n, device=k.device).expand(*k.shape[:2], n).contiguous()
        if self._indices is not None:
            return self._indices[layer].to(k.device)
        scores = None
        if self._queries is not None:
            start = time.perf_counter()
            scores = codec.scores_from_window(self._queries[layer], k).unsqueeze(0)
            _timed(t, "stats", start)
        elif self._scores is not None:
            scores = self._scores[layer : layer + 1]
        start = time.perf_counter()
        try:
            return codec.select(
                scores, policy=r.policy, num_kv_heads=r.layout.num_kv_heads, keys=[k],
                values=[v], n_keep=self._shares[layer], **r.settings,
            )[0]  # fmt: skip
        except ValueError as e:
            raise InvalidArgument(f"select (layer {layer}): {e}") from e
        finally:
            _timed(t, "select", start)

    def record(self, result: LayerResult) -> None:
        """Count a finished layer's stage timings into :attr:`timings`."""
        for stage, seconds in result.timings.items():
            self.timings[stage] = self.timings.get(stage, 0.0) + seconds

    def store(self, results: Sequence[LayerResult]) -> Stored:
        """The container of every layer's encoding (CPU-heavy), its store key (the request's,
        else its content key when token ids were given, else the container's sha256) and the
        entry's settings."""
        r = self.request
        meta = r.container_meta()
        start = time.perf_counter()
        encoded = [x.encoded for x in results]
        assert all(e is not None for e in encoded), "store() needs a request with store=True"
        blob = codec.assemble(
            encoded,  # type: ignore[arg-type]
            r.quant,
            dtype=r.layout.dtype,
            meta=meta,
            seq_len=r.layout.seq_len,
        )
        _timed(self.timings, "encode", start)
        digest = ""
        if r.key:
            key = r.key
        elif r.token_ids:
            key = r.content_key(self._statistics)
        else:  # the blob's content key (engine.keys.blob_key), digest kept for the store
            digest = hashlib.sha256(blob).hexdigest()
            key = CONTENT_KEY_PREFIX + digest
        return Stored(key, blob, entry_settings(r.quant, meta), digest)

    def summary(
        self, results: Sequence[LayerResult], stored: Stored | None = None
    ) -> pb.CompressSummary:
        """The call's CompressSummary: bytes, kept tokens and reconstruction errors per layer,
        what was stored, and :attr:`timings`."""
        input_bytes = sum(x.input_bytes for x in results)
        kept_entries = sum(int((x.indices >= 0).sum()) for x in results)
        summary = pb.CompressSummary(
            input_bytes=input_bytes,
            kept_bytes=sum(x.kept_bytes for x in results),
            token_ratio=1.0 - kept_entries / self.request.layout.entries,
        )
        for x in results:
            ls = summary.layers.add(layer=x.layer, kept_tokens=int(x.indices.shape[-1]))
            ls.input_bytes = x.input_bytes
            if x.encoded is not None:
                s = x.encoded.stats
                assert s is not None  # encode_layer measures every layer it encodes
                ls.stored_bytes = x.encoded.nbytes
                ls.key_max_abs_error = s.key_max_abs_error
                ls.value_max_abs_error = s.value_max_abs_error
                ls.key_rel_error = s.key_rel_error
                ls.value_rel_error = s.value_rel_error
        if stored is not None:
            summary.key = stored.key
            summary.stored_bytes = len(stored.blob)
            summary.compression_ratio = input_bytes / max(1, len(stored.blob))
        summary.timings_seconds.update(self.timings)
        return summary

    def release(self) -> None:
        """Drop the statistics and selections held (a cancelled call frees them at once)."""
        self._indices = self._scores = self._queries = None


@dataclass
class Outcome:
    """An in-process compression: every layer's result, the summary and what was stored."""

    results: list[LayerResult]
    summary: pb.CompressSummary
    stored: Stored | None


def compress_cache(
    request: CompressRequest,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    stats: tuple[StatsKind, torch.Tensor] | None = None,
) -> Outcome:
    """Run the whole pipeline in this thread: ``keys``/``values`` are the request's layers
    ``[B, Hkv, n, d]`` (any device; statistics are moved to it)."""
    compression = Compression(request)
    if stats is None:
        compression.start()
    else:
        compression.start(stats[0], stats[1].to(keys[0].device))
    results = []
    for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
        result = compression.layer(layer, k, v)
        compression.record(result)
        results.append(result)
    stored = compression.store(results) if request.store else None
    return Outcome(results, compression.summary(results, stored), stored)


def _require_finite(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Lossy and fixed encodings are error-bounded for finite values only, and the codec keeps its
    full-precision window as is: refuse NaN/Inf in any kept K/V so none is ever stored."""
    for name, t in (("KEYS", k), ("VALUES", v)):
        if not all_finite(t):
            raise InvalidArgument(
                f"layer {layer} {name} contain NaN or Inf (non-finite values); only quant mode "
                "'lossless' stores them"
            )
