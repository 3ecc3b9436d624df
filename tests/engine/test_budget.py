"""Budget mode (``target_ratio`` / ``target_bytes``): the stored container never exceeds the
budget, a budget no setting reaches is refused naming the smallest size, the request's checks,
and the choice follows the damage estimate (coarse bounds before eviction)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpack import codec
from kvpack.engine import CompressRequest, Layout, compress_cache
from kvpack.engine import budget as budget_mode
from kvpack.errors import InvalidArgument

L, B, HKV, HQ, N, D = 3, 1, 2, 4, 256, 16


def cache(
    seed: int, layers: int = L, batch: int = B, hkv: int = HKV, hq: int = HQ, n: int = N,
    d: int = D, spread: float = 1.0,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randn(layers, batch, hq, n, generator=g) * 3).softmax(-1)
    keys = [(torch.randn(batch, hkv, n, d, generator=g) * spread).half() for _ in range(layers)]
    values = [torch.randn(batch, hkv, n, d, generator=g).half() for _ in range(layers)]
    return scores, keys, values


def run(
    scores: torch.Tensor | None, keys: list[torch.Tensor], values: list[torch.Tensor],
    **options: Any,
) -> Any:  # fmt: skip
    k = keys[0]
    layout = Layout(len(keys), k.shape[0], k.shape[1], scores.shape[2] if scores is not None
                    else k.shape[1], k.shape[3], k.shape[2], k.dtype)  # fmt: skip
    options.setdefault("return_cache", False)
    request = CompressRequest.from_options(layout, options)
    stats = None if scores is None else ("scores", scores)
    return compress_cache(request, keys, values, stats)


def fp16(keys: list[torch.Tensor]) -> int:
    return 2 * sum(k.numel() for k in keys) * 2


@settings(
    max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
@given(
    layers=st.integers(1, 3),
    batch=st.integers(1, 2),
    hkv=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2]),
    n=st.integers(8, 200),
    d=st.sampled_from([8, 16]),
    target=st.floats(1.5, 60.0),
    by_bytes=st.booleans(),
    seed=st.integers(0, 2**16),
    policy=st.sampled_from(["kvcompose", "kvcompose_uniform", "streaming", "none"]),
    floor=st.one_of(st.none(), st.floats(0.05, 0.95)),
)
def test_never_exceeds_the_budget(
    layers: int, batch: int, hkv: int, group: int, n: int, d: int, target: float,
    by_bytes: bool, seed: int, policy: str, floor: float | None,
) -> None:  # fmt: skip
    """Any layout, any budget, any eviction floor: either a container within the budget (and
    the floor) or InvalidArgument naming the smallest size (bytes and x smaller than fp16);
    never a larger container."""
    scores, keys, values = cache(seed, layers, batch, hkv, hkv * group, n, d)
    budget = int(fp16(keys) / target)
    ask: dict[str, Any] = {"target_bytes": budget} if by_bytes else {"target_ratio": target}
    if floor is not None:
        ask["max_ratio"] = floor
    try:
        out = run(scores if policy != "none" else None, keys, values, policy=policy, **ask)
    except InvalidArgument as e:
        assert "smallest container" in e.message and "smaller than fp16" in e.message
        return
    assert out.stored is not None
    choice = out.summary.budget
    assert len(out.stored.blob) == out.summary.stored_bytes == choice.stored_bytes
    assert choice.stored_bytes <= choice.budget_bytes <= budget + 1
    if floor is not None and batch == 1:  # one row: entries evicted = slots evicted
        assert choice.token_ratio <= floor + 1e-9
    decoded = codec.decode(out.stored.blob)
    assert len(decoded.keys) == layers
    for layer, summary in enumerate(out.summary.layers):
        assert decoded.keys[layer].shape[2] == summary.kept_tokens


def test_too_small_a_budget_is_refused_on_the_header() -> None:
    """A budget under the layout's lower bound fails before any tensor is needed, naming the
    smallest size in bytes and in x smaller than fp16."""
    layout = Layout(L, B, HKV, HQ, D, N, torch.float16)
    with pytest.raises(InvalidArgument) as e:
        CompressRequest.from_options(layout, {"target_bytes": 200})
    assert "budget of 200 bytes" in e.value.message
    assert "smallest container any setting reaches" in e.value.message
    assert "x smaller than fp16" in e.value.message


def test_a_budget_the_data_cannot_reach_names_the_smallest_reached() -> None:
    """Above the layout's lower bound but below what this cache needs at the most eviction and
    the coarsest bound: InvalidArgument after the final check, naming the smallest reached."""
    scores, keys, values = cache(3)
    layout = Layout(L, B, HKV, HQ, D, N, torch.float16)
    floor = budget_mode.lower_bound(
        (L, B, HKV, N, D), torch.float16, codec.QuantSettings(k_window=0, v_window=0),
        CompressRequest.from_options(layout, {"target_ratio": 8.0}).candidates, 1,
        {"policy": "kvcompose"},
    )  # fmt: skip
    with pytest.raises(InvalidArgument) as e:
        run(scores, keys, values, target_bytes=floor + 10)
    assert "smallest container reached for this cache" in e.value.message


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"target_ratio": 8.0, "ratio": 0.5}, "ratio and n_keep cannot be combined"),
        ({"target_bytes": 10_000, "n_keep": 100}, "ratio and n_keep cannot be combined"),
        ({"target_ratio": 8.0, "quant": {"k_error_bound": 0.1}}, "quant.k_error_bound"),
        ({"target_ratio": 8.0, "quant": {"v_error_bound": 0.1}}, "quant.v_error_bound"),
        ({"target_ratio": 8.0, "quant": codec.QuantSettings()}, "quant.k_error_bound"),
        ({"target_ratio": 8.0, "quant": {"mode": "lossless"}}, "quant.mode 'lossless'"),
        ({"target_ratio": 8.0, "store": False}, "need store"),
        ({"target_ratio": 1.0}, "target_ratio"),
        ({"target_ratio": float("nan")}, "target_ratio"),
        ({"target_bytes": 0}, "target_bytes"),
        ({"target_ratio": 8.0, "max_ratio": 1.0}, "max_ratio"),
        ({"target_ratio": 8.0, "max_error_bound": 0.0}, "max_error_bound"),
        ({"ratio": 0.5, "max_ratio": 0.5}, "max_ratio is a quality floor"),
        ({"ratio": 0.5, "max_error_bound": 0.1}, "max_error_bound is a quality floor"),
        ({"target_ratio": 8.0, "policy": "nope"}, "unknown policy"),
    ],
)
def test_request_checks_name_the_field(options: dict[str, Any], field: str) -> None:
    layout = Layout(L, B, HKV, HQ, D, N, torch.float16)
    with pytest.raises(InvalidArgument) as e:
        CompressRequest.from_options(layout, options)
    assert field in e.value.message


def test_per_layer_policies_are_refused_before_any_layer() -> None:
    _, keys, values = cache(4)
    with pytest.raises(InvalidArgument, match="selects every layer at once"):
        run(None, keys, values, policy="knorm", target_ratio=8.0)


def test_a_loose_budget_evicts_nothing_and_takes_the_finest_bound_that_fits() -> None:
    scores, keys, values = cache(5)
    out = run(scores, keys, values, target_ratio=1.5)
    choice = out.summary.budget
    assert choice.token_ratio == 0.0
    assert all(s.kept_tokens == N for s in out.summary.layers)
    assert (choice.k_error_bound, choice.v_error_bound) == budget_mode.LADDER[0]
    assert choice.stored_bytes <= choice.budget_bytes


def test_coarse_bounds_come_before_eviction() -> None:
    """docs/QUALITY.md's prior: when eviction is needed at all, the bounds are the coarsest."""
    scores, keys, values = cache(6)
    out = run(scores, keys, values, target_ratio=12.0)
    choice = out.summary.budget
    assert 0 < choice.token_ratio < 1
    assert (choice.k_error_bound, choice.v_error_bound) == budget_mode.LADDER[-1]
    assert choice.stored_bytes <= choice.budget_bytes
    assert choice.fp16_bytes == fp16(keys)


def test_the_quality_floor_holds() -> None:
    scores, keys, values = cache(7)
    out = run(scores, keys, values, target_ratio=4.0, max_ratio=0.6, max_error_bound=0.3)
    choice = out.summary.budget
    assert choice.token_ratio <= 0.6 + 1e-9
    assert max(choice.k_error_bound, choice.v_error_bound) <= 0.3
    with pytest.raises(InvalidArgument, match="smallest container"):
        run(scores, keys, values, target_ratio=40.0, max_ratio=0.25)


def test_layers_over_their_share_and_the_final_check_fix_an_underestimate() -> None:
    """Layer 0 all zeros (the trial sees constant groups, nearly free) and noisy later layers:
    the plan underestimates. A layer over its share is encoded coarser on its own (container v2
    records per-layer bounds); when that is not enough, the final check evicts further."""
    scores, keys, values = cache(8, spread=4.0)
    keys[0] = torch.zeros_like(keys[0])
    values[0] = torch.zeros_like(values[0])
    out = run(scores, keys, values, target_ratio=4.0, policy="kvcompose_uniform")
    layers = out.summary.layers
    assert out.summary.budget.stored_bytes <= out.summary.budget.budget_bytes
    assert layers[1].k_error_bound > layers[0].k_error_bound == out.summary.budget.k_error_bound
    decoded = codec.decode(out.stored.blob)
    assert decoded.header.layer_settings[1].k_error_bound == layers[1].k_error_bound

    out = run(scores, keys, values, target_ratio=10.0, policy="kvcompose_uniform")
    choice = out.summary.budget
    assert choice.encodes > 1
    assert choice.stored_bytes <= choice.budget_bytes
    decoded = codec.decode(out.stored.blob)
    for layer, summary in enumerate(out.summary.layers):
        assert decoded.indices[layer] is not None
        assert decoded.indices[layer].shape[-1] == summary.kept_tokens


def test_the_container_records_the_choice_and_decodes() -> None:
    scores, keys, values = cache(9)
    out = run(scores, keys, values, target_ratio=10.0, model="m@1", token_ids=list(range(N)))
    header = codec.read_header(out.stored.blob)
    assert header.meta["target_ratio"] == "10.0"
    assert float(header.meta["ratio"]) == pytest.approx(out.summary.budget.token_ratio, abs=0.02)
    assert header.settings.k_error_bound == out.summary.budget.k_error_bound
    assert header.settings.k_window == header.settings.v_window == 0
    assert out.stored.settings["policy.target_ratio"] == "10.0"
    again = run(scores, keys, values, target_ratio=10.0, model="m@1", token_ids=list(range(N)))
    assert again.stored.key == out.stored.key and again.stored.blob == out.stored.blob
    other = run(scores, keys, values, target_ratio=11.0, model="m@1", token_ids=list(range(N)))
    assert other.stored.key != out.stored.key


def test_eviction_damage_counts_attention_mass_and_the_uniform_prior() -> None:
    scores = torch.tensor([[[[0.7, 0.2, 0.1, 0.0]]]])  # [L=1, B=1, H=1, n=4]
    damage = budget_mode.eviction_damage(scores, 1)
    assert damage(0.0) == 0.0
    assert damage(0.5) == pytest.approx(0.5 * (0.1 + 0.5))
    assert damage(0.75) == pytest.approx(0.5 * (0.3 + 0.75))
    assert budget_mode.eviction_damage(None, 1)(0.25) == 0.25
    # The coarsest bound costs less than evicting 2 % of the tokens under the uniform prior.
    assert budget_mode.quant_damage(budget_mode.LADDER[-1]) < 0.5 * 0.02


def test_layers_round_to_the_nearest_whole_block() -> None:
    s = codec.QuantSettings(block_tokens=64, k_window=0, v_window=0)
    assert budget_mode.nearest_blocks(200, s, 1, 2048) == 192  # 8 over: down
    assert budget_mode.nearest_blocks(250, s, 1, 2048) == 256  # 6 short: up
    assert budget_mode.nearest_blocks(250, s, 1, 250) == 192  # up would pass n
    assert budget_mode.nearest_blocks(20, s, 1, 2048) == 20  # under half a block: as is
    uneven = codec.QuantSettings(block_tokens=64, k_window=8, v_window=0)
    assert budget_mode.nearest_blocks(200, uneven, 1, 2048) == 200


def test_subset_slots_map_a_smaller_selection_into_the_held_one() -> None:
    old = torch.tensor([[[1, 4, 7, 9], [0, 2, 3, -1]]])
    assert budget_mode.subset_slots(old, torch.tensor([[[4, 9], [0, 3]]])).tolist() == [
        [[1, 3], [0, 2]]
    ]
    assert budget_mode.subset_slots(old, torch.tensor([[[4, 5], [0, 3]]])) is None
    assert budget_mode.subset_slots(old, torch.tensor([[[4, 9], [0, -1]]])) is None


def test_the_default_policy_plans_a_budget() -> None:
    """Budget mode with the default policy (codec.policies.DEFAULT_POLICY)."""
    scores, keys, values = cache(10)
    out = run(scores, keys, values, target_ratio=8.0)
    assert out.summary.budget.stored_bytes <= out.summary.budget.budget_bytes
    assert codec.read_header(out.stored.blob).meta["policy"] == codec.policies.DEFAULT_POLICY
