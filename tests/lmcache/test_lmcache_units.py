"""The LMCache plugins' LMCache-free parts in kvpack's own environment: key mapping, options,
chunk layouts, the chunk container, the serde size bound and the rate-limited log.

The plugins end to end, inside LMCache, are in test_lmcache_plugin.py."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from kvpack.bench.lossy import synthetic_kv
from kvpack.client import TLS
from kvpack.client.lmcache import chunk_codec, keys, layout, settings, sizing
from kvpack.client.lmcache.ratelimit import RateLimitedLog
from kvpack.codec import FormatError, QuantSettings
from kvpack.codec import encode as encode_container
from tests.codec.test_quant import check_bound

KEY_RE = re.compile(r"[A-Za-z0-9._:/-]{1,200}")
LMCACHE_KEYS = [
    "meta-llama/Llama-3.1-8B-Instruct@1@0@5f3a9c@bfloat16",
    "Qwen/Qwen3-0.6B@8@7@-1a2b@half",
    "m@1@0@ff@float16@cache_salt%user:42@lora%a/b c",
    "模型@1@0@0@bfloat16",
    "a@b",
]


def check_layer(
    k: torch.Tensor, k2: torch.Tensor, v: torch.Tensor, v2: torch.Tensor, s: QuantSettings
) -> None:
    """kvpack's error bound on one layer's K and V (an MLA layer's V is empty)."""
    check_bound(k, k2, "k", s)
    if v.numel():
        check_bound(v, v2, "v", s)
    else:
        assert v2.shape == v.shape


# -- keys ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("lm_key", LMCACHE_KEYS)
@pytest.mark.parametrize("prefix", ["", "lmcache/", "team-a/prod/"])
def test_keys_are_valid_and_reversible(lm_key: str, prefix: str) -> None:
    kv = keys.kvpack_key(lm_key, prefix)
    assert KEY_RE.fullmatch(kv) and kv.startswith(prefix)
    assert keys.lmcache_key(kv, prefix) == lm_key


def test_keys_of_one_model_share_a_prefix() -> None:
    a = keys.kvpack_key("org/model@1@0@aa@half", "p/")
    b = keys.kvpack_key("org/model@1@0@bb@half", "p/")
    assert a == "p/org:2fmodel/1/0/aa/half"
    assert a.rsplit("/", 2)[0] == b.rsplit("/", 2)[0] == "p/org:2fmodel/1/0"


def test_long_keys_are_hashed_and_not_reversible() -> None:
    lm_key = "x" * 150 + "/" * 30 + "@1@0@ab@half"
    kv = keys.kvpack_key(lm_key, "lmcache/")
    assert KEY_RE.fullmatch(kv) and kv.startswith("lmcache/:h/") and len(kv) <= 200
    assert keys.kvpack_key(lm_key, "lmcache/") == kv  # deterministic across processes
    assert keys.lmcache_key(kv, "lmcache/") is None
    assert keys.lmcache_key("other/x", "lmcache/") is None


def test_key_prefix_is_checked() -> None:
    with pytest.raises(ValueError, match="key_prefix"):
        keys.check_prefix("a:b")


# -- settings -----------------------------------------------------------------------------------


def _extra(**options: object) -> dict[str, object]:
    base = {
        "remote_storage_plugin.kvpack.module_path": "kvpack.client.lmcache.connector",
        "remote_storage_plugin.kvpack.class_name": "KVPackConnector",
        "remote_storage_plugin.kvpack.target": "127.0.0.1:50051",
        "unrelated_option": True,
    }
    return {**base, **{f"remote_storage_plugin.kvpack.{k}": v for k, v in options.items()}}


def test_settings_defaults_keep_no_window() -> None:
    s = settings.parse(settings.plugin_options(_extra(), "kvpack"))
    assert s.target == "127.0.0.1:50051" and s.token is None and s.tls is None
    assert s.quant == QuantSettings(k_window=0, v_window=0)
    assert s.key_prefix == "lmcache/" and s.head_dim is None


def test_settings_parse_strings_tls_and_token_file(tmp_path: object) -> None:
    from pathlib import Path

    token = Path(str(tmp_path)) / "token"
    token.write_text("s3cret\n")
    options = _extra(
        token_file=str(token),
        tls_root_ca="/etc/ca.pem",
        tls_server_name="kvpack",
        **{"quant.mode": "fixed", "quant.k_error_bound": "0.02", "quant.block_tokens": 32},
        timeout="2.5",
        workers=4,
    )
    s = settings.parse(settings.plugin_options(options, "kvpack"))
    assert s.token == "s3cret"
    assert s.tls == TLS(root_ca="/etc/ca.pem", server_name="kvpack")
    assert (s.quant.mode, s.quant.k_error_bound, s.quant.block_tokens) == ("fixed", 0.02, 32)
    assert (s.timeout, s.workers) == (2.5, 4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"targt": "x"}, r"unknown option 'remote_storage_plugin\.kvpack\.targt'"),
        ({"target": ""}, r"remote_storage_plugin\.kvpack\.target is required"),
        ({"quant.mode": "zip"}, r"quant\)?.*mode must be one of"),
        ({"quant.k_error_bound": 2.0}, r"k_error_bound"),
        ({"workers": 0}, r"remote_storage_plugin\.kvpack\.workers must be \[1, 64\]"),
        ({"retries": "many"}, r"must be an integer"),
        ({"token": "a", "token_file": "/x"}, r"not both"),
    ],
)
def test_settings_errors_name_the_option(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        settings.parse(settings.plugin_options(_extra(**options), "kvpack"))


# -- layout -------------------------------------------------------------------------------------

# (format, tensor shape, head_dim) with T=5 tokens, 3 layers, 2 heads of 4 (MLA: latent 6).
LAYOUTS = [
    ("KV_2LTD", (2, 3, 5, 8), 4),
    ("KV_T2D", (5, 2, 8), 4),
    ("KV_2TD", (2, 5, 8), 4),
    ("KV_MLA_FMT", (1, 3, 5, 6), None),
]


@pytest.mark.parametrize(("fmt", "shape", "head_dim"), LAYOUTS)
def test_layout_views_alias_the_chunk(fmt: str, shape: tuple[int, ...], head_dim: int) -> None:
    chunk = torch.zeros(shape, dtype=torch.bfloat16)
    views = layout.layers(chunk, fmt, head_dim)
    assert len(views) == layout.num_layers(shape, fmt)
    for i, (k, v) in enumerate(views):
        assert k.shape[:3] == v.shape[:3] and k.shape[0] == 1
        assert k.shape[2] == layout.num_tokens(shape, fmt) == 5
        # Views, not copies: writing through them changes the chunk.
        assert k.untyped_storage().data_ptr() == chunk.untyped_storage().data_ptr()
        k.fill_(i + 1)
        v.fill_(-(i + 1))
    expected_sum = sum(
        (i + 1) * (views[i][0].numel() - views[i][1].numel()) for i in range(len(views))
    )
    assert float(chunk.float().sum()) == expected_sum
    if fmt == "KV_2LTD":  # token t, head h, channel c of layer l is chunk[0, l, t, h*d + c]
        chunk.copy_(torch.arange(chunk.numel()).reshape(shape).to(chunk.dtype))
        k = layout.layers(chunk, fmt, head_dim)[1][0]
        assert torch.equal(k[0, 1, 3], chunk[0, 1, 3, 4:8])


def test_layout_rejects_what_it_cannot_encode() -> None:
    with pytest.raises(ValueError, match="remote_serde: naive"):
        layout.layers(torch.zeros(16, dtype=torch.uint8), "BINARY_BUFFER", None)
    with pytest.raises(ValueError, match="KV_2LTD tensor must be 4-D with 2 at dim 0"):
        layout.layers(torch.zeros(3, 2, 5, 8), "KV_2LTD", 4)


def test_heads_fall_back_to_one_head() -> None:
    assert layout.heads(1024, 128) == (8, 128)
    assert layout.heads(1000, 128) == (1, 1000)
    assert layout.heads(64, None) == (1, 64)


# -- chunk container ----------------------------------------------------------------------------


def _chunk(
    fmt: str, shape: tuple[int, ...], head_dim: int | None, dtype: torch.dtype
) -> torch.Tensor:
    chunk = torch.zeros(shape, dtype=dtype)
    views = layout.layers(chunk, fmt, head_dim)
    _, h, t, d = views[0][0].shape
    ks, vs = synthetic_kv(len(views), h, d, t, dtype, seed=3)
    for (kd, vd), k, v in zip(views, ks, vs, strict=True):
        kd.copy_(k)
        vd.copy_(v[..., : vd.shape[-1]])
    return chunk


CHUNKS = [
    ("KV_2LTD", (2, 3, 256, 128), 64),
    ("KV_2LTD", (2, 2, 100, 64), 32),  # a partial chunk: 100 of 256 tokens
    ("KV_T2D", (256, 2, 64), 32),
    ("KV_2TD", (2, 130, 64), 64),
    ("KV_MLA_FMT", (1, 2, 256, 96), None),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("fmt", "shape", "head_dim"), CHUNKS)
@pytest.mark.parametrize("mode", ["lossy", "fixed", "lossless"])
def test_chunk_round_trip_within_bound(
    fmt: str, shape: tuple[int, ...], head_dim: int | None, dtype: torch.dtype, mode: str
) -> None:
    s = QuantSettings(mode=mode, k_window=0, v_window=0)
    chunk = _chunk(fmt, shape, head_dim, dtype)
    blob = chunk_codec.encode_chunk([chunk], fmt, head_dim, s, key="m@1@0@ab@half")
    assert len(blob) <= sizing.max_chunk_bytes([shape], fmt, dtype, head_dim, s)
    info = chunk_codec.read_layout(blob)
    assert (info.fmt, info.shapes, info.dtype) == (fmt, (shape,), dtype)
    out = torch.full_like(chunk, float("nan"))
    chunk_codec.decode_into(blob, [out], info)
    s = chunk_codec.chunk_settings(s, layout.num_tokens(shape, fmt))  # what the chunk used
    for (k, v), (k2, v2) in zip(
        layout.layers(chunk, fmt, head_dim), layout.layers(out, fmt, info.head_dims[0]), strict=True
    ):
        if mode == "lossless":
            assert torch.equal(k, k2) and torch.equal(v, v2)
        else:
            check_layer(k, k2, v, v2, s)


@pytest.mark.parametrize(
    ("tokens", "block"),
    [(256, 64), (100, 50), (77, 77), (130, 65), (20, 20), (31, 31), (257, 64), (300, 60)],
)
def test_block_tokens_fit_partial_chunks(tokens: int, block: int) -> None:
    s = QuantSettings(k_window=0, v_window=0)
    assert chunk_codec.chunk_settings(s, tokens).block_tokens == block
    windowed = QuantSettings(k_window=16, v_window=0)
    assert chunk_codec.chunk_settings(windowed, tokens) == windowed


def test_partial_chunk_compresses_like_a_full_one() -> None:
    """No token of a 100-token chunk stays in full precision: its ratio is a full chunk's."""
    s = QuantSettings(k_window=0, v_window=0)
    ratios = []
    for tokens in (256, 100):
        chunk = _chunk("KV_2LTD", (2, 2, tokens, 128), 64, torch.float16)
        ratios.append(chunk.nbytes / len(chunk_codec.encode_chunk([chunk], "KV_2LTD", 64, s)))
    assert ratios[1] > 0.85 * ratios[0], ratios


def test_chunk_with_two_layer_groups() -> None:
    s = QuantSettings(k_window=0, v_window=0)
    a = _chunk("KV_2LTD", (2, 2, 64, 64), 32, torch.bfloat16)
    b = _chunk("KV_2LTD", (2, 3, 64, 32), 32, torch.bfloat16)
    blob = chunk_codec.encode_chunk([a, b], "KV_2LTD", 32, s)
    info = chunk_codec.read_layout(blob)
    assert info.shapes == ((2, 2, 64, 64), (2, 3, 64, 32))
    out = [torch.zeros_like(a), torch.zeros_like(b)]
    chunk_codec.decode_into(blob, out, info)
    for src, dst in zip((a, b), out, strict=True):
        for (k, v), (k2, v2) in zip(
            layout.layers(src, "KV_2LTD", 32), layout.layers(dst, "KV_2LTD", 32), strict=True
        ):
            check_layer(k, k2, v, v2, s)


def test_chunk_errors_are_format_errors() -> None:
    s = QuantSettings(k_window=0, v_window=0)
    chunk = _chunk("KV_2LTD", (2, 2, 64, 64), 32, torch.float16)
    blob = chunk_codec.encode_chunk([chunk], "KV_2LTD", 32, s)
    info = chunk_codec.read_layout(blob)
    with pytest.raises(FormatError, match="destination shapes"):
        chunk_codec.decode_into(blob, [torch.zeros(2, 2, 32, 64, dtype=torch.float16)], info)
    damaged = bytearray(blob)
    damaged[-100] ^= 0xFF
    with pytest.raises(FormatError):
        chunk_codec.decode_into(bytes(damaged), [torch.zeros_like(chunk)], info)
    k = torch.zeros(1, 2, 8, 4)
    foreign = encode_container([k], [k], settings=s)  # a kvpack container, not a chunk
    with pytest.raises(FormatError, match="not an LMCache chunk container"):
        chunk_codec.read_layout(foreign)
    with pytest.raises(ValueError, match="share one of fp16/bf16/fp32"):
        chunk_codec.encode_chunk([chunk, chunk.float()], "KV_2LTD", 32, s)


# -- sizing -------------------------------------------------------------------------------------


def _adversarial(shape: tuple[int, ...], dtype: torch.dtype, kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    if kind == "uniform":  # every quantisation level equally likely: entropy coding gains nothing
        return (torch.rand(shape, generator=gen) * 200 - 100).to(dtype)
    if kind == "spikes":  # one huge value per group, the rest tiny
        x = torch.randn(shape, generator=gen) * 1e-3
        x.view(-1)[::61] = 500.0
        return x.to(dtype)
    return torch.full(shape, 1.25, dtype=dtype)  # constant groups: no symbols at all


@pytest.mark.parametrize("kind", ["uniform", "spikes", "constant"])
@pytest.mark.parametrize(
    "quant",
    [
        {},
        {"entropy": "huffman"},
        {"entropy": "zstd"},
        {"mode": "fixed"},
        {"mode": "lossless"},
        {"k_error_bound": 0.001, "v_error_bound": 0.002},  # > 256 levels: 16-bit symbols
        {"k_grouping": "block", "block_tokens": 16},
        {"k_window": 40, "v_window": 7},
    ],
)
def test_size_bound_holds_for_adversarial_chunks(kind: str, quant: dict[str, object]) -> None:
    s = QuantSettings(**{"k_window": 0, "v_window": 0, **quant})  # type: ignore[arg-type]
    for fmt, shape, head_dim in [
        ("KV_2LTD", (2, 2, 200, 128), 64),
        ("KV_MLA_FMT", (1, 2, 70, 96), None),
    ]:
        chunk = _adversarial(shape, torch.bfloat16, kind)
        blob = chunk_codec.encode_chunk([chunk], fmt, head_dim, s, key="k" * 4096)
        bound = sizing.max_chunk_bytes([shape], fmt, torch.bfloat16, head_dim, s)
        assert len(blob) <= bound, (fmt, len(blob), bound)


def test_size_bound_is_tight_for_fixed_mode() -> None:
    """The fixed-width bound is the real size up to its group metadata and container overhead:
    LMCache allocates it. The bound counts 8 bytes per group (format v2's worst case, its fp32
    fallback); typical v2 metadata takes 4, so the bound is up to ~10 % above the real size."""
    s = QuantSettings(mode="fixed", k_window=0, v_window=0)
    shape = (2, 4, 256, 1024)
    chunk = _chunk("KV_2LTD", shape, 128, torch.bfloat16)
    size = len(chunk_codec.encode_chunk([chunk], "KV_2LTD", 128, s))
    bound = sizing.max_chunk_bytes([shape], "KV_2LTD", torch.bfloat16, 128, s, meta_chars=0)
    assert size <= bound <= size * 1.10 + (40 << 10), (size, bound)


# -- rate-limited log ---------------------------------------------------------------------------


def test_rate_limited_log(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    log = RateLimitedLog(logging.getLogger("kvpack.test.ratelimit"), 30.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="kvpack.test.ratelimit"):
        assert log.warning("down", "kvpack get of %s failed", "a")
        assert not log.warning("down", "kvpack get of %s failed", "b")
        assert log.warning("damaged", "damaged %s", "c")  # another kind is not held back
        now[0] = 31.0
        assert log.warning("down", "kvpack get of %s failed", "d")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "kvpack get of a failed",
        "damaged c",
        "kvpack get of d failed (1 more like this in the last 30 s)",
    ]
