"""Test-side helpers: realistic KV caches and request streams built with kvpack.wire."""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import torch

from kvpack import wire
from kvpack.v1 import kvpack_pb2 as pb


def make_cache(
    layers: int = 4,
    batch: int = 1,
    hkv: int = 2,
    hq: int = 8,
    n: int = 256,
    d: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(scores [L, B, Hq, n] float32, keys, values: L tensors [B, Hkv, n, d])."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(layers, batch, hq, n, generator=g).softmax(-1)
    keys = [torch.randn(batch, hkv, n, d, generator=g).to(dtype) for _ in range(layers)]
    values = [torch.randn(batch, hkv, n, d, generator=g).to(dtype) for _ in range(layers)]
    return scores, keys, values


def header(
    keys: Sequence[torch.Tensor],
    hq: int,
    *,
    policy: str = "kvcompose",
    ratio: float | None = 0.5,
    **kw: Any,
) -> pb.CompressHeader:
    b, hkv, n, d = keys[0].shape
    h = pb.CompressHeader(
        layout=pb.Layout(
            num_layers=len(keys),
            batch_size=b,
            num_kv_heads=hkv,
            num_query_heads=hq,
            head_dim=d,
            seq_len=n,
            dtype=wire.dtype_from_torch(keys[0].dtype),
        ),
        policy=policy,
        **kw,
    )
    if ratio is not None:
        h.ratio = ratio
    return h


def tensor_requests(kind: int, layer: int, t: torch.Tensor) -> Iterator[pb.CompressRequest]:
    for msg in wire.iter_tensor_messages(kind, layer, t):
        if isinstance(msg, pb.TensorBegin):
            yield pb.CompressRequest(begin=msg)
        else:
            yield pb.CompressRequest(chunk=msg)


def compress_requests(
    h: pb.CompressHeader,
    stats: torch.Tensor | None,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    stats_kind: int = pb.TENSOR_KIND_SCORES,
) -> Iterator[pb.CompressRequest]:
    yield pb.CompressRequest(header=h)
    if stats is not None:
        yield from tensor_requests(stats_kind, 0, stats)
    for i, (k, v) in enumerate(zip(keys, values, strict=True)):
        yield from tensor_requests(pb.TENSOR_KIND_KEYS, i, k)
        yield from tensor_requests(pb.TENSOR_KIND_VALUES, i, v)
    yield pb.CompressRequest(finish=pb.Finish())


async def aiter_of(items: Iterator[pb.CompressRequest]) -> AsyncIterator[pb.CompressRequest]:
    for item in items:
        yield item


class Collected:
    """Responses of one Compress call: per-layer tensors and the summary."""

    def __init__(self) -> None:
        self.tensors: dict[tuple[int, int], torch.Tensor] = {}
        self.summary: pb.CompressSummary | None = None
        self._asm: wire.TensorAssembler | None = None

    def add(self, r: pb.CompressResponse) -> tuple[int, int] | None:
        """Feed one response; returns (kind, layer) when a tensor completes."""
        which = r.WhichOneof("msg")
        if which == "summary":
            self.summary = r.summary
            return None
        if which == "begin":
            self._asm = wire.TensorAssembler(r.begin, max_bytes=1 << 32)
        else:
            assert self._asm is not None
            self._asm.add(r.chunk)
        if self._asm is not None and self._asm.done:
            key = (self._asm.kind, self._asm.layer)
            self.tensors[key] = self._asm.tensor()
            self._asm = None
            return key
        return None


async def compress(stub: Any, requests: Iterator[pb.CompressRequest], **kw: Any) -> Collected:
    out = Collected()
    async for r in stub.Compress(aiter_of(requests), **kw):
        out.add(r)
    return out


async def fetch(stub: Any, key: str, start: int = 0, end: int = 0, **kw: Any) -> bytes:
    buf = bytearray()
    async for r in stub.Fetch(pb.FetchRequest(key=key, layer_start=start, layer_end=end), **kw):
        assert r.chunk.offset == len(buf)
        buf += r.chunk.data
        assert len(buf) <= r.total_bytes
    return bytes(buf)


def put_requests(blob: bytes, key: str = "") -> Iterator[pb.PutRequest]:
    yield pb.PutRequest(header=pb.PutHeader(key=key, total_bytes=len(blob), crc32=zlib.crc32(blob)))
    for chunk in wire.iter_chunks(blob):
        yield pb.PutRequest(chunk=chunk)
