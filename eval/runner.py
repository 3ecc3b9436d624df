"""The `kvpack eval` loop: prefill once per example, then score every compression point from it.

For each example (``kvpack.eval.tasks`` or a plug-in generator) the prompt is split where the
generator says (``Example.context_len``; kvpack's own tasks split at ``QUERY``): the context
(``n`` tokens) is prefilled and compressed; the question (``QUERY <kind> ... ANSWER``) is fed
afterwards in one multi-token forward over the (possibly ragged) compressed cache at positions
``n, n+1, ...``, and the answer is generated greedily and scored by exact match.

Every point goes through the client API (``compress`` then ``fetch``), so in-process
(:class:`~kvpack.client.LocalKVPack`) and ``--server`` runs share one code path, and the model
always answers from what the container decodes to (the composite cache ``compress`` returns is
the pre-quantisation one). The cache is uploaded as fp16 (bf16 for bf16 models): what a serving
stack holds, and the "fp16 bytes" every compression ratio is measured against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from kvpack.client.api import KVPack
from kvpack.client.hf import generate_from, prefill_with_scores, tensors_to_cache
from kvpack.codec import POLICIES
from kvpack.codec.selection import make_policy
from kvpack.eval.tasks import VOCAB_SIZE, Example

Mode = Literal["baseline", "evict", "lossy", "fixed", "evict+lossy", "budget"]
MODES: tuple[Mode, ...] = ("evict", "lossy", "fixed", "evict+lossy", "budget")
#: Container setting of budget points: kvpack chooses the ratio, bounds and block.
BUDGET_QUANT: dict[str, Any] = {"mode": "lossy"}
StatsKind = Literal["agnostic", "aware", "window", "last"]

#: SnapKV's observation window (kvpress default) for the window statistics.
WINDOW = 64
#: Statistics each baseline was published with, when the run is task-agnostic: the last WINDOW
#: context queries (SnapKV, PyramidKV) or the last context query (TOVA).
NATIVE_STATS: dict[str, StatsKind] = {"snapkv": "window", "pyramidkv": "window", "tova": "last"}
#: Container setting for points without lossy encoding: eviction only, stored losslessly.
LOSSLESS: dict[str, Any] = {"mode": "lossless"}


@dataclass(frozen=True)
class Quant:
    """One lossy setting of the sweep; ``settings`` are ``QuantSettings`` fields (mode excluded).

    ``label`` names it in tables and files, e.g. ``K0.05/V0.1``.
    """

    label: str
    settings: dict[str, Any]

    def with_mode(self, mode: str) -> dict[str, Any]:
        return {**self.settings, "mode": mode}


@dataclass(frozen=True)
class PointSpec:
    """One compression point: ``policy`` at ``ratio`` (fraction of tokens removed) with
    container settings ``quant`` (``QuantSettings`` fields); ``quant_label`` is '' for lossless.
    Budget points (mode "budget") have ``target`` (x smaller than fp16) instead of a ratio and
    bounds: kvpack chooses them (``compress(target_ratio=...)``)."""

    mode: Mode
    policy: str
    ratio: float
    quant_label: str
    quant: dict[str, Any]
    target: float = 0.0


@dataclass
class PointResult:
    """A point's outcome on one example: exact match, the container's bytes and the fraction
    of KV entries evicted (a budget point's choice)."""

    task: str
    spec: PointSpec
    correct: bool
    stored_bytes: int
    fp16_bytes: int
    token_ratio: float = 0.0


@dataclass
class EvalConfig:
    """What to evaluate (see ``kvpack eval --help``)."""

    tasks: list[str]
    length: int
    samples: int
    policies: list[str]
    ratios: list[float]
    quants: list[Quant]
    modes: list[Mode]
    combo_policies: list[str]
    stats: Literal["agnostic", "aware", "window"] = "agnostic"
    seed: int = 1234
    #: Budget points (mode "budget"): x smaller than fp16, each with every combo policy.
    targets: list[float] = field(default_factory=list)
    points: list[PointSpec] = field(init=False)

    def __post_init__(self) -> None:
        for spec in {*self.policies, *self.combo_policies}:
            policy, settings = parse_policy(spec)
            if policy not in POLICIES:
                raise ValueError(f"unknown policy {policy!r}; known: {sorted(POLICIES)}")
            if policy == "kvcompose_unstructured":
                # Per-head budgets pad the cache with -1 slots; generation needs a dense cache.
                raise ValueError("kvcompose_unstructured is not supported (padded composite)")
            make_policy(policy, settings)  # ValueError naming a bad setting, before the run
        self.points = plan_points(self)


def parse_policy(spec: str) -> tuple[str, dict[str, object]]:
    """``name`` or ``name:setting=value:...`` (e.g. ``kvpack:allocation=mass:floor=0.5``) ->
    (policy name, its settings as strings). The whole spec labels the policy's rows, so one run
    can compare settings of one policy."""
    name, *items = spec.split(":")
    settings: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"policy {spec!r}: expected name:setting=value, got {item!r}")
        settings[key] = value
    return name, settings


def plan_points(config: EvalConfig) -> list[PointSpec]:
    """Every point of the run, the uncompressed baseline first."""
    points = [PointSpec("baseline", "none", 0.0, "", LOSSLESS)]
    if "evict" in config.modes:
        points += [
            PointSpec("evict", p, r, "", LOSSLESS) for p in config.policies for r in config.ratios
        ]
    for mode in ("lossy", "fixed"):
        if mode in config.modes:
            points += [
                PointSpec(mode, "none", 0.0, q.label, q.with_mode(mode)) for q in config.quants
            ]
    if "evict+lossy" in config.modes:
        points += [
            PointSpec("evict+lossy", p, r, q.label, q.with_mode("lossy"))
            for p in config.combo_policies
            for r in config.ratios
            for q in config.quants
        ]
    if "budget" in config.modes:
        points += [
            PointSpec("budget", p, 0.0, f"budget {t:g}x", BUDGET_QUANT, target=t)
            for p in config.combo_policies
            for t in config.targets
        ]
    return points


def stats_kind(policy: str, stats: str) -> StatsKind | None:
    """Which statistics ``policy`` reads under ``--stats stats`` (None: it reads no scores).

    KVCompose variants read ``stats``; the score baselines read their own published statistics
    in a task-agnostic run, and the question's attention in a task-aware one.
    """
    policy, settings = parse_policy(policy)
    if not make_policy(policy, settings).needs_scores:
        return None
    if policy in NATIVE_STATS and stats == "agnostic":
        return NATIVE_STATS[policy]
    return stats  # type: ignore[return-value]


def token_map(vocab_size: int, special_ids: Sequence[int | None] = ()) -> np.ndarray | None:
    """How task token ids (``0 .. VOCAB_SIZE-1``) become ids of a model's vocabulary.

    None (identity) for a model of the task vocabulary (the reference model). Otherwise a fixed
    random injection (seed 0) into ``[0, vocab_size)`` avoiding the model's special ids: the
    same model always sees the same ids, and no task token becomes BOS/EOS/PAD of the model.
    """
    if vocab_size == VOCAB_SIZE:
        return None
    avoid = {int(i) for i in special_ids if i is not None}
    candidates = np.array([i for i in range(vocab_size) if i not in avoid])
    if len(candidates) < VOCAB_SIZE:
        raise ValueError(f"the model's vocabulary ({vocab_size}) is smaller than {VOCAB_SIZE}")
    return np.random.default_rng(0).choice(candidates, size=VOCAB_SIZE, replace=False)


def model_token_map(model: Any) -> np.ndarray | None:
    config = model.config
    specials = [getattr(config, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id")]
    flat = [i for s in specials for i in (s if isinstance(s, list) else [s])]
    return token_map(int(config.vocab_size), flat)


def split_example(
    example: Example, mapping: np.ndarray | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(context [1, n], question [1, m], answer [1, a])`` in the model's token ids: the split
    is the generator's (``example.context_len``); ``mapping`` maps task ids to model ids (None:
    the ids already are the model's)."""
    cut = example.context_len

    def ids(tokens: list[int]) -> torch.Tensor:
        out = np.asarray(tokens) if mapping is None else mapping[np.asarray(tokens)]
        return torch.as_tensor(out, dtype=torch.int64, device=device).unsqueeze(0)

    return ids(example.prompt[:cut]), ids(example.prompt[cut:]), ids(example.answer)


@dataclass
class Prefill:
    """One example's prefill: per-layer fp16 K/V ``[1, Hkv, n, d]`` and scores per kind
    (``[L, 1, Hq, n]`` float32)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    scores: dict[str, torch.Tensor]


def prefill(
    model: Any, context: torch.Tensor, question: torch.Tensor, kinds: set[StatsKind]
) -> Prefill:
    """Prefill ``context`` and collect each statistics kind in ``kinds`` (one pass per kind)."""
    scores: dict[str, torch.Tensor] = {}
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    for kind in sorted(kinds) or ["agnostic"]:
        if kind in ("window", "last"):
            window = WINDOW if kind == "window" else 1
            k, v, s = prefill_with_scores(model, context, mode="window", window=window)
        elif kind == "aware":
            k, v, s = prefill_with_scores(model, context, mode="aware", question_ids=question)
        else:
            k, v, s = prefill_with_scores(model, context, mode="agnostic")
        scores[kind] = s
        if not keys:
            keys, values = k, v
    dtype = model.dtype if model.dtype in (torch.float16, torch.bfloat16) else torch.float16
    return Prefill([k.to(dtype) for k in keys], [v.to(dtype) for v in values], scores)


def run_point(
    model: Any,
    client: KVPack,
    pre: Prefill,
    spec: PointSpec,
    stats: str,
    question: torch.Tensor,
    answer: torch.Tensor,
) -> tuple[bool, int, int, float]:
    """Compress, fetch, answer: ``(correct, stored bytes, fp16 bytes, token ratio)`` of one
    point."""
    kind = None if spec.policy == "none" else stats_kind(spec.policy, stats)
    budget: dict[str, Any] = {"ratio": None if spec.policy == "none" else spec.ratio}
    if spec.mode == "budget":
        budget = {"target_ratio": spec.target}
    policy, settings = parse_policy(spec.policy)
    result = client.compress(
        pre.keys,
        pre.values,
        scores=None if kind is None else pre.scores[kind],
        policy=policy,
        policy_settings=settings or None,
        quant=spec.quant,
        return_cache=False,
        **budget,
    )
    decoded = client.fetch(result.key, device=question.device)
    client.delete(result.key)  # a long run would otherwise keep every container in the store
    dtype = model.dtype
    cache = tensors_to_cache(
        [k.to(dtype) for k in decoded.keys], [v.to(dtype) for v in decoded.values]
    )
    n = pre.keys[0].shape[2]
    got = generate_from(model, cache, question, answer.shape[1], n)
    ok = bool(torch.equal(got, answer))
    return ok, result.stored_bytes, result.input_bytes, result.token_ratio


def run_eval(
    model: Any,
    client: KVPack,
    config: EvalConfig,
    examples: dict[str, list[Example]],
    progress: Callable[[str], None] | None = None,
    *,
    task_vocabulary: bool = True,
) -> list[PointResult]:
    """Every point of ``config`` on every example; ``progress(task)`` is called after each point.

    ``task_vocabulary``: the examples use kvpack's synthetic task vocabulary (mapped into the
    model's, :func:`token_map`); False for a plug-in generator's, already in the model's ids.
    """
    device = next(model.parameters()).device
    mapping = model_token_map(model) if task_vocabulary else None
    kinds = {
        k
        for p in {*config.policies, *config.combo_policies}
        if (k := stats_kind(p, config.stats)) is not None
    }
    results: list[PointResult] = []
    for task, task_examples in examples.items():
        for example in task_examples:
            context, question, answer = split_example(example, mapping, device)
            pre = prefill(model, context, question, kinds)
            for spec in config.points:
                ok, stored, fp16, evicted = run_point(
                    model, client, pre, spec, config.stats, question, answer
                )
                results.append(PointResult(task, spec, ok, stored, fp16, evicted))
                if progress is not None:
                    progress(task)
    return results
