"""Protobuf messages of the client calls: building the Compress upload, reading its answer.

Shared by the sync and asyncio clients so both speak the proto's order exactly: header, then the
statistics tensor (scores or window queries) when given, then for each layer its KEYS then VALUES
tensor, then Finish; all tensor bytes in ``kvpack.wire.CHUNK_BYTES`` chunks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from kvpack import wire
from kvpack.client.api import CompressOptions, Tensors, check_options
from kvpack.client.result import (
    BudgetChoice,
    CompressResult,
    EntryInfo,
    LayerStats,
    ServerInfo,
)
from kvpack.engine import STATS_KINDS, Layout, StatsKind, compress_header
from kvpack.errors import InvalidArgument
from kvpack.v1 import kvpack_pb2 as pb

MiB = 1 << 20
#: Threads that decode a fetched container (its layers' K and V streams; the codec's kernels
#: release the GIL): restoring a cache is latency the worker waits for, so use every core.
DECODE_THREADS = os.cpu_count() or 1
#: Called with the number of bytes just transferred (for progress bars).
Progress = Callable[[int], None] | None


def as_layers(tensors: Sequence[torch.Tensor] | torch.Tensor, what: str) -> list[torch.Tensor]:
    """Per-layer list from a list or a stacked ``[L, B, Hkv, n, d]`` tensor."""
    if isinstance(tensors, torch.Tensor):
        if tensors.ndim != 5:
            raise InvalidArgument(
                f"stacked {what} must be [L, B, Hkv, n, d], got {tuple(tensors.shape)}"
            )
        return list(tensors.unbind(0))
    layers = list(tensors)
    if not layers:
        raise InvalidArgument(f"{what}: no layers")
    return layers


@dataclasses.dataclass
class CompressUpload:
    """A validated Compress request: header plus the tensors to stream, in wire order."""

    header: pb.CompressHeader
    stats: tuple[int, torch.Tensor] | None  # (TensorKind, tensor)
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        """Raw bytes uploaded (statistics + K + V)."""
        total = sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
        if self.stats is not None:
            total += self.stats[1].numel() * self.stats[1].element_size()
        return total

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    def frames(self, progress: Progress = None) -> Iterator[bytes]:
        """The request stream, serialised (send it with :func:`compress_method`); tensors are
        copied to host memory one at a time as it is read. ``progress(nbytes)`` is called after
        each tensor has been handed to gRPC."""
        yield pb.CompressRequest(header=self.header).SerializeToString()
        tensors = [(self.stats[0], 0, self.stats[1])] if self.stats is not None else []
        for layer, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            tensors += [(pb.TENSOR_KIND_KEYS, layer, k), (pb.TENSOR_KIND_VALUES, layer, v)]
        for kind, layer, tensor in tensors:
            yield from wire.tensor_frames(pb.CompressRequest, kind, layer, tensor)
            if progress is not None:
                progress(tensor.numel() * tensor.element_size())
        yield pb.CompressRequest(finish=pb.Finish()).SerializeToString()

    def requests(self) -> Iterator[pb.CompressRequest]:
        """:meth:`frames` as protobuf messages, for a generated stub."""
        return map(pb.CompressRequest.FromString, self.frames())


#: Full names of the streaming methods, for :func:`compress_method` and :func:`fetch_method`.
COMPRESS = "/kvpack.v1.KVPack/Compress"
FETCH = "/kvpack.v1.KVPack/Fetch"


def compress_method(channel: Any) -> Any:
    """Compress on a sync or aio ``channel``, sending :meth:`CompressUpload.frames` and receiving
    chunks as :class:`kvpack.wire.ChunkFrame` (the generated stub copies each byte 3-4 more
    times)."""
    return channel.stream_stream(
        COMPRESS,
        request_serializer=wire.serialize,
        response_deserializer=wire.frame_parser(pb.CompressResponse),
        _registered_method=True,
    )


def fetch_method(channel: Any) -> Any:
    """Fetch on a sync or aio ``channel``, receiving chunks as :class:`kvpack.wire.ChunkFrame`."""
    return channel.unary_stream(
        FETCH,
        request_serializer=pb.FetchRequest.SerializeToString,
        response_deserializer=wire.frame_parser(pb.FetchResponse),
        _registered_method=True,
    )


@dataclasses.dataclass
class Cache:
    """``compress``'s tensors, checked: the layout they make, the layers and the statistics."""

    layout: Layout
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    stats: tuple[StatsKind, torch.Tensor] | None


def check_cache(keys: Tensors, values: Tensors, options: CompressOptions) -> Cache:
    """Checks ``compress``'s tensors and the names of its keyword arguments.

    Args:
        keys, values: per-layer ``[B, Hkv, n, d]`` (all layers the same shape and dtype) or
            stacked ``[L, B, Hkv, n, d]``.
        options: ``scores`` ``[L, B, H, n]`` (H = query or KV heads) or ``window_queries``
            ``[L, B, Hq, W, d]`` (observation-window queries, after RoPE), and the rest.
    """
    check_options(dict(options))
    k_layers, v_layers = as_layers(keys, "keys"), as_layers(values, "values")
    if len(k_layers) != len(v_layers):
        raise InvalidArgument(f"{len(k_layers)} key layers but {len(v_layers)} value layers")
    shape, dtype = k_layers[0].shape, k_layers[0].dtype
    if len(shape) != 4:
        raise InvalidArgument(f"keys must be [B, Hkv, n, d] per layer, got {tuple(shape)}")
    for layer, (k, v) in enumerate(zip(k_layers, v_layers, strict=True)):
        if k.shape != shape or v.shape != shape or k.dtype != dtype or v.dtype != dtype:
            raise InvalidArgument(
                f"layer {layer}: keys {tuple(k.shape)} {k.dtype} / values {tuple(v.shape)} "
                f"{v.dtype}; every layer must match layer 0 ({tuple(shape)} {dtype})"
            )
    scores, window_queries = options.get("scores"), options.get("window_queries")
    if scores is not None and window_queries is not None:
        raise InvalidArgument("give scores or window_queries, not both")
    batch, kv_heads, n, head_dim = shape
    num_layers = len(k_layers)
    query_heads = kv_heads
    stats: tuple[StatsKind, torch.Tensor] | None = None
    if scores is not None:
        if (
            tuple(scores.shape[:2]) != (num_layers, batch)
            or scores.ndim != 4
            or scores.shape[3] != n
        ):
            raise InvalidArgument(
                f"scores must be [L={num_layers}, B={batch}, H, n={n}], got {tuple(scores.shape)}"
            )
        query_heads = scores.shape[2]
        stats = ("scores", scores)
    elif window_queries is not None:
        if window_queries.ndim != 5 or tuple(window_queries.shape[:2]) != (num_layers, batch):
            raise InvalidArgument(
                f"window_queries must be [L={num_layers}, B={batch}, Hq, W, d], "
                f"got {tuple(window_queries.shape)}"
            )
        query_heads = window_queries.shape[2]
        stats = ("window_queries", window_queries)
    layout = Layout(num_layers, batch, kv_heads, query_heads, head_dim, n, dtype)
    return Cache(layout, k_layers, v_layers, stats)


def compress_upload(keys: Tensors, values: Tensors, options: CompressOptions) -> CompressUpload:
    """The upload of a ``compress`` call: its tensors checked (:func:`check_cache`) and its
    header built from the arguments as given (the server validates them)."""
    cache = check_cache(keys, values, options)
    stats = None
    if cache.stats is not None:
        kind = next(k for k, name in STATS_KINDS.items() if name == cache.stats[0])
        stats = (kind, cache.stats[1])
    header = compress_header(cache.layout, options)
    return CompressUpload(header, stats, cache.keys, cache.values)


_LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(LayerStats))
# BudgetChoice's fields are the message's, by name.
_BUDGET_FIELDS = tuple(f.name for f in dataclasses.fields(BudgetChoice))


def compress_result(
    summary: pb.CompressSummary,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    indices: list[torch.Tensor],
) -> CompressResult:
    """The :class:`CompressResult` of a summary and the composite cache (empty lists when it
    was not asked back)."""
    s = summary
    return CompressResult(
        keys=keys,
        values=values,
        indices=indices,
        key=s.key,
        # LayerStats's fields are LayerSummary's, by name.
        layers=[LayerStats(**{f: getattr(x, f) for f in _LAYER_FIELDS}) for x in s.layers],
        input_bytes=s.input_bytes,
        kept_bytes=s.kept_bytes,
        stored_bytes=s.stored_bytes,
        token_ratio=s.token_ratio,
        compression_ratio=s.compression_ratio,
        timings_seconds=dict(s.timings_seconds),
        budget=(
            BudgetChoice(**{f: getattr(s.budget, f) for f in _BUDGET_FIELDS})
            if s.HasField("budget")
            else None
        ),
    )


class CompressAnswer:
    """Reassembles the Compress response stream: per-layer tensors, then the summary."""

    def __init__(self, num_layers: int, max_tensor_bytes: int, device: torch.device) -> None:
        self.num_layers = num_layers
        self.max_tensor_bytes = max_tensor_bytes
        self.device = device
        self.tensors: dict[tuple[int, int], torch.Tensor] = {}
        self.summary: pb.CompressSummary | None = None
        self._current: wire.TensorAssembler | None = None

    def add(self, response: pb.CompressResponse | wire.ChunkFrame) -> None:
        kind = response.WhichOneof("msg")
        if self.summary is not None:
            raise InvalidArgument(f"server sent {kind} after the summary")
        if kind == "chunk":
            if self._current is None:
                raise InvalidArgument("server sent a chunk outside a tensor")
            if self._current.add(response.chunk):
                self._finish_tensor()
            return
        assert isinstance(response, pb.CompressResponse)
        if kind == "begin":
            if self._current is not None:
                raise InvalidArgument(f"server began a tensor inside {self._current.what}")
            begin = response.begin
            if begin.layer >= self.num_layers or begin.kind not in _ANSWER_KINDS:
                raise InvalidArgument(f"unexpected tensor kind {begin.kind} layer {begin.layer}")
            self._current = wire.TensorAssembler(begin, max_bytes=self.max_tensor_bytes)
            if self._current.done:
                self._finish_tensor()
        elif kind == "summary":
            if self._current is not None:
                raise InvalidArgument(f"summary arrived inside {self._current.what}")
            self.summary = response.summary

    def _finish_tensor(self) -> None:
        assert self._current is not None
        tensor = self._current.tensor().to(self.device, non_blocking=True)
        self.tensors[(self._current.kind, self._current.layer)] = tensor
        self._current = None

    def result(self, return_cache: bool) -> CompressResult:
        if self.summary is None:
            raise InvalidArgument("Compress stream ended without a summary")
        keys, values, indices = [], [], []
        if return_cache:
            try:
                for layer in range(self.num_layers):
                    keys.append(self.tensors[(pb.TENSOR_KIND_KEYS, layer)])
                    values.append(self.tensors[(pb.TENSOR_KIND_VALUES, layer)])
                    indices.append(self.tensors[(pb.TENSOR_KIND_INDICES, layer)])
            except KeyError as e:
                raise InvalidArgument(f"server did not return tensor {e.args[0]}") from None
        return compress_result(self.summary, keys, values, indices)


_ANSWER_KINDS = (pb.TENSOR_KIND_KEYS, pb.TENSOR_KIND_VALUES, pb.TENSOR_KIND_INDICES)


def fetch_request(key: str, layers: tuple[int, int] | range | None) -> pb.FetchRequest:
    """``layers``: half-open ``(start, end)`` or a step-1 range; None = all layers."""
    if layers is None:
        return pb.FetchRequest(key=key)
    if isinstance(layers, range):
        if layers.step != 1:
            raise InvalidArgument("fetch layers must be a contiguous range")
        layers = (layers.start, layers.stop)
    start, end = layers
    if not 0 <= start < end:
        raise InvalidArgument(f"invalid layer range [{start}, {end})")
    return pb.FetchRequest(key=key, layer_start=start, layer_end=end)


def entry_info(msg: pb.EntryInfo) -> EntryInfo:
    dtype = ""
    if msg.dtype:
        dtype = str(wire.dtype_to_torch(msg.dtype)).removeprefix("torch.")
    return EntryInfo(
        key=msg.key,
        stored_bytes=msg.stored_bytes,
        original_bytes=msg.original_bytes,
        created_unix=msg.created_unix,
        num_layers=msg.num_layers,
        dtype=dtype,
        codec=msg.codec,
        settings=dict(msg.settings),
    )


def server_info(msg: pb.InfoResponse) -> ServerInfo:
    limits = msg.limits
    return ServerInfo(
        version=msg.version,
        policies=list(msg.policies),
        quant_modes=list(msg.quant_modes),
        entropy_coders=list(msg.entropy_coders),
        container_version=msg.container_version,
        store=msg.store,
        auth_required=msg.auth_required,
        limits={f.name: getattr(limits, f.name) for f in limits.DESCRIPTOR.fields},
    )


def put_requests(blob: bytes, key: str | None) -> Iterator[pb.PutRequest]:
    """PutHeader (key, size, CRC-32) then the container's chunks."""
    yield pb.PutRequest(
        header=pb.PutHeader(key=key or "", total_bytes=len(blob), crc32=wire.crc32(blob))
    )
    for chunk in wire.iter_chunks(blob):
        yield pb.PutRequest(chunk=chunk)


def blob_assembler(
    first: pb.FetchResponse | wire.ChunkFrame, max_bytes: int
) -> wire.BytesAssembler:
    return wire.BytesAssembler(first.total_bytes, max_bytes=max_bytes, what="fetched container")


def add_fetched(
    assembler: wire.BytesAssembler, response: pb.FetchResponse | wire.ChunkFrame, progress: Progress
) -> None:
    """Copies one Fetch message's chunk in and reports its size."""
    if response.HasField("chunk"):
        before = assembler.received
        assembler.add(response.chunk)
        if progress is not None:
            progress(assembler.received - before)


def answer_limit(upload: CompressUpload) -> int:
    """Largest tensor the server may answer with: a composite layer is at most an uploaded
    layer; int64 indices ``[B, Hkv, n]`` can exceed that for tiny head dims."""
    k = upload.keys[0]
    batch, heads, n, _ = k.shape
    return max(k.numel() * k.element_size(), batch * heads * n * 8, 1)
