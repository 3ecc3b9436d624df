"""The engine on its own: allocation, per-layer shares, content keys, request checks, the
settings schema (QuantSettings <-> proto, option names)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from kvpack import codec
from kvpack.client import KVPackClient, LayerStats, LocalKVPack
from kvpack.codec.quant_settings import QuantSettings
from kvpack.engine import Allocation, CompressRequest, Layout, compress_cache, compress_header
from kvpack.engine.schema import QUANT_FIELDS, quant_from_message, quant_message, quant_settings
from kvpack.errors import InvalidArgument
from kvpack.v1 import kvpack_pb2 as pb

L, B, HKV, HQ, N, D, W = 4, 2, 2, 4, 37, 16, 6
_g = torch.Generator().manual_seed(5)
SCORES = torch.rand(L, B, HQ, N, generator=_g).softmax(-1)
QUERIES = torch.randn(L, B, HQ, W, D, generator=_g)
KEYS = [torch.randn(B, HKV, N, D, generator=_g) for _ in range(L)]
VALUES = [torch.randn(B, HKV, N, D, generator=_g) for _ in range(L)]
LAYOUT = Layout(L, B, HKV, HQ, D, N, torch.float32)


def request(**options: Any) -> CompressRequest:
    return CompressRequest.from_options(LAYOUT, {"store": False, **options})


def kept(req: CompressRequest, stats: tuple[Any, torch.Tensor] | None) -> list[torch.Tensor]:
    return [r.indices for r in compress_cache(req, KEYS, VALUES, stats).results]


@pytest.mark.parametrize("policy", ["snapkv", "pyramidkv", "tova", "kvcompose_uniform"])
@pytest.mark.parametrize("budget", [{"ratio": 0.55}, {"n_keep": 45}])
def test_window_queries_per_layer_keep_what_one_global_selection_keeps(
    policy: str, budget: dict[str, Any]
) -> None:
    """Layer by layer (window queries need each layer's keys), a policy whose per-layer budgets
    need no statistics keeps exactly what one selection over every layer's scores keeps,
    PyramidKV's pyramid and an uneven split of the budget included."""
    req = request(policy=policy, **budget)
    assert req.allocation("window_queries") is Allocation.PER_LAYER
    scores = torch.stack(
        [codec.scores_from_window(q, k) for q, k in zip(QUERIES, KEYS, strict=True)]
    )
    want = codec.select(scores, policy=policy, num_kv_heads=HKV, **budget)
    got = kept(req, ("window_queries", QUERIES))
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("policy", ["knorm", "streaming", "random"])
def test_policies_without_scores_keep_what_select_keeps(policy: str) -> None:
    """knorm per layer (it reads keys), streaming and random once from the layout: both equal
    one codec.select over the whole cache (random draws different positions per layer)."""
    req = request(policy=policy, ratio=0.55)
    expected = Allocation.PER_LAYER if policy == "knorm" else Allocation.GLOBAL
    assert req.allocation(None) is expected
    want = codec.select(None, 0.55, policy, keys=KEYS, values=VALUES)
    got = kept(req, None)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    if policy == "random":
        assert not torch.equal(got[0], got[1])


def test_kvcompose_allocates_globally_from_scores_and_per_layer_from_window_queries() -> None:
    req = request(ratio=0.5, policy="kvcompose")
    assert req.allocation("scores") is Allocation.GLOBAL
    want = codec.select(SCORES, 0.5, "kvcompose", num_kv_heads=HKV)
    assert all(torch.equal(a, b) for a, b in zip(kept(req, ("scores", SCORES)), want, strict=True))
    # Per layer: each layer keeps its uniform share of the global budget.
    shares = codec.budgets.uniform_split(int(L * N * 0.5), L)
    for layer, idx in enumerate(kept(req, ("window_queries", QUERIES))):
        assert idx.shape[-1] == shares[layer]
    with_norm = request(ratio=0.5, policy="kvcompose", policy_settings={"add_v_norm": True})
    assert with_norm.allocation("scores") is Allocation.PER_LAYER
    with pytest.raises(InvalidArgument, match="needs attention statistics"):
        req.allocation(None)


def content_key(stats: tuple[Any, torch.Tensor] | None = ("scores", SCORES), **options: Any) -> str:
    args = {"policy": "kvcompose", "model": "m@1", "token_ids": list(range(N)), "ratio": 0.5}
    args.update(options)
    req = CompressRequest.from_options(LAYOUT, {"quant": {"mode": "lossless"}, **args})
    out = compress_cache(req, KEYS, VALUES, stats)
    assert out.stored is not None
    return out.stored.key


def test_content_key_covers_every_input_that_changes_the_stored_result() -> None:
    base = content_key()
    # The same result from equivalent requests: settings spelled out at their defaults.
    assert content_key(policy_settings={"agg_group": "mean", "structured": "true"}) == base
    different = [
        content_key(("window_queries", QUERIES)),  # other statistics, same tokens
        content_key(("scores", SCORES[:, :, :HKV])),  # scores per KV head
        content_key(model="m@2"),
        content_key(token_ids=list(range(1, N + 1))),
        content_key(ratio=0.6),
        content_key(ratio=None, n_keep=74),
        content_key(policy_settings={"agg_group": "max"}),
        content_key(policy="snapkv"),
        content_key(quant={"mode": "lossless", "entropy": "zstd"}),
    ]
    assert len({base, *different}) == 1 + len(different)
    # Statistics a policy does not read do not change what it stores, nor its key.
    assert content_key(None, policy="streaming") == content_key(policy="streaming")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"policy": "none", "ratio": 0.5}, 'policy "none" takes no ratio'),
        ({"ratio": 0.5, "n_keep": 3}, "exactly one of ratio and n_keep"),
        ({}, "exactly one of ratio and n_keep"),
        ({"ratio": 1.0}, "ratio is the fraction removed"),
        ({"policy": "nope", "ratio": 0.5}, "unknown policy 'nope'"),
        ({"ratio": 0.5, "policy_settings": {"agg_task": "median"}}, "agg_task"),
        ({"ratio": 0.5, "key": "bad key!"}, "invalid key"),
        ({"ratio": 0.5, "token_ids": [1, 2]}, "token_ids given without model"),
        ({"ratio": 0.5, "quant": {"k_window": 10_000}}, "k_window"),
        ({"ratio": 0.5, "quant": {"k_error_bound": 2.0}}, "k_error_bound"),
    ],
)
def test_local_and_server_refuse_alike(
    remote: KVPackClient, options: dict[str, Any], message: str
) -> None:
    """The same refusal, type and message, from LocalKVPack and from a server."""
    errors = []
    with LocalKVPack() as local:
        for kv in (local, remote):
            with pytest.raises(InvalidArgument, match=message) as err:
                kv.compress(KEYS, VALUES, scores=SCORES, **options)
            errors.append(err.value.message)
    assert errors[0] == errors[1]


def test_misspelt_compress_argument_is_a_type_error() -> None:
    with LocalKVPack() as local, pytest.raises(TypeError, match="'ratoi'"):
        local.compress(KEYS, VALUES, scores=SCORES, ratoi=0.5)  # type: ignore[call-arg]


# -- one schema per setting -----------------------------------------------------------------


def test_quant_settings_validate_on_construction() -> None:
    for bad in ({"mode": "zip"}, {"k_error_bound": 0.0}, {"block_tokens": 0}, {"v_window": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            QuantSettings(**bad)


def test_quant_settings_map_to_and_from_the_proto_by_field() -> None:
    assert set(QUANT_FIELDS) == {f.name for f in pb.QuantSettings.DESCRIPTOR.fields}
    custom = QuantSettings(
        mode="fixed", k_error_bound=0.02, v_error_bound=0.3, k_grouping="block",
        block_tokens=16, k_window=0, v_window=7, entropy="zstd",
    )  # fmt: skip
    assert quant_from_message(quant_message(custom)) == custom
    assert quant_from_message(pb.QuantSettings()) == QuantSettings()
    # Unset fields keep the codec's defaults; zero is a value, not "unset".
    assert quant_from_message(pb.QuantSettings(k_window=0)) == QuantSettings(k_window=0)
    assert quant_settings({"k_window": "0", "entropy": "zstd", "mode": None}) == QuantSettings(
        k_window=0, entropy="zstd"
    )
    with pytest.raises(InvalidArgument, match="unknown quant settings"):
        quant_message({"k_windw": 3})
    with pytest.raises(InvalidArgument, match="block_tokens"):
        quant_from_message(pb.QuantSettings(block_tokens=0))


def test_layer_stats_are_the_summary_fields_by_name() -> None:
    """kvpack.client's LayerStats is filled from the proto's LayerSummary by field name."""
    names = {f.name for f in dataclasses.fields(LayerStats)}
    assert names == {f.name for f in pb.LayerSummary.DESCRIPTOR.fields}


def test_option_names_map_onto_the_fields() -> None:
    items = [("eb", "0.2"), ("V", "0.3"), ("kwin", "0"), ("block", "32"), ("entropy", "zstd")]
    settings, given = QuantSettings.from_options(items)
    assert given == {
        "k_error_bound": 0.2,
        "v_error_bound": 0.3,
        "k_window": 0,
        "block_tokens": 32,
        "entropy": "zstd",
    }
    assert settings == dataclasses.replace(QuantSettings(), **given)
    with pytest.raises(ValueError, match="unknown quantisation option 'kwindow'"):
        QuantSettings.from_options([("kwindow", "1")])


def test_header_and_options_make_the_same_request() -> None:
    options: Any = {
        "policy": "snapkv", "n_keep": 40, "policy_settings": {"kernel_size": 3},
        "quant": QuantSettings(k_window=0), "key": "a/b", "model": "m", "token_ids": [1, 2],
    }  # fmt: skip
    a = CompressRequest.from_header(compress_header(LAYOUT, options))
    b = CompressRequest.from_options(LAYOUT, options)
    assert a.selector is not None and b.selector is not None
    assert a.selector.settings == b.selector.settings  # policies compare by their settings
    assert dataclasses.replace(a, selector=None) == dataclasses.replace(b, selector=None)
