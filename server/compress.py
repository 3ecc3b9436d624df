"""One Compress stream: validate, plan, then evict / answer / encode each layer as it arrives.

Client messages, in order: ``CompressHeader``; the statistics tensor (SCORES ``[L, B, H, n]`` or
WINDOW_QUERIES ``[L, B, Hq, W, d]``; required when the policy reads scores, optional otherwise);
for each layer ``l = 0..L-1`` its KEYS then VALUES ``[B, Hkv, n, d]``; ``Finish``.

Budget planning:

* SCORES with a policy that reads only scores (kvcompose, snapkv, tova, pyramidkv, ...): one
  ``codec.select`` over all layers as soon as the scores arrive, so the global KVCompose
  allocation is exact and every layer is evicted the moment its K/V are complete.
* Everything else selects per layer as the layer arrives, with that layer's share of the budget
  (``ratio`` per layer, or ``n_keep`` split evenly): WINDOW_QUERIES (scores need the layer's
  keys), policies that read keys or values (knorm, kvcompose with add_v_norm) and policies
  without statistics (streaming, random). Global allocation across layers is then not
  available; this is the price of not buffering the whole cache.
* ``policy == "none"``: nothing is evicted; indices are ``arange(n)``.

A reader task consumes the client stream and submits per-layer jobs to the codec thread pool; the
handler awaits the jobs in layer order and streams each layer's answer back while later layers
are still uploading. At most ``ahead`` layers are in flight (backpressure through gRPC flow
control), so memory stays bounded by a few layers plus the encoded container.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
import traceback
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import torch
from grpc import aio

from kvpack import codec, wire
from kvpack.codec.container import MAX_META_CHARS
from kvpack.codec.policy_settings import shown
from kvpack.codec.selection import policy_for_layout
from kvpack.errors import InvalidArgument, KVPackError, ResourceExhausted
from kvpack.server import container, keys
from kvpack.server.rpc import DRAIN_SECONDS, ChunkWriter, check_deadline, drain
from kvpack.v1 import kvpack_pb2 as pb

if TYPE_CHECKING:
    from kvpack.server.servicer import KVPackServicer

_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
_DONE = object()
#: What the client stream yields: chunks are decoded by kvpack.wire, everything else by protobuf.
Request = pb.CompressRequest | wire.ChunkFrame


@dataclasses.dataclass(frozen=True)
class Plan:
    """A validated Compress header: layout, K/V dtype, codec settings and how to select.

    ``needs_scores``: the policy reads attention statistics; ``per_layer_select``: select layer
    by layer as K/V arrive instead of once from all layers' scores (see the module docstring).
    """

    header: pb.CompressHeader
    policy: str
    num_layers: int
    batch: int
    kv_heads: int
    q_heads: int
    head_dim: int
    seq_len: int
    dtype: torch.dtype
    quant: Any  # codec.QuantSettings
    needs_scores: bool
    per_layer_select: bool
    settings: dict[str, object]

    @property
    def kv_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.kv_heads, self.seq_len, self.head_dim)

    @property
    def layer_bytes(self) -> int:
        """Raw bytes of one layer's K or V tensor."""
        return math.prod(self.kv_shape) * torch.empty((), dtype=self.dtype).element_size()

    def layer_budget(self, layer: int) -> dict[str, Any]:
        """``ratio=`` or ``n_keep=`` for a per-layer select of ``layer``."""
        h = self.header
        if h.HasField("ratio"):
            return {"ratio": h.ratio}
        share, extra = divmod(h.n_keep, self.num_layers)
        return {"n_keep": min(self.seq_len, max(1, share + (1 if layer < extra else 0)))}


def _quant_settings(q: pb.QuantSettings, layout: pb.Layout, store: bool) -> Any:
    """codec.QuantSettings of the header; when the cache is stored (encoded), also checked
    against the layout (windows, blocks per container header)."""
    mapping: dict[str, object] = {}
    for name in ("mode", "k_grouping", "entropy"):
        if getattr(q, name):
            mapping[name] = getattr(q, name)
    for name in ("k_error_bound", "v_error_bound", "block_tokens", "k_window", "v_window"):
        if q.HasField(name):  # type: ignore[arg-type]
            mapping[name] = getattr(q, name)
    try:
        settings = codec.QuantSettings.from_mapping(mapping)
        if store:
            settings.validate_for_layout(num_layers=layout.num_layers, seq_len=layout.seq_len)
    except ValueError as e:
        raise InvalidArgument(f"quant settings: {e}") from e
    return settings


def _check_header_strings(header: pb.CompressHeader) -> None:
    """The model fingerprint and token ids, before any work: the model is stored in the
    container meta (at most MAX_META_CHARS characters) and the store's entry settings."""
    model = header.model
    if len(model) > MAX_META_CHARS:
        raise InvalidArgument(
            f"model is {len(model)} characters, at most {MAX_META_CHARS} (the container meta's "
            "limit)"
        )
    if not model.isprintable():
        raise InvalidArgument(f"model {shown(model)} has control characters (printable only)")
    if header.token_ids and not model:
        raise InvalidArgument("token_ids given without model: content keys need both")
    lay = header.layout
    most = lay.batch_size * lay.seq_len  # a cache of B rows of n tokens comes from B*n tokens
    if len(header.token_ids) > most:
        raise InvalidArgument(
            f"token_ids has {len(header.token_ids)} ids, at most batch_size*seq_len={most} "
            "(the tokens the cache was computed from)"
        )


def plan(header: pb.CompressHeader, servicer: KVPackServicer) -> Plan:
    """Validate the header against the proto contract and the server's limits.

    Everything the header decides is checked here, before any tensor is received or any codec
    work queued: the layout, the budget, every policy and quantisation setting against the
    layout (codec.policy_for_layout, QuantSettings.validate_for_layout), the store key, the
    model and the token ids.
    """
    cfg = servicer.config
    lay = header.layout
    q_heads = lay.num_query_heads or lay.num_kv_heads
    dims = {
        "num_layers": (lay.num_layers, cfg.max_layers, "--max-layers"),
        "batch_size": (lay.batch_size, cfg.max_batch_size, "--max-batch-size"),
        "num_kv_heads": (lay.num_kv_heads, cfg.max_heads, "--max-heads"),
        "num_query_heads": (q_heads, cfg.max_heads, "--max-heads"),
        "head_dim": (lay.head_dim, cfg.max_head_dim, "--max-head-dim"),
        "seq_len": (lay.seq_len, cfg.max_seq_len, "--max-seq-len"),
    }
    for name, (value, limit, flag) in dims.items():
        if value < 1:
            raise InvalidArgument(f"layout.{name} must be at least 1")
        if value > limit:
            raise ResourceExhausted(f"layout.{name}={value} exceeds this server's {flag}={limit}")
    if q_heads % lay.num_kv_heads:
        raise InvalidArgument(
            f"layout.num_query_heads ({q_heads}) must be a multiple of num_kv_heads "
            f"({lay.num_kv_heads})"
        )
    dtype = wire.dtype_to_torch(lay.dtype)
    if dtype not in _FLOAT:
        raise InvalidArgument("layout.dtype must be FLOAT32, FLOAT16 or BFLOAT16")
    # The server's own limit first: settings are checked against a cache it would accept.
    shape = (lay.num_layers, lay.batch_size, lay.num_kv_heads, lay.seq_len, lay.head_dim)
    raw = 2 * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if raw > cfg.max_request_bytes:
        raise ResourceExhausted(
            f"the cache is {raw} raw bytes, over this server's --max-request-bytes="
            f"{cfg.max_request_bytes}"
        )
    policy = header.policy or "kvcompose"
    settings: dict[str, object] = dict(header.policy_settings)
    needs_scores = per_layer = False
    if policy == "none":
        if header.HasField("ratio") or header.HasField("n_keep") or settings:
            raise InvalidArgument('policy "none" takes no ratio, n_keep or policy_settings')
    else:
        if policy not in codec.POLICIES:
            known = ", ".join([*sorted(codec.POLICIES), "none"])
            raise InvalidArgument(f"unknown policy {shown(policy)} (known: {known})")
        if header.HasField("ratio") == header.HasField("n_keep"):
            raise InvalidArgument("give exactly one of ratio and n_keep")
        if header.HasField("ratio") and not 0 <= header.ratio < 1:
            raise InvalidArgument(f"ratio must be in [0, 1), got {header.ratio}")
        total = lay.num_layers * lay.seq_len
        if header.HasField("n_keep") and not 1 <= header.n_keep <= total:
            raise InvalidArgument(f"n_keep must be in [1, L*n={total}], got {header.n_keep}")
        try:
            pol = policy_for_layout(
                policy,
                settings,
                num_layers=lay.num_layers,
                seq_len=lay.seq_len,
                ratio=header.ratio if header.HasField("ratio") else None,
                n_keep=header.n_keep if header.HasField("n_keep") else None,
            )
        except ValueError as e:
            raise InvalidArgument(f"policy {policy}: {e}") from e
        needs_scores = pol.needs_scores
        per_layer = pol.needs_keys or pol.needs_values or not pol.needs_scores
    if header.key:
        keys.validate_key(header.key)
    _check_header_strings(header)
    return Plan(
        header=header,
        policy=policy,
        num_layers=lay.num_layers,
        batch=lay.batch_size,
        kv_heads=lay.num_kv_heads,
        q_heads=q_heads,
        head_dim=lay.head_dim,
        seq_len=lay.seq_len,
        dtype=dtype,
        quant=_quant_settings(header.quant, lay, header.store),
        needs_scores=needs_scores,
        per_layer_select=per_layer,
        settings=settings,
    )


@dataclasses.dataclass
class LayerResult:
    """What one layer job produced (tensors on CPU)."""

    layer: int
    keys: torch.Tensor  # [B, Hkv, b_l, d] composite
    values: torch.Tensor
    indices: torch.Tensor  # [B, Hkv, b_l] int64, -1 padded
    encoded: Any  # codec.EncodedLayer or None
    input_bytes: int  # raw K+V bytes uploaded
    kept_bytes: int  # raw K+V bytes of the composite layer
    timings: dict[str, float]  # stage -> seconds


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _timed(timings: dict[str, float], stage: str, start: float) -> None:
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


class CompressSession:
    """State of one Compress call; :meth:`run` yields the responses."""

    def __init__(self, servicer: KVPackServicer, tenant: str, context: aio.ServicerContext) -> None:
        self.servicer = servicer
        self.tenant = tenant
        self.context = context
        self.config = servicer.config
        self.plan: Plan | None = None
        self.indices: list[torch.Tensor] | None = None  # from a global select
        self.scores: torch.Tensor | None = None  # [L, B, H, n] kept for per-layer select
        self.queries: torch.Tensor | None = None  # [L, B, Hq, W, d]
        self.received = 0
        self.timings: dict[str, float] = {}
        self.num_slots = max(2, self.config.workers)  # layers in flight at once
        self.ahead = asyncio.Semaphore(self.num_slots)
        self.jobs: asyncio.Queue[Any] = asyncio.Queue()
        self.abandoned = False  # a layer failed: the reader stops and drains the upload
        # Uploaded bytes held, against --max-buffered-bytes; a layer's share is returned once
        # the layer is encoded, the rest when the call ends.
        self.reservation = servicer.buffered.reservation()

    # -- reading the client stream --------------------------------------------------------------

    async def _read(self, requests: AsyncIterator[Request]) -> None:
        """Consume the client stream, queueing one future per layer, then ``_DONE``."""
        it = aiter(requests)
        try:
            first = await anext(it, None)
            if not isinstance(first, pb.CompressRequest) or first.WhichOneof("msg") != "header":
                raise InvalidArgument("Compress must start with a CompressHeader")
            self.plan = p = plan(first.header, self.servicer)
            layer, expect = 0, "stats_or_keys"
            while not self.abandoned:
                msg = await anext(it, None)
                check_deadline(self.context, "Compress upload")
                kind = msg.WhichOneof("msg") if msg is not None else None
                if kind == "finish":
                    if layer != p.num_layers:
                        raise InvalidArgument(f"Finish after {layer} of {p.num_layers} layers")
                    break
                if kind != "begin":
                    raise InvalidArgument(
                        "stream ended before Finish"
                        if msg is None
                        else f"expected a TensorBegin or Finish, got {kind}"
                    )
                assert isinstance(msg, pb.CompressRequest)
                begin = msg.begin
                if expect == "stats_or_keys" and begin.kind in (
                    pb.TENSOR_KIND_SCORES,
                    pb.TENSOR_KIND_WINDOW_QUERIES,
                ):
                    stats = await self._receive(it, begin, self._check_stats(begin))
                    await self._use_stats(begin.kind, stats)
                    expect = "keys"
                    continue
                if layer >= p.num_layers:
                    raise InvalidArgument(f"more than layout.num_layers={p.num_layers} layers")
                if expect == "stats_or_keys":
                    if p.needs_scores:
                        raise InvalidArgument(
                            f"policy {p.policy!r} needs attention statistics (a SCORES or "
                            "WINDOW_QUERIES tensor) before layer 0's KEYS"
                        )
                    expect = "keys"
                k = await self._receive(
                    it, begin, self._check_kv(begin, pb.TENSOR_KIND_KEYS, layer)
                )
                vmsg = await anext(it, None)
                if not isinstance(vmsg, pb.CompressRequest) or vmsg.WhichOneof("msg") != "begin":
                    raise InvalidArgument(f"expected layer {layer}'s VALUES after its KEYS")
                v = await self._receive(
                    it, vmsg.begin, self._check_kv(vmsg.begin, pb.TENSOR_KIND_VALUES, layer)
                )
                await self.ahead.acquire()
                if self.abandoned:
                    break
                loop = asyncio.get_running_loop()
                self.jobs.put_nowait(
                    loop.run_in_executor(self.servicer.executor, self._process, layer, k, v)
                )
                layer += 1
            if self.abandoned:
                await drain(it)
            self.jobs.put_nowait(_DONE)
        except asyncio.CancelledError:
            # The cancelled task keeps this frame in its CancelledError's traceback (a cycle
            # through the task): let go of the layer in hand now (see _release).
            k = v = stats = torch.empty(0)
            msg = vmsg = first = None
            raise
        except Exception as exc:  # handed to run(), which raises it in the handler
            if isinstance(exc, KVPackError):
                await drain(it)
            self.jobs.put_nowait(exc)

    def _check_stats(self, begin: pb.TensorBegin) -> str:
        p = self.plan
        assert p is not None
        shape = tuple(begin.shape)
        if wire.dtype_to_torch(begin.dtype) not in _FLOAT:
            raise InvalidArgument("statistics must be FLOAT32, FLOAT16 or BFLOAT16")
        if begin.kind == pb.TENSOR_KIND_SCORES:
            ok = len(shape) == 4 and shape[:2] == (p.num_layers, p.batch)
            ok = ok and shape[2] in (p.q_heads, p.kv_heads) and shape[3] == p.seq_len
            want = f"[L={p.num_layers}, B={p.batch}, H={p.q_heads} or {p.kv_heads}, n={p.seq_len}]"
        else:
            ok = len(shape) == 5 and shape[:3] == (p.num_layers, p.batch, p.q_heads)
            ok = ok and 1 <= shape[3] <= p.seq_len and shape[4] == p.head_dim
            want = f"[L={p.num_layers}, B={p.batch}, Hq={p.q_heads}, W<=n, d={p.head_dim}]"
        if not ok:
            raise InvalidArgument(f"statistics tensor shape {list(shape)}, expected {want}")
        return "statistics"

    def _check_kv(self, begin: pb.TensorBegin, kind: int, layer: int) -> str:
        p = self.plan
        assert p is not None
        name = "KEYS" if kind == pb.TENSOR_KIND_KEYS else "VALUES"
        if begin.kind != kind or begin.layer != layer:
            raise InvalidArgument(
                f"expected layer {layer}'s {name}, got {pb.TensorKind.Name(begin.kind)} of "
                f"layer {begin.layer} (order: header, statistics, then KEYS and VALUES per layer)"
            )
        if begin.dtype != p.header.layout.dtype:
            raise InvalidArgument(
                f"layer {layer} {name} dtype {pb.DType.Name(begin.dtype)} differs from "
                f"layout.dtype {pb.DType.Name(p.header.layout.dtype)}"
            )
        if tuple(begin.shape) != p.kv_shape:
            raise InvalidArgument(
                f"layer {layer} {name} shape {list(begin.shape)}, expected {list(p.kv_shape)} "
                "[B, Hkv, n, d] from the layout"
            )
        return name

    async def _receive(
        self, it: AsyncIterator[Request], begin: pb.TensorBegin, what: str
    ) -> torch.Tensor:
        """Assemble one tensor; counts against --max-request-bytes before allocating."""
        left = self.config.max_request_bytes - self.received
        if begin.nbytes > left:
            raise ResourceExhausted(
                f"{what} of {begin.nbytes} bytes would take the request over "
                f"--max-request-bytes={self.config.max_request_bytes}"
            )
        asm: wire.TensorAssembler | None = wire.TensorAssembler(begin, max_bytes=left)
        assert asm is not None
        writer = ChunkWriter(self.servicer.executor, self.reservation)
        try:
            while not asm.done:
                msg = await anext(it, None)
                if msg is None or msg.WhichOneof("msg") != "chunk":
                    raise InvalidArgument(
                        f"{asm.what}: expected chunks up to {asm.nbytes} bytes, got "
                        f"{'end of stream' if msg is None else msg.WhichOneof('msg')}"
                    )
                await writer.add(asm, msg.chunk)
            await writer.flush()
        except BaseException:
            # This frame outlives the call in the exception's traceback (see _release): it
            # must not keep the half-received tensor alive.
            asm = msg = None
            raise
        self.received += asm.nbytes
        return asm.tensor()

    async def _use_stats(self, kind: int, stats: torch.Tensor) -> None:
        p = self.plan
        assert p is not None
        if p.policy == "none" or not p.needs_scores:
            return  # statistics are optional for this policy and unused
        if kind == pb.TENSOR_KIND_WINDOW_QUERIES:
            self.queries = stats
            return
        if p.per_layer_select:
            self.scores = stats
            return
        start = time.perf_counter()
        h = p.header
        budget = {"ratio": h.ratio} if h.HasField("ratio") else {"n_keep": h.n_keep}

        kwargs: dict[str, Any] = {**budget, **p.settings}

        def run() -> list[torch.Tensor]:
            return codec.select(stats, policy=p.policy, num_kv_heads=p.kv_heads, **kwargs)

        try:
            self.indices = await asyncio.get_running_loop().run_in_executor(
                self.servicer.executor, run
            )
        except ValueError as e:
            raise InvalidArgument(f"select: {e}") from e
        finally:
            _timed(self.timings, "select", start)
            self.servicer.metrics.stage_duration.labels("select").observe(
                time.perf_counter() - start
            )

    # -- per-layer work (codec thread pool) ------------------------------------------------------

    def _select_layer(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, t: dict[str, float]
    ) -> torch.Tensor:
        p = self.plan
        assert p is not None
        if p.policy == "none":
            n = p.seq_len
            return torch.arange(n).expand(p.batch, p.kv_heads, n).contiguous()
        if self.indices is not None:
            return self.indices[layer]
        scores = None
        if self.queries is not None:
            start = time.perf_counter()
            scores = codec.scores_from_window(self.queries[layer], k).unsqueeze(0)
            _timed(t, "stats", start)
        elif self.scores is not None:
            scores = self.scores[layer : layer + 1]
        if p.needs_scores and scores is None:
            raise InvalidArgument(f"policy {p.policy!r} needs attention statistics")
        start = time.perf_counter()
        kwargs: dict[str, Any] = {**p.layer_budget(layer), **p.settings}
        try:
            return codec.select(
                scores, policy=p.policy, num_kv_heads=p.kv_heads, keys=[k], values=[v], **kwargs
            )[0]
        except ValueError as e:
            raise InvalidArgument(f"select (layer {layer}): {e}") from e
        finally:
            _timed(t, "select", start)

    def _process(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> LayerResult:
        """Select (if per layer), gather and encode one layer. Runs in the codec pool."""
        p = self.plan
        assert p is not None
        t: dict[str, float] = {}
        idx = self._select_layer(layer, k, v, t)
        start = time.perf_counter()
        if p.policy == "none":
            ck, cv = k, v
        else:
            try:
                (ck,), (cv,) = codec.gather([k], [v], [idx])
            except ValueError as e:
                raise InvalidArgument(f"gather (layer {layer}): {e}") from e
        _timed(t, "gather", start)
        encoded = None
        if p.header.store:
            if p.quant.mode != "lossless":
                _require_finite(layer, ck, cv)
            start = time.perf_counter()
            try:
                encoded = codec.encode_layer(ck, cv, None if p.policy == "none" else idx, p.quant)
            except ValueError as e:
                raise InvalidArgument(f"encode (layer {layer}): {e}") from e
            _timed(t, "encode", start)
        return LayerResult(
            layer, ck, cv, idx, encoded, _nbytes(k) + _nbytes(v), _nbytes(ck) + _nbytes(cv), t
        )

    # -- the response stream ---------------------------------------------------------------------

    async def run(
        self, requests: AsyncIterator[Request]
    ) -> AsyncIterator[pb.CompressResponse | bytes]:
        reader = asyncio.create_task(self._read(requests))
        results: list[LayerResult] = []
        failed = False
        raised: BaseException | None = None
        result: LayerResult | None = None
        try:
            while True:
                item = await self.jobs.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                try:
                    result = await item
                finally:
                    self.ahead.release()
                self.reservation.give_back(result.input_bytes)
                self._observe_layer(result)
                if self.plan is not None and self.plan.header.return_cache:
                    for frame in _layer_frames(result):
                        yield frame
                # Drop the composite tensors: only the encoded layer is needed from here on.
                result.keys = result.values = torch.empty(0)
                results.append(result)
            yield await self._finish(results)
        except BaseException as exc:
            failed = isinstance(exc, KVPackError)
            raised = exc
            raise
        finally:
            if failed and not reader.done():
                # Let the reader drain the upload so that the client sees our status (see
                # rpc.drain); unblock it if it waits for a layer slot.
                self.abandoned = True
                for _ in range(self.num_slots):
                    self.ahead.release()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(reader), DRAIN_SECONDS + 1)
            if not reader.done():
                reader.cancel()
            # Surface nothing from a cancelled reader; its exception (if any) was queued.
            await asyncio.gather(reader, return_exceptions=True)
            results.clear()
            item = result = None
            self._release(reader, raised)
            raised = None

    def _release(self, reader: asyncio.Task[None], raised: BaseException | None) -> None:
        """Drop everything the call buffered, now rather than at the next garbage collection.

        A failed or cancelled call's exceptions sit in reference cycles (a queued exception's
        traceback holds ``run``'s frame, which holds the exception; a cancelled task's
        CancelledError holds the task's own frame), and their tracebacks hold the finished
        frames of ``_read`` and ``_receive`` with their tensors and half-filled assemblers.
        Clearing those frames and the session's own references frees the buffers at once.
        """
        self.reservation.close()
        _clear_traceback(raised)
        self.scores = self.queries = None
        self.indices = None
        while not self.jobs.empty():
            job = self.jobs.get_nowait()
            if isinstance(job, BaseException):
                _clear_traceback(job)
        if reader.done() and not reader.cancelled() and reader.exception() is not None:
            _clear_traceback(reader.exception())

    def _observe_layer(self, r: LayerResult) -> None:
        metrics = self.servicer.metrics
        for stage, seconds in r.timings.items():
            metrics.stage_duration.labels(stage).observe(seconds)
            self.timings[stage] = self.timings.get(stage, 0.0) + seconds

    async def _finish(self, results: list[LayerResult]) -> pb.CompressResponse:
        p = self.plan
        assert p is not None
        h = p.header
        metrics = self.servicer.metrics
        input_bytes = sum(r.input_bytes for r in results)
        kept_bytes = sum(r.kept_bytes for r in results)
        kept_entries = sum(int((r.indices >= 0).sum()) for r in results)
        total_entries = p.num_layers * p.batch * p.kv_heads * p.seq_len
        summary = pb.CompressSummary(
            input_bytes=input_bytes,
            kept_bytes=kept_bytes,
            token_ratio=1.0 - kept_entries / total_entries,
        )
        for r in results:
            ls = summary.layers.add(layer=r.layer, kept_tokens=int(r.indices.shape[-1]))
            ls.input_bytes = r.input_bytes
            if r.encoded is not None:
                s = r.encoded.stats
                ls.stored_bytes = r.encoded.nbytes
                ls.key_max_abs_error = s.key_max_abs_error
                ls.value_max_abs_error = s.value_max_abs_error
                ls.key_rel_error = s.key_rel_error
                ls.value_rel_error = s.value_rel_error
                metrics.reconstruction_error.labels("key").observe(s.key_rel_error)
                metrics.reconstruction_error.labels("value").observe(s.value_rel_error)
        metrics.input_bytes.labels(p.policy).inc(input_bytes)
        metrics.kept_bytes.labels(p.policy).inc(kept_bytes)
        if h.store:
            check_deadline(self.context, "Compress store")
            meta = {"policy": p.policy, **({"model": h.model} if h.model else {})}
            if h.HasField("ratio"):
                meta["ratio"] = repr(h.ratio)
            elif h.HasField("n_keep"):
                meta["n_keep"] = str(h.n_keep)
            start = time.perf_counter()
            blob = await asyncio.get_running_loop().run_in_executor(
                self.servicer.executor,
                lambda: codec.assemble(
                    [r.encoded for r in results],
                    p.quant,
                    dtype=p.dtype,
                    meta=meta,
                    seq_len=p.seq_len,
                ),
            )
            _timed(self.timings, "encode", start)
            key = self._key(blob)
            entry_meta = container.meta_from_header(
                codec.read_header(blob), blob, settings={f"policy.{k}": v for k, v in meta.items()}
            )
            start = time.perf_counter()
            await self.servicer.put_entry(keys.namespaced(self.tenant, key), blob, entry_meta)
            _timed(self.timings, "store", start)
            summary.key = key
            summary.stored_bytes = len(blob)
            summary.compression_ratio = input_bytes / max(1, len(blob))
            metrics.output_bytes.labels(p.policy).inc(len(blob))
            metrics.compression_ratio.labels(p.policy).observe(summary.compression_ratio)
        summary.timings_seconds.update(self.timings)
        return pb.CompressResponse(summary=summary)

    def _key(self, blob: bytes) -> str:
        p = self.plan
        assert p is not None
        h = p.header
        if h.key:
            return h.key
        if h.token_ids:
            lay = h.layout
            layout = {
                "num_layers": lay.num_layers,
                "batch_size": lay.batch_size,
                "num_kv_heads": lay.num_kv_heads,
                "num_query_heads": p.q_heads,
                "head_dim": lay.head_dim,
                "seq_len": lay.seq_len,
                "dtype": str(p.dtype),
            }
            policy: dict[str, object] = {"policy": p.policy, "settings": p.settings}
            if h.HasField("ratio"):
                policy["ratio"] = repr(h.ratio)
            if h.HasField("n_keep"):
                policy["n_keep"] = h.n_keep
            return keys.content_key(h.model, layout, p.quant.to_dict(), policy, h.token_ids)
        return keys.blob_key(blob)


def _clear_traceback(exc: BaseException | None) -> None:
    """Clear the locals of every finished frame in ``exc``'s traceback and its chain (frames
    still executing are left alone by ``traceback.clear_frames``)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def _require_finite(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Lossy and fixed encodings are error-bounded for finite values only, and the codec keeps its
    full-precision window as is: refuse NaN/Inf in any kept K/V so none is ever stored."""
    for name, t in (("KEYS", k), ("VALUES", v)):
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise InvalidArgument(
                f"layer {layer} {name} contain NaN or Inf (non-finite values); only quant mode "
                "'lossless' stores them"
            )


def _layer_frames(r: LayerResult) -> Iterator[bytes]:
    """A layer's composite KEYS, VALUES and INDICES as serialised response messages."""
    for kind, tensor in (
        (pb.TENSOR_KIND_KEYS, r.keys),
        (pb.TENSOR_KIND_VALUES, r.values),
        (pb.TENSOR_KIND_INDICES, r.indices),
    ):
        yield from wire.tensor_frames(pb.CompressResponse, kind, r.layer, tensor)
