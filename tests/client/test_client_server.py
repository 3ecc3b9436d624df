"""KVPackClient against a real server on loopback: every method, typed errors, no half-stores."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import grpc
import pytest
import torch

from kvpack import codec, errors
from kvpack.client import KVPackClient, LocalKVPack, messages
from kvpack.client.channel import CallPolicy
from kvpack.options import channel_options
from kvpack.v1 import kvpack_pb2_grpc
from tests.client.client_support import ServerThread, make_cache

# Quantise every token: the defaults keep the newest 128/256 tokens and partial blocks exact.
LOSSY = {"k_window": 0, "v_window": 0, "block_tokens": 16}


@pytest.fixture
def client(server: ServerThread) -> Any:
    with KVPackClient(server.address) as c:
        yield c


def test_info(client: KVPackClient) -> None:
    info = client.info()
    assert "kvcompose" in info.policies and "none" in info.policies
    assert info.store == "memory"
    assert info.limits["chunk_bytes"] == 1 << 20
    assert not info.auth_required


def test_compress_returns_composite_and_stores(client: KVPackClient) -> None:
    scores, keys, values = make_cache()
    result = client.compress(keys, values, scores=scores, ratio=0.5, key="t/compress", quant=LOSSY)
    assert result.key == "t/compress"
    expected = codec.select(scores, 0.5, num_kv_heads=2)
    ref_k, ref_v = codec.gather(keys, values, expected)
    for layer in range(3):
        assert torch.equal(result.indices[layer], expected[layer])
        assert torch.equal(result.keys[layer], ref_k[layer])
        assert torch.equal(result.values[layer], ref_v[layer])
        assert result.layers[layer].kept_tokens == expected[layer].shape[-1]
    assert result.token_ratio == pytest.approx(0.5, abs=0.02)
    assert result.input_bytes == sum(2 * k.numel() * 2 for k in keys)
    assert result.stored_bytes > 0 and result.compression_ratio > 1

    fetched = client.fetch("t/compress")
    assert fetched.layers == [0, 1, 2]
    for layer in range(3):
        err = (fetched.keys[layer].float() - ref_k[layer].float()).abs().max()
        assert 0 < err <= result.layers[layer].key_max_abs_error + 1e-3
        assert torch.equal(fetched.indices[layer], expected[layer])


def test_compress_without_store_or_cache(client: KVPackClient) -> None:
    scores, keys, values = make_cache(seed=1)
    result = client.compress(keys, values, scores=scores, ratio=0.25, store=False)
    assert result.key == "" and result.stored_bytes == 0 and len(result.keys) == 3
    only_store = client.compress(
        torch.stack(keys), torch.stack(values), scores=scores, ratio=0.25, return_cache=False
    )
    assert only_store.keys == [] and only_store.key
    assert client.stat(only_store.key).num_layers == 3


def test_fetch_layer_range(client: KVPackClient) -> None:
    scores, keys, values = make_cache(seed=2)
    client.compress(keys, values, scores=scores, ratio=0.5, key="t/range")
    part = client.fetch("t/range", layers=(1, 3))
    assert part.layers == [1, 2]
    assert client.fetch("t/range", layers=range(0, 1)).layers == [0]


def test_put_stat_list_delete(client: KVPackClient) -> None:
    _, keys, values = make_cache(seed=3)
    blob = codec.encode(keys, values)
    assert client.put(blob, key="t/put/a") == "t/put/a"
    content_key = client.put(blob)
    assert client.fetch_bytes("t/put/a") == blob == client.fetch_bytes(content_key)
    for i in range(3):
        client.put(blob, key=f"t/list/{i}")

    info = client.stat("t/put/a")
    assert (info.stored_bytes, info.num_layers, info.dtype) == (len(blob), 3, "float16")
    assert info.original_bytes == sum(2 * k.numel() * 2 for k in keys)
    assert [e.key for e in client.list("t/list/", page_size=1)] == [f"t/list/{i}" for i in range(3)]

    client.delete("t/put/a")
    with pytest.raises(errors.NotFound, match="t/put/a"):
        client.stat("t/put/a")
    with pytest.raises(errors.NotFound):
        client.delete("t/put/a")


def test_typed_errors_carry_server_message(client: KVPackClient) -> None:
    _, keys, values = make_cache(seed=4)
    with pytest.raises(errors.NotFound, match="no entry 'missing'"):
        client.fetch("missing")
    with pytest.raises(errors.InvalidArgument) as bad_put:
        client.put(b"not a container", key="t/bad")
    assert bad_put.value.message and bad_put.value.status == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(errors.InvalidArgument, match=r"(?i)stat|score"):
        client.compress(keys, values, ratio=0.5, key="t/no-stats")  # kvcompose needs scores
    with pytest.raises(errors.InvalidArgument):
        client.compress(keys, values, policy="no-such-policy", ratio=0.5)
    with pytest.raises(errors.NotFound):
        client.stat("t/no-stats")


def test_client_side_validation(client: KVPackClient) -> None:
    scores, keys, values = make_cache()
    with pytest.raises(errors.InvalidArgument, match="layer 1"):
        client.compress(keys, [values[0], values[1][:, :, :5], values[2]], scores=scores, ratio=0.5)
    with pytest.raises(errors.InvalidArgument, match="scores"):
        client.compress(keys, values, scores=scores[:, :, :, :5], ratio=0.5)


def _raw_stub(server: ServerThread) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(server.address, options=channel_options())
    return channel, kvpack_pb2_grpc.KVPackStub(channel)


def test_failed_uploads_are_never_stored(server: ServerThread, client: KVPackClient) -> None:
    scores, keys, values = make_cache(seed=5)
    upload = messages.compress_upload(
        keys, values, {"scores": scores, "ratio": 0.5, "key": "t/half"}
    )
    requests = list(upload.requests())
    channel, stub = _raw_stub(server)
    with channel:
        # The stream ends before the last layer and Finish: rejected, nothing stored.
        with pytest.raises(grpc.RpcError) as short:
            list(stub.Compress(iter(requests[:-3]), timeout=30))
        assert short.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # The client dies mid-upload (its request iterator fails): the call is cancelled.
        def dying() -> Any:
            yield from requests[: len(requests) // 2]
            raise RuntimeError("client crashed")

        with pytest.raises(grpc.RpcError):
            list(stub.Compress(dying(), timeout=30))
    time.sleep(0.2)  # let the server notice the cancellation
    with pytest.raises(errors.NotFound):
        client.stat("t/half")


def test_deadline_exceeded_stores_nothing(server: ServerThread) -> None:
    # 32 MiB of K+V against a 20 ms deadline: no machine uploads, evicts and encodes that in
    # time (a 4 MiB cache against 50 ms stopped failing once the codec got faster).
    scores, keys, values = make_cache(layers=8, hkv=4, hq=8, n=2048, d=128, seed=6)
    hasty = KVPackClient(server.address, timeout=0.02, timeout_per_mib=0.0)
    with hasty, pytest.raises(errors.DeadlineExceeded):
        hasty.compress(keys, values, scores=scores, ratio=0.5, key="t/late")
    time.sleep(0.3)
    with KVPackClient(server.address) as patient, pytest.raises(errors.NotFound):
        patient.stat("t/late")


def test_auth(start_server: Any) -> None:
    secured = start_server(auth_tokens="team:s3cret")
    with KVPackClient(secured.address) as anonymous, pytest.raises(errors.Unauthenticated):
        anonymous.info()
    with (
        KVPackClient(secured.address, token="wrong") as wrong,
        pytest.raises(errors.Unauthenticated),
    ):
        wrong.stat("x")
    with KVPackClient(secured.address, token="s3cret") as member:
        assert member.info().auth_required
        scores, keys, values = make_cache()
        assert member.compress(keys, values, scores=scores, ratio=0.5, key="k").key == "k"


def test_request_limit_is_resource_exhausted(start_server: Any) -> None:
    small = start_server(max_request_bytes=4096)
    scores, keys, values = make_cache()
    with KVPackClient(small.address) as c, pytest.raises(errors.ResourceExhausted):
        c.compress(keys, values, scores=scores, ratio=0.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_idempotent_calls_retry_until_server_is_up(start_server: Any) -> None:
    port = _free_port()
    timer = threading.Timer(0.5, lambda: start_server(port=port))
    timer.start()
    try:
        # Up to ~15 s of retries: the server's start (kernel warm-up) is slow on a loaded machine,
        # and the test is about retrying until it is up, not about how fast it comes up.
        with KVPackClient(f"127.0.0.1:{port}", retries=30) as c:
            c.policy = CallPolicy(timeout=5, retries=30, backoff=0.2, max_backoff=0.5)
            assert c.info().store == "memory"
    finally:
        timer.join()


def test_compress_is_not_retried() -> None:
    scores, keys, values = make_cache()
    with KVPackClient(f"127.0.0.1:{_free_port()}", timeout=5) as c:
        c.policy = CallPolicy(timeout=5, retries=5, backoff=10.0, max_backoff=10.0)
        start = time.monotonic()
        with pytest.raises(errors.Unavailable):
            c.compress(keys, values, scores=scores, ratio=0.5)
        assert time.monotonic() - start < 5


def test_local_mode_matches_server(client: KVPackClient) -> None:
    scores, keys, values = make_cache(seed=7)
    remote = client.compress(keys, values, scores=scores, ratio=0.6, key="t/local", quant=LOSSY)
    with LocalKVPack() as local:
        here = local.compress(keys, values, scores=scores, ratio=0.6, key="t/local", quant=LOSSY)
        for a, b in zip(remote.indices + remote.keys, here.indices + here.keys, strict=True):
            assert torch.equal(a, b)
        assert here.token_ratio == pytest.approx(remote.token_ratio)
        decoded_here = local.fetch("t/local")
        decoded_remote = client.fetch("t/local")
        for a, b in zip(decoded_here.keys, decoded_remote.keys, strict=True):
            assert torch.equal(a, b)
        with pytest.raises(errors.NotFound):
            local.fetch("t/none")
        with pytest.raises(errors.InvalidArgument):
            local.put(b"junk")


def test_progress_reports_every_byte(client: KVPackClient) -> None:
    scores, keys, values = make_cache(seed=8)
    sent: list[int] = []
    client.compress(keys, values, scores=scores, ratio=0.5, key="t/progress", progress=sent.append)
    assert sum(sent) == scores.numel() * 4 + sum(2 * k.numel() * 2 for k in keys)
    received: list[int] = []
    blob = client.fetch_bytes("t/progress", progress=received.append)
    assert sum(received) == len(blob)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_results_come_back_on_the_callers_device(client: KVPackClient) -> None:
    scores, keys, values = make_cache(seed=9)
    cuda_keys, cuda_values = [k.cuda() for k in keys], [v.cuda() for v in values]
    result = client.compress(cuda_keys, cuda_values, scores=scores.cuda(), ratio=0.5, key="t/cuda")
    assert all(t.is_cuda for t in result.keys + result.values + result.indices)
    expected = codec.select(scores, 0.5, num_kv_heads=2)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(result.indices, expected, strict=True))
    assert all(t.is_cuda for t in client.fetch("t/cuda", device="cuda").keys)
