"""Budget mode over the wire: a real loopback server chooses within the budget, reports its
choice in the summary and in Prometheus, and refuses an unreachable budget on the header."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from kvpack import codec
from kvpack.v1 import kvpack_pb2_grpc as pb_grpc
from tests.server.server_support import compress, compress_requests, fetch, header, make_cache


async def test_budget_mode_stays_within_and_reports(start_server: Any, channels: Any) -> None:
    server = await start_server(workers=2)
    stub = pb_grpc.KVPackStub(channels(server.address))
    scores, keys, values = make_cache(layers=3, n=256, d=32)
    h = header(keys, 8, ratio=None, store=True, key="b/1", target_ratio=12.0)
    out = await compress(stub, compress_requests(h, scores, keys, values), timeout=60)
    assert out.summary is not None
    choice = out.summary.budget
    fp16 = 2 * 3 * (1 * 2 * 256 * 32) * 2
    assert choice.fp16_bytes == fp16 and choice.budget_bytes == int(fp16 / 12.0)
    assert out.summary.stored_bytes == choice.stored_bytes <= choice.budget_bytes
    assert 0 < choice.token_ratio < 1 and choice.encodes >= 1
    blob = await fetch(stub, "b/1", timeout=30)
    assert len(blob) == choice.stored_bytes
    decoded = codec.decode(blob)
    assert decoded.header.settings.k_error_bound == choice.k_error_bound
    for layer, summary in enumerate(out.summary.layers):
        assert decoded.keys[layer].shape[2] == summary.kept_tokens
    get = server.metrics.registry.get_sample_value
    assert get("kvpack_budget_token_ratio_count", {"policy": "kvcompose"}) == 1
    assert get("kvpack_budget_error_bound_count", {"tensor": "value"}) == 1
    assert get("kvpack_budget_fill_ratio_count") == 1
    assert get("kvpack_budget_bytes_total") == choice.budget_bytes
    assert get("kvpack_budget_stored_bytes_total") == choice.stored_bytes
    assert get("kvpack_stage_duration_seconds_count", {"stage": "plan"}) == 1


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"target_bytes": 100}, "smallest container any setting reaches"),
        ({"target_ratio": 8.0, "ratio": 0.5}, "ratio and n_keep cannot be combined"),
        ({"max_ratio": 0.5, "ratio": 0.5}, "max_ratio is a quality floor"),
    ],
)
async def test_budget_errors_are_invalid_argument(
    start_server: Any, channels: Any, fields: dict[str, Any], words: str
) -> None:
    server = await start_server()
    stub = pb_grpc.KVPackStub(channels(server.address))
    scores, keys, values = make_cache(layers=2, n=64, d=32)
    ratio = fields.pop("ratio", None)
    h = header(keys, 8, ratio=ratio, store=True, **fields)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await compress(stub, compress_requests(h, scores, keys, values), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in (err.value.details() or "")
