"""Compress -> Fetch end to end against a real in-process server."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import grpc
import pytest
import torch

from kvpack import codec, wire
from kvpack.v1 import kvpack_pb2 as pb
from tests.server.server_support import (
    Collected,
    compress,
    compress_requests,
    fetch,
    header,
    make_cache,
    tensor_requests,
)

KEYS, VALUES, INDICES = pb.TENSOR_KIND_KEYS, pb.TENSOR_KIND_VALUES, pb.TENSOR_KIND_INDICES


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
async def test_compress_fetch_matches_codec(stub: Any, dtype: torch.dtype) -> None:
    """GQA 8 query / 2 KV heads, several layers: the composite cache equals the codec's own
    select + gather, and the stored container decodes to the codec's encoding of it."""
    scores, keys, values = make_cache(layers=4, hkv=2, hq=8, n=320, d=64, dtype=dtype)
    h = header(keys, 8, ratio=0.6, store=True, return_cache=True, key="it/compress")
    out = await compress(stub, compress_requests(h, scores, keys, values), timeout=60)

    want_idx = codec.select(scores, 0.6, "kvcompose", num_kv_heads=2)
    want_k, want_v = codec.gather(keys, values, want_idx)
    for layer in range(4):
        assert torch.equal(out.tensors[(INDICES, layer)], want_idx[layer])
        assert torch.equal(out.tensors[(KEYS, layer)], want_k[layer])
        assert torch.equal(out.tensors[(VALUES, layer)], want_v[layer])
        assert out.tensors[(KEYS, layer)].dtype == dtype

    s = out.summary
    assert s is not None and s.key == "it/compress"
    assert [ls.kept_tokens for ls in s.layers] == [int(i.shape[-1]) for i in want_idx]
    assert s.input_bytes == sum(k.numel() * k.element_size() * 2 for k in keys)
    assert s.kept_bytes == sum(k.numel() * k.element_size() * 2 for k in want_k)
    assert s.stored_bytes > 0 and s.compression_ratio == pytest.approx(
        s.input_bytes / s.stored_bytes
    )
    assert 0.55 <= s.token_ratio <= 0.65
    assert {"select", "gather", "encode", "store"} <= set(s.timings_seconds)
    assert all(0 <= ls.key_rel_error < 0.1 and ls.stored_bytes > 0 for ls in s.layers)

    blob = await fetch(stub, "it/compress", timeout=30)
    direct = codec.decode(codec.encode(want_k, want_v, indices=want_idx))
    fetched = codec.decode(blob)
    for layer in range(4):
        assert torch.equal(fetched.keys[layer], direct.keys[layer])
        assert torch.equal(fetched.values[layer], direct.values[layer])
        assert torch.equal(fetched.indices[layer], want_idx[layer])

    # A layer range is a valid container of just those layers.
    part = codec.decode(await fetch(stub, "it/compress", 1, 3, timeout=30))
    assert part.layers == [1, 2]
    assert torch.equal(part.keys[0], direct.keys[1])

    info = await stub.Stat(pb.StatRequest(key="it/compress"), timeout=5)
    assert info.stored_bytes == len(blob) and info.num_layers == 4
    assert info.dtype == wire.dtype_from_torch(dtype)
    assert info.original_bytes == s.kept_bytes and info.codec.startswith("lossy/")


async def test_layer_answers_before_upload_ends(stub: Any) -> None:
    """The client sends layer l+1 only after layer l's composite cache came back."""
    scores, keys, values = make_cache(layers=3, n=200)
    h = header(keys, 8, ratio=0.5, store=True, return_cache=True, key="it/streamed")
    layer_done = [asyncio.Event() for _ in keys]
    sent_after: list[int] = []

    async def requests() -> Any:
        yield pb.CompressRequest(header=h)
        for r in tensor_requests(pb.TENSOR_KIND_SCORES, 0, scores):
            yield r
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            if i:
                await asyncio.wait_for(layer_done[i - 1].wait(), 20)
                sent_after.append(i)
            for r in tensor_requests(KEYS, i, k):
                yield r
            for r in tensor_requests(VALUES, i, v):
                yield r
        yield pb.CompressRequest(finish=pb.Finish())

    out = Collected()
    async for response in stub.Compress(requests(), timeout=60):
        done = out.add(response)
        if done is not None and done[0] == INDICES:
            layer_done[done[1]].set()
    assert sent_after == [1, 2]
    assert out.summary is not None and len(out.summary.layers) == 3


async def test_policy_none_keeps_everything(stub: Any) -> None:
    _, keys, values = make_cache(layers=2, n=100, dtype=torch.float16)
    h = header(keys, 8, policy="none", ratio=None, store=True, return_cache=True, key="it/none")
    out = await compress(stub, compress_requests(h, None, keys, values), timeout=30)
    assert torch.equal(out.tensors[(KEYS, 1)], keys[1])
    assert torch.equal(out.tensors[(INDICES, 0)][0, 0], torch.arange(100))
    assert out.summary is not None and out.summary.token_ratio == 0.0


async def test_window_queries_and_keys_policies_select_per_layer(stub: Any) -> None:
    _, keys, values = make_cache(layers=2, n=128)
    queries = torch.randn(2, 1, 8, 16, 64).to(torch.bfloat16)
    h = header(keys, 8, ratio=0.5, return_cache=True)
    out = await compress(
        stub,
        compress_requests(h, queries, keys, values, stats_kind=pb.TENSOR_KIND_WINDOW_QUERIES),
        timeout=30,
    )
    for layer in range(2):
        scores = codec.scores_from_window(queries[layer], keys[layer]).unsqueeze(0)
        want = codec.select(scores, 0.5, "kvcompose", num_kv_heads=2)[0]
        assert torch.equal(out.tensors[(INDICES, layer)], want)

    h = header(keys, 8, policy="knorm", ratio=0.75, return_cache=True)
    out = await compress(stub, compress_requests(h, None, keys, values), timeout=30)
    want = codec.select(None, 0.75, "knorm", keys=keys[:1], values=values[:1])[0]
    assert torch.equal(out.tensors[(INDICES, 0)], want)
    assert out.summary is not None and out.summary.stored_bytes == 0


async def test_content_key_is_stable(stub: Any) -> None:
    scores, keys, values = make_cache(layers=2, n=64)
    kw = {"store": True, "model": "llama@rev1", "token_ids": list(range(64))}
    first = await compress(stub, compress_requests(header(keys, 8, **kw), scores, keys, values))
    again = await compress(stub, compress_requests(header(keys, 8, **kw), scores, keys, values))
    assert first.summary is not None and again.summary is not None
    assert first.summary.key == again.summary.key and first.summary.key.startswith("sha256:")
    kw["token_ids"] = list(range(1, 65))
    other = await compress(stub, compress_requests(header(keys, 8, **kw), scores, keys, values))
    assert other.summary is not None and other.summary.key != first.summary.key


async def _status(stub: Any, requests: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await compress(stub, requests, timeout=20)
    return err.value.code(), err.value.details()


async def test_compress_invalid_arguments(stub: Any) -> None:
    scores, keys, values = make_cache(layers=2, n=64)
    inv = grpc.StatusCode.INVALID_ARGUMENT
    # Missing statistics for a policy that needs them: no silent fallback.
    code, msg = await _status(stub, compress_requests(header(keys, 8), None, keys, values))
    assert code == inv and "statistics" in msg
    # Wrong order: VALUES before KEYS.
    bad = list(compress_requests(header(keys, 8), scores, keys, values))
    first_keys = next(i for i, r in enumerate(bad) if r.HasField("begin") and r.begin.kind == KEYS)
    bad[first_keys].begin.kind = VALUES
    code, msg = await _status(stub, iter(bad))
    assert code == inv and "KEYS" in msg
    # Shape disagreeing with the layout.
    code, msg = await _status(
        stub, compress_requests(header(keys, 8), scores, [k[:, :1] for k in keys], values)
    )
    assert code == inv and "shape" in msg
    # Bad header fields.
    for h, needle in [
        (header(keys, 8, ratio=1.5), "ratio"),
        (header(keys, 8, policy="nope"), "unknown policy"),
        (header(keys, 8, key="bad key!"), "invalid key"),
        (header(keys, 3), "multiple"),
        (header(keys, 8, policy_settings={"agg_task": "median"}), "agg_task"),
    ]:
        code, msg = await _status(stub, compress_requests(h, scores, keys, values))
        assert code == inv and needle in msg, msg
    # Stream without a header, and a stream that stops before Finish.
    code, _ = await _status(stub, iter([pb.CompressRequest(finish=pb.Finish())]))
    assert code == inv
    code, msg = await _status(
        stub, list(compress_requests(header(keys, 8), scores, keys, values))[:-1]
    )
    assert code == inv and "Finish" in msg
    # Corrupted chunk: CRC mismatch is DATA_LOSS.
    bad = list(compress_requests(header(keys, 8), scores, keys, values))
    last_chunk = max(i for i, r in enumerate(bad) if r.HasField("chunk"))
    data = bytearray(bad[last_chunk].chunk.data)
    data[0] ^= 0xFF
    bad[last_chunk].chunk.data = bytes(data)
    code, _ = await _status(stub, iter(bad))
    assert code == grpc.StatusCode.DATA_LOSS


async def test_compress_limits(start_server: Any, channels: Any) -> None:
    from kvpack.v1 import kvpack_pb2_grpc as pb_grpc

    server = await start_server(max_seq_len=100, max_request_bytes=200_000)
    stub = pb_grpc.KVPackStub(channels(server.address))
    scores, keys, values = make_cache(layers=2, n=128)
    code, msg = await _status(stub, compress_requests(header(keys, 8), scores, keys, values))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-seq-len=100" in msg
    scores, keys, values = make_cache(layers=8, n=96)
    code, msg = await _status(stub, compress_requests(header(keys, 8), scores, keys, values))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-request-bytes" in msg


async def test_keyless_compress_is_keyed_and_checksummed_by_its_container(
    start_server: Any, channels: Any, tmp_path: Any
) -> None:
    # Without key or token ids the entry's key is the container's sha256, and the disk store
    # keeps that same digest as its checksum (verified on every read).
    from kvpack.v1 import kvpack_pb2_grpc as pb_grpc

    server = await start_server(store="disk", disk_path=str(tmp_path / "store"))
    stub = pb_grpc.KVPackStub(channels(server.address))
    scores, keys, values = make_cache(layers=2, n=64)
    h = header(keys, 8, store=True)
    out = await compress(stub, compress_requests(h, scores, keys, values), timeout=30)
    assert out.summary is not None
    blob = await fetch(stub, out.summary.key, timeout=30)
    digest = hashlib.sha256(blob).hexdigest()
    assert out.summary.key == "sha256:" + digest
    meta = await server.store.stat("default/" + out.summary.key)
    assert meta.sha256 == digest
