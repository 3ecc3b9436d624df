"""Issue #20: every policy / quantisation setting and header field is bounded by the layout and
checked on the CompressHeader, before any tensor is received or any codec work is queued.

A setting out of range (a kernel wider than the sequence, a huge integer, NaN, a floor above the
budget, a 5000-character model, ...) answers INVALID_ARGUMENT naming the setting, its value and
the allowed range, never INTERNAL, and never after the codec pool has worked on it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import torch
from grpc import aio
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvpack import codec, errors
from kvpack.client import LocalKVPack
from kvpack.codec.policies.baselines import PyramidKVSettings, RandomSettings, SnapKVSettings
from kvpack.codec.policies.kvcompose import KVComposeSettings
from kvpack.errors import InvalidArgument
from kvpack.server.app import KVPackServer
from kvpack.server.compress import plan
from kvpack.v1 import kvpack_pb2 as pb
from kvpack.v1 import kvpack_pb2_grpc as pb_grpc
from tests.server.conftest import make_config
from tests.server.server_support import aiter_of, compress_requests, header, make_cache

INV = grpc.StatusCode.INVALID_ARGUMENT
Req = pb.CompressRequest

# A valid small cache: 2 layers, B=1, Hkv=2, Hq=4, n=32, d=16, fp16. ratio 0.5 keeps 32 token
# slots, 16 per layer on average.
L, HKV, HQ, N, D = 2, 2, 4, 32, 16
SCORES, KEYS, VALUES = make_cache(layers=L, hkv=HKV, hq=HQ, n=N, d=D, dtype=torch.float16)


def hdr(policy: str = "kvcompose", **fields: Any) -> pb.CompressHeader:
    """A valid header (ratio 0.5, store under bounded/x) with ``fields`` set."""
    h = header(KEYS, HQ, policy=policy, store=True, key="bounded/x")
    for name, value in fields.items():
        if name == "policy_settings":
            h.policy_settings.update(value)
        elif name == "quant":
            for q, v in value.items():
                setattr(h.quant, q, v)
        elif name == "token_ids":
            h.token_ids.extend(value)
        else:
            setattr(h, name, value)
    return h


async def status_of(stub: Any, requests: Iterator[Req] | AsyncIterator[Req]) -> tuple[Any, str]:
    """(status code, details) of one Compress call; OK when it succeeds."""
    stream = requests if isinstance(requests, AsyncIterator) else aiter_of(requests)
    try:
        async for _ in stub.Compress(stream, timeout=20):
            pass
    except aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def encode_count(server: KVPackServer, stage: str = "encode") -> float:
    """How many layers went through ``stage`` (kvpack_stage_duration_seconds_count)."""
    value = server.metrics.registry.get_sample_value(
        "kvpack_stage_duration_seconds_count", {"stage": stage}
    )
    return value or 0.0


@pytest.fixture
async def served(start_server: Any, channels: Any) -> tuple[KVPackServer, Any]:
    server = await start_server()
    return server, pb_grpc.KVPackStub(channels(server.address))


# -- item 1/2: policy settings bounded by the layout, refused on the header ----------------------

HEADER_CASES = [
    # (policy, setting, value, what the allowed range must say)
    ("snapkv", "kernel_size", "1000000000001", "[1, 31]"),
    ("pyramidkv", "kernel_size", "1000000000001", "[1, 31]"),
    ("snapkv", "kernel_size", "33", "[1, 31]"),
    ("snapkv", "window_size", "33", "[0, 16]"),
    ("pyramidkv", "window_size", "17", "[0, 16]"),
    ("streaming", "n_sink", "33", "[0, 32]"),
    ("streaming", "n_sink", "99999999999999999999", "[0, 32]"),
    ("kvcompose", "keep_token_lower_bound", "17", "[0, 16]"),
    ("kvcompose_uniform", "keep_token_lower_bound", "99999999999999999999", "[0, 16]"),
    ("random", "seed", "-1", "[0, 18446744073709551615]"),
    ("random", "seed", "18446744073709551616", "[0, 18446744073709551615]"),
    ("pyramidkv", "beta", "nan", "[1"),
    ("pyramidkv", "beta", "inf", "[1"),
    ("pyramidkv", "beta", "1e400", "[1"),
]


@pytest.mark.parametrize(("policy", "name", "value", "allowed"), HEADER_CASES)
async def test_out_of_range_setting_is_refused_on_the_header(
    served: tuple[KVPackServer, Any], policy: str, name: str, value: str, allowed: str
) -> None:
    """Only the header is sent: the status can come from nothing but the header's validation."""
    _server, stub = served
    h = hdr(policy, policy_settings={name: value})
    code, details = await status_of(stub, iter([Req(header=h)]))
    assert code == INV, details
    assert f"'{name}'" in details and allowed in details, details
    assert value in details or math.isnan(float(value)) or "inf" in details, details


async def test_huge_kernel_is_refused_while_the_client_still_uploads(
    served: tuple[KVPackServer, Any],
) -> None:
    """The client sends the header and then waits: the refusal arrives before layer 0 is sent."""
    server, stub = served
    sent: list[str] = []
    hold = asyncio.Event()  # never set: the client sends nothing after the header

    async def requests() -> AsyncIterator[Req]:
        sent.append("header")
        yield Req(header=hdr("snapkv", policy_settings={"kernel_size": "1000000000001"}))
        await hold.wait()

    code, details = await status_of(stub, requests())
    assert code == INV and "'kernel_size'" in details, details
    assert sent == ["header"]
    assert encode_count(server, "select") == 0


async def test_wide_kernel_with_a_full_upload_does_no_codec_work(
    served: tuple[KVPackServer, Any],
) -> None:
    server, stub = served
    h = hdr("snapkv", policy_settings={"kernel_size": "4097"})
    code, details = await status_of(stub, compress_requests(h, SCORES, KEYS, VALUES))
    assert code == INV and "'kernel_size'" in details, details
    assert encode_count(server, "select") == 0 and encode_count(server) == 0


@pytest.mark.parametrize(
    ("policy", "name"), [("kvcompose", "keep_token_lower_bound"), ("streaming", "n_sink")]
)
async def test_huge_integer_setting_answers_invalid_argument_not_internal(
    served: tuple[KVPackServer, Any], policy: str, name: str
) -> None:
    """A full, otherwise valid upload: the huge integer used to surface as INTERNAL
    (OverflowError in the policy) after the upload."""
    server, stub = served
    h = hdr(policy, policy_settings={name: "99999999999999999999"})
    code, details = await status_of(stub, compress_requests(h, SCORES, KEYS, VALUES))
    assert code == INV and f"'{name}'" in details, details
    assert encode_count(server) == 0
    # The server is fine: the same request with a sane value is stored.
    ok = hdr(policy, policy_settings={name: "2"})
    code, details = await status_of(stub, compress_requests(ok, SCORES, KEYS, VALUES))
    assert code == grpc.StatusCode.OK, details


# -- quantisation settings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quant", "name", "allowed"),
    [
        ({"k_window": 1000}, "k_window", "[0, 32]"),
        ({"v_window": 1000}, "v_window", "[0, 32]"),
        ({"block_tokens": 1000}, "block_tokens", "[1, 64]"),
    ],
)
async def test_quant_setting_beyond_the_sequence_is_refused_on_the_header(
    served: tuple[KVPackServer, Any], quant: dict[str, int], name: str, allowed: str
) -> None:
    _server, stub = served
    code, details = await status_of(stub, iter([Req(header=hdr(quant=quant))]))
    assert code == INV and f"'{name}'" in details and allowed in details, details


async def test_block_count_over_the_container_header_is_refused_on_the_header(
    served: tuple[KVPackServer, Any],
) -> None:
    """64 layers x 4096 tokens in 1-token blocks: about half a million block records, more than
    a container header holds (it used to fail as INTERNAL after every layer was encoded)."""
    _server, stub = served
    h = hdr(quant={"block_tokens": 1, "k_window": 0, "v_window": 0})
    h.layout.num_layers, h.layout.seq_len, h.layout.num_kv_heads = 64, 4096, 1
    h.layout.num_query_heads, h.layout.head_dim = 1, 1
    code, details = await status_of(stub, iter([Req(header=h)]))
    assert code == INV and "'block_tokens'" in details and "blocks" in details, details
    # The same layout without storing encodes nothing: block_tokens does not matter then.
    h.store, h.key = False, ""
    code, details = await status_of(stub, iter([Req(header=h)]))
    assert code == INV and "block_tokens" not in details, details


# -- item 3: header strings and lists ------------------------------------------------------------


async def test_long_model_is_refused_before_any_layer_is_encoded(
    served: tuple[KVPackServer, Any],
) -> None:
    """8 layers uploaded with a 5000-character model: INVALID_ARGUMENT, nothing encoded. It used
    to be INTERNAL once every layer was encoded (the container meta holds 4096 characters)."""
    server, stub = served
    scores, keys, values = make_cache(layers=8, hkv=HKV, hq=HQ, n=N, d=D, dtype=torch.float16)
    h = header(keys, HQ, store=True, key="bounded/model", model="m" * 5000)
    code, details = await status_of(stub, compress_requests(h, scores, keys, values))
    assert code == INV and "model" in details and "4096" in details, details
    assert encode_count(server) == 0
    assert (await server.store.usage()).entries == 0
    # The longest model the container meta holds, and one token id per cached token, are fine.
    h = header(keys, HQ, store=True, model="é" * 4096, token_ids=list(range(N)))
    code, details = await status_of(stub, compress_requests(h, scores, keys, values))
    assert code == grpc.StatusCode.OK, details
    assert (await server.store.usage()).entries == 1


@pytest.mark.parametrize(
    ("fields", "word"),
    [
        ({"model": "m" * 4097}, "model"),
        ({"model": "llama\n@main"}, "model"),
        ({"model": "llama\x00"}, "model"),
        ({"key": "", "model": "llama@main", "token_ids": list(range(N + 1))}, "token_ids"),
    ],
)
async def test_bad_header_strings_are_refused_on_the_header(
    served: tuple[KVPackServer, Any], fields: dict[str, Any], word: str
) -> None:
    _server, stub = served
    code, details = await status_of(stub, iter([Req(header=hdr(**fields))]))
    assert code == INV and word in details, details


# -- plan() directly: any string for any setting is a plan or InvalidArgument --------------------


@pytest.fixture(scope="module")
def servicer() -> Iterator[Any]:
    """A real (not started) server's servicer: plan() reads only its config."""
    server = KVPackServer(make_config())
    yield server.servicer
    server.executor.shutdown()


SETTINGS = [
    (policy, name)
    for policy, cls in sorted(codec.POLICIES.items())
    for name in cls.settings_type.__dataclass_fields__
]
NUMBERS = ["nan", "NaN", "inf", "-inf", "1e400", "-0", "0x10", "1_000", " 7 ", "", "true", "3.0"]
ANY_STRING = st.one_of(
    st.text(max_size=40),
    st.sampled_from(NUMBERS),
    st.integers(-(2**80), 2**80).map(str),
    st.integers(2**62, 2**80).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)


TOKENS = st.one_of(st.integers(0, 300), st.integers(0, 2**32 - 1))  # uint32 on the wire
BOUNDS = st.one_of(st.floats(2**-12, 1), st.floats(allow_nan=True, allow_infinity=True))
QUANT_NUMBERS = st.one_of(
    st.just({}),
    st.fixed_dictionaries(
        {},
        optional={
            "block_tokens": TOKENS,
            "k_window": TOKENS,
            "v_window": TOKENS,
            "k_error_bound": BOUNDS,
            "v_error_bound": BOUNDS,
        },
    ),
)


@settings(max_examples=500, deadline=None)
@given(setting=st.sampled_from(SETTINGS), value=ANY_STRING, quant=QUANT_NUMBERS)
# Values that were an OverflowError / ValueError in the policy after plan() accepted them.
@example(setting=("streaming", "n_sink"), value=str(2**64), quant={})
@example(setting=("kvcompose", "keep_token_lower_bound"), value="9" * 20, quant={})
@example(setting=("random", "seed"), value=str(2**64), quant={})
@example(setting=("pyramidkv", "beta"), value="nan", quant={})
def test_any_setting_is_a_working_plan_or_invalid_argument(
    servicer: Any, setting: tuple[str, str], value: str, quant: dict[str, float]
) -> None:
    """Any string for any policy setting, any numbers in the quantisation settings: plan() gives
    InvalidArgument naming a setting, or a plan whose selection and encoding then work."""
    policy, name = setting
    h = hdr(policy, policy_settings={name: value}, quant=quant)
    try:
        p = plan(h, servicer.config)
    except InvalidArgument as e:
        assert any(n in e.message for n in (name, *quant)), e.message
        return
    # Accepted: the work the server then does succeeds (no OverflowError, no endless pooling).
    kept = codec.select(
        SCORES, policy=policy, num_kv_heads=HKV, keys=KEYS, values=VALUES, ratio=0.5, **p.settings
    )
    assert len(kept) == L
    (ck, *_), (cv, *_) = codec.gather(KEYS, VALUES, kept)
    assert codec.encode_layer(ck, cv, kept[0], p.quant).nbytes > 0


# -- the codec's own bounds and LocalKVPack ------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "mapping", "word"),
    [
        (SnapKVSettings, {"kernel_size": "1000000000001"}, "kernel_size"),
        (KVComposeSettings, {"keep_token_lower_bound": "99999999999999999999"}, "keep_token"),
        (PyramidKVSettings, {"beta": "nan"}, "beta"),
        (RandomSettings, {"seed": str(2**64)}, "seed"),
    ],
)
def test_codec_settings_have_a_bound_without_a_layout(
    cls: Any, mapping: dict[str, str], word: str
) -> None:
    """codec.select callers get the same refusal (no layout known: the codec's largest)."""
    with pytest.raises(ValueError, match=word):
        cls.from_mapping(mapping)


@pytest.mark.parametrize(
    ("policy", "settings_", "word"),
    [
        ("kvcompose", {"keep_token_lower_bound": 10**20}, "keep_token_lower_bound"),
        ("snapkv", {"window_size": N + 1}, "window_size"),
        ("streaming", {"n_sink": N + 1}, "n_sink"),
    ],
)
def test_local_kvpack_applies_the_same_bounds(
    policy: str, settings_: dict[str, object], word: str
) -> None:
    with LocalKVPack() as local, pytest.raises(errors.InvalidArgument, match=word):
        local.compress(
            KEYS, VALUES, scores=SCORES, policy=policy, ratio=0.5, policy_settings=settings_
        )


def test_local_kvpack_checks_quant_against_the_layout() -> None:
    with LocalKVPack() as local, pytest.raises(errors.InvalidArgument, match="k_window"):
        local.compress(KEYS, VALUES, scores=SCORES, ratio=0.5, quant={"k_window": 1000})
