"""The typed compress request: what a Compress header or ``LocalKVPack.compress`` asks for,
validated once, before any tensor is received or any codec work queued.

:meth:`CompressRequest.from_header` (the server) and :meth:`CompressRequest.from_options`
(Python arguments: LocalKVPack) both end in :meth:`CompressRequest.create`, so the two accept,
refuse (same :mod:`kvpack.errors` type, same message) and compute exactly the same things.
:func:`compress_header` is the other direction, for the gRPC clients.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import torch

from kvpack import wire
from kvpack.codec import MAX_META_CHARS, POLICIES, Policy, QuantSettings, policy_for_layout
from kvpack.codec.budgets import Budget
from kvpack.codec.policies import DEFAULT_POLICY
from kvpack.codec.policy_settings import shown
from kvpack.engine import budget as budget_mode
from kvpack.engine import schema
from kvpack.engine.keys import content_key, validate_key
from kvpack.errors import InvalidArgument
from kvpack.v1 import kvpack_pb2 as pb

#: Which attention statistics a client sent: SCORES ``[L, B, H, n]`` or WINDOW_QUERIES
#: ``[L, B, Hq, W, d]`` (the engine scores them against each layer's keys).
StatsKind = Literal["scores", "window_queries"]
STATS_KINDS: dict[int, StatsKind] = {
    pb.TENSOR_KIND_SCORES: "scores",
    pb.TENSOR_KIND_WINDOW_QUERIES: "window_queries",
}
#: Every policy name a request may carry ("none" keeps every token).
POLICY_NAMES = (*sorted(POLICIES), "none")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_TOKEN_ID = 2**32 - 1  # token ids travel as uint32


@dataclass(frozen=True)
class Layout:
    """An uploaded cache: ``num_layers`` layers of K and V ``[B, Hkv, n, d]`` in ``dtype``;
    statistics come from ``num_query_heads`` query heads (a multiple of Hkv). Field names are
    the proto's ``Layout``'s; construction checks every dimension (InvalidArgument)."""

    num_layers: int
    batch_size: int
    num_kv_heads: int
    num_query_heads: int
    head_dim: int
    seq_len: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name != "dtype" and getattr(self, f.name) < 1:
                raise InvalidArgument(f"layout.{f.name} must be at least 1")
        if self.num_query_heads % self.num_kv_heads:
            raise InvalidArgument(
                f"layout.num_query_heads ({self.num_query_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.dtype not in FLOAT_DTYPES:
            raise InvalidArgument("layout.dtype must be FLOAT32, FLOAT16 or BFLOAT16")

    @classmethod
    def from_proto(cls, msg: pb.Layout) -> Layout:
        """The layout of a header (``num_query_heads`` 0 means ``num_kv_heads``)."""
        dims = {f.name: getattr(msg, f.name) for f in dataclasses.fields(cls) if f.name != "dtype"}
        dims["num_query_heads"] = dims["num_query_heads"] or dims["num_kv_heads"]
        try:
            dtype = wire.dtype_to_torch(msg.dtype)
        except InvalidArgument:
            dtype = torch.uint8  # not a K/V dtype: refused after the dimensions are checked
        return cls(**dims, dtype=dtype)

    def to_proto(self) -> pb.Layout:
        dims = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "dtype"
        }
        return pb.Layout(**dims, dtype=wire.dtype_from_torch(self.dtype))  # type: ignore[arg-type]

    @property
    def kv_shape(self) -> tuple[int, int, int, int]:
        """``(B, Hkv, n, d)`` of one layer's K or V."""
        return (self.batch_size, self.num_kv_heads, self.seq_len, self.head_dim)

    @property
    def layer_bytes(self) -> int:
        """Raw bytes of one layer's K or V tensor."""
        return math.prod(self.kv_shape) * torch.empty((), dtype=self.dtype).element_size()

    @property
    def entries(self) -> int:
        """KV entries of the whole cache, ``L * B * Hkv * n``."""
        return self.num_layers * self.batch_size * self.num_kv_heads * self.seq_len

    def check_statistics(self, kind: StatsKind, shape: Sequence[int], dtype: torch.dtype) -> None:
        """InvalidArgument unless a statistics tensor of ``shape`` and ``dtype`` fits: SCORES
        ``[L, B, Hq or Hkv, n]``, WINDOW_QUERIES ``[L, B, Hq, W, d]`` with ``1 <= W <= n``."""
        if dtype not in FLOAT_DTYPES:
            raise InvalidArgument("statistics must be FLOAT32, FLOAT16 or BFLOAT16")
        s, lay = tuple(shape), self
        heads = (lay.num_query_heads, lay.num_kv_heads)
        if kind == "scores":
            ok = len(s) == 4 and s[:2] == (lay.num_layers, lay.batch_size)
            ok = ok and s[2] in heads and s[3] == lay.seq_len
            want = f"[L={lay.num_layers}, B={lay.batch_size}, H={heads[0]} or {heads[1]}, "
            want += f"n={lay.seq_len}]"
        else:
            ok = len(s) == 5 and s[:3] == (lay.num_layers, lay.batch_size, heads[0])
            ok = ok and 1 <= s[3] <= lay.seq_len and s[4] == lay.head_dim
            want = (
                f"[L={lay.num_layers}, B={lay.batch_size}, Hq={heads[0]}, W<=n, d={lay.head_dim}]"
            )
        if not ok:
            raise InvalidArgument(f"statistics tensor shape {list(s)}, expected {want}")


class RequestOptions(TypedDict, total=False):
    """The keyword arguments of ``compress`` that shape the request (defaults in brackets).

    policy: eviction policy name, one of POLICY_NAMES [codec.policies.DEFAULT_POLICY, "kvpack"].
    ratio: fraction of KV entries removed, in [0, 1); n_keep: token slots kept, summed over
    layers; exactly one of the two unless policy is "none", which takes neither.
    policy_settings: the policy's settings by name (values may be strings). quant:
    ``QuantSettings``, a mapping of its fields or a ``kvpack.v1.QuantSettings`` [codec
    defaults]. store: encode and store the composite cache [True]; key: its store key [a content
    key]; model, token_ids: the model fingerprint and the tokens the cache was computed from,
    for a content key that finds the same entry from any process. return_cache: return the
    composite K/V and kept indices [True].

    Budget mode (instead of ratio / n_keep): target_ratio (the stored container at least this
    many times smaller than the cache in fp16) and/or target_bytes (at most this many bytes);
    kvpack chooses the ratio, error bounds and block (``kvpack.engine.budget``). Quality floor:
    max_ratio (the most eviction it may choose), max_error_bound (the coarsest bound).
    """

    policy: str
    ratio: float | None
    n_keep: int | None
    policy_settings: Mapping[str, Any] | None
    quant: Any
    store: bool
    key: str | None
    model: str | None
    token_ids: Sequence[int] | torch.Tensor | None
    return_cache: bool
    target_ratio: float | None
    target_bytes: int | None
    max_ratio: float | None
    max_error_bound: float | None


#: The budget-mode fields of a request (header fields and ``compress`` arguments).
BUDGET_FIELDS = ("target_ratio", "target_bytes", "max_ratio", "max_error_bound")


class Allocation(enum.Enum):
    """How a request's budget reaches its layers (see :meth:`CompressRequest.allocation`)."""

    NONE = "none"  # policy "none": every layer keeps every token
    GLOBAL = "global"  # one selection over all layers, before layer 0 is processed
    PER_LAYER = "per_layer"  # each layer selected as its K/V arrive, with its share


def compress_header(layout: Layout, options: RequestOptions) -> pb.CompressHeader:
    """The CompressHeader of ``options`` for ``layout``, unvalidated (the server validates)."""
    token_ids = options.get("token_ids")
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.reshape(-1).tolist()
    header = pb.CompressHeader(
        layout=layout.to_proto(),
        policy=options.get("policy") or DEFAULT_POLICY,
        policy_settings=wire_settings(options.get("policy_settings")),
        quant=schema.quant_message(options.get("quant")),
        store=options.get("store", True),
        return_cache=options.get("return_cache", True),
        key=options.get("key") or "",
        model=options.get("model") or "",
        token_ids=list(token_ids or []),
    )
    for name in ("ratio", "n_keep", *BUDGET_FIELDS):
        value = options.get(name)
        if value is not None:
            setattr(header, name, value)
    return header


def wire_settings(settings: Mapping[str, Any] | None) -> dict[str, str]:
    """Policy settings as they travel (``map<string, string>``): every value as its str."""
    return {str(k): str(v) for k, v in (settings or {}).items()}


@dataclass(frozen=True)
class CompressRequest:
    """A validated compress request.

    ``settings``: the policy settings as sent (strings, ``codec.select``'s keyword arguments);
    ``selector``: the policy parsed from them (None for "none"); ``budget``: None for "none";
    ``quant``: checked against the layout when the cache is stored. Budget mode: ``target``
    is the budget, ``candidates`` the settings it chooses among (``quant`` is their base, with
    the codec's default bounds) and ``fewest_tokens`` the fewest tokens a layer keeps; ``budget``
    is None (the plan chooses the ratio).
    """

    layout: Layout
    policy: str
    settings: Mapping[str, Any]
    selector: Policy | None
    budget: Budget | None
    quant: QuantSettings
    store: bool
    return_cache: bool
    key: str
    model: str
    token_ids: tuple[int, ...]
    target: budget_mode.Target | None = None
    candidates: tuple[QuantSettings, ...] = ()
    fewest_tokens: int = 1

    @classmethod
    def from_header(
        cls, header: pb.CompressHeader, layout: Layout | None = None
    ) -> CompressRequest:
        """The request of a Compress header (``layout``: its already parsed layout)."""
        h = header
        return cls.create(
            layout or Layout.from_proto(h.layout),
            policy=h.policy or DEFAULT_POLICY,
            ratio=h.ratio if h.HasField("ratio") else None,
            n_keep=h.n_keep if h.HasField("n_keep") else None,
            settings=dict(h.policy_settings),
            quant=h.quant,
            store=h.store,
            return_cache=h.return_cache,
            key=h.key,
            model=h.model,
            token_ids=tuple(h.token_ids),
            quant_given=frozenset(f.name for f, _ in h.quant.ListFields()),
            target_ratio=h.target_ratio if h.HasField("target_ratio") else None,
            target_bytes=h.target_bytes if h.HasField("target_bytes") else None,
            max_ratio=h.max_ratio if h.HasField("max_ratio") else None,
            max_error_bound=h.max_error_bound if h.HasField("max_error_bound") else None,
        )

    @classmethod
    def from_options(cls, layout: Layout, options: RequestOptions) -> CompressRequest:
        """The request of ``compress``'s keyword arguments (see :class:`RequestOptions`)."""
        token_ids = options.get("token_ids")
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.reshape(-1).tolist()
        return cls.create(
            layout,
            policy=options.get("policy") or DEFAULT_POLICY,
            ratio=options.get("ratio"),
            n_keep=options.get("n_keep"),
            settings=wire_settings(options.get("policy_settings")),
            quant=options.get("quant"),
            store=options.get("store", True),
            return_cache=options.get("return_cache", True),
            key=options.get("key") or "",
            model=options.get("model") or "",
            token_ids=tuple(token_ids or ()),
            quant_given=_quant_given(options.get("quant")),
            target_ratio=options.get("target_ratio"),
            target_bytes=options.get("target_bytes"),
            max_ratio=options.get("max_ratio"),
            max_error_bound=options.get("max_error_bound"),
        )

    @classmethod
    def create(
        cls,
        layout: Layout,
        *,
        policy: str,
        ratio: float | None,
        n_keep: int | None,
        settings: Mapping[str, str],
        quant: Any,
        store: bool,
        return_cache: bool,
        key: str,
        model: str,
        token_ids: tuple[int, ...],
        quant_given: frozenset[str] = frozenset(),
        target_ratio: float | None = None,
        target_bytes: int | None = None,
        max_ratio: float | None = None,
        max_error_bound: float | None = None,
    ) -> CompressRequest:
        """Every check of a request, in order: policy and budget, policy settings against the
        layout, key, model and token ids, quantisation settings (against the layout when the
        cache is stored), then a byte budget against the smallest size the layout allows.
        InvalidArgument naming the first problem. ``quant_given``: the quant fields the caller
        set (budget mode refuses error bounds and defaults the windows to 0)."""
        if target_ratio is not None or target_bytes is not None:
            return cls._create_budget(
                layout, policy=policy, ratio=ratio, n_keep=n_keep, settings=settings,
                quant=quant, store=store, return_cache=return_cache, key=key, model=model,
                token_ids=token_ids, quant_given=quant_given, target_ratio=target_ratio,
                target_bytes=target_bytes, max_ratio=max_ratio, max_error_bound=max_error_bound,
            )  # fmt: skip
        for name, value in (("max_ratio", max_ratio), ("max_error_bound", max_error_bound)):
            if value is not None:
                raise InvalidArgument(
                    f"{name} is a quality floor of budget mode: give it with target_ratio or "
                    "target_bytes"
                )
        selector, budget = None, None
        if policy == "none":
            if ratio is not None or n_keep is not None or settings:
                raise InvalidArgument('policy "none" takes no ratio, n_keep or policy_settings')
        else:
            _check_policy_name(policy)
            try:
                budget = Budget(layout.num_layers, layout.seq_len, ratio=ratio, n_keep=n_keep)
            except ValueError as e:
                raise InvalidArgument(str(e)) from e
            selector = _selector(policy, settings, budget)
        _check_key_and_model(key, model, token_ids, layout)
        settings_ = schema.quant_settings(quant)
        if store:
            try:
                settings_.validate_for_layout(num_layers=layout.num_layers, seq_len=layout.seq_len)
            except ValueError as e:
                raise InvalidArgument(f"quant settings: {e}") from e
        return cls(
            layout, policy, dict(settings), selector, budget, settings_, store, return_cache,
            key, model, token_ids,
        )  # fmt: skip

    @classmethod
    def _create_budget(
        cls,
        layout: Layout,
        *,
        policy: str,
        ratio: float | None,
        n_keep: int | None,
        settings: Mapping[str, str],
        quant: Any,
        store: bool,
        return_cache: bool,
        key: str,
        model: str,
        token_ids: tuple[int, ...],
        quant_given: frozenset[str],
        target_ratio: float | None,
        target_bytes: int | None,
        max_ratio: float | None,
        max_error_bound: float | None,
    ) -> CompressRequest:
        """:meth:`create` of a budget-mode request (see :class:`RequestOptions`)."""
        if ratio is not None or n_keep is not None:
            raise InvalidArgument(
                "ratio and n_keep cannot be combined with target_ratio / target_bytes: budget "
                "mode chooses the eviction ratio (cap it with max_ratio)"
            )
        if not store:
            raise InvalidArgument(
                "target_ratio / target_bytes budget the stored container: they need store"
            )
        for name in ("k_error_bound", "v_error_bound"):
            if name in quant_given:
                raise InvalidArgument(
                    f"quant.{name} cannot be combined with target_ratio / target_bytes: budget "
                    "mode chooses the error bounds (cap them with max_error_bound)"
                )
        n, layers = layout.seq_len, layout.num_layers
        selector = None
        fewest = n
        if policy != "none":
            _check_policy_name(policy)
            selector = _selector(policy, settings, Budget(layers, n, ratio=0.0))
            floor = getattr(selector.settings, "keep_token_lower_bound", 0)
            fewest = min(n, max(1, int(floor)))
        elif settings:
            raise InvalidArgument('policy "none" takes no policy_settings')
        _check_key_and_model(key, model, token_ids, layout)
        base = schema.quant_settings(quant)
        if base.mode == "lossless":
            raise InvalidArgument(
                "quant.mode 'lossless' has no error bounds to choose: target_ratio / "
                "target_bytes need mode 'lossy' or 'fixed'"
            )
        # Full-precision windows serve fused decode kernels, not storage: 0 unless asked.
        base = dataclasses.replace(
            base,
            k_window=base.k_window if "k_window" in quant_given else 0,
            v_window=base.v_window if "v_window" in quant_given else 0,
        )
        block_set = "block_tokens" in quant_given
        blocks = [b for b in budget_mode.blocks_of(base, block_set) if b <= n] or [n]
        target = budget_mode.make_target(
            fp16=budget_mode.fp16_bytes(
                layers, layout.batch_size, layout.num_kv_heads, n, layout.head_dim
            ),
            target_ratio=target_ratio,
            target_bytes=target_bytes,
            max_ratio=max_ratio,
            max_error_bound=max_error_bound,
            most_ratio=1 - fewest / n,
        )
        candidates, refused = [], ""
        for bounds in budget_mode.ladder(target.max_error_bound):
            for block in blocks:
                cand = budget_mode.settings_for(base, bounds, block)
                try:
                    cand.validate_for_layout(num_layers=layers, seq_len=n)
                except ValueError as e:
                    refused = str(e)
                    continue
                candidates.append(cand)
        if not candidates:
            raise InvalidArgument(f"quant settings: no budget-mode setting fits: {refused}")
        # The fewest tokens any layer keeps under the floor: a lower bound of the container.
        least = max(fewest, math.ceil(n * (1 - target.max_ratio)) if selector else n)
        meta = {"policy": policy, **({"model": model} if model else {})}
        smallest = budget_mode.lower_bound(
            (layers, layout.batch_size, layout.num_kv_heads, n, layout.head_dim),
            layout.dtype, base, candidates, least, meta,
        )  # fmt: skip
        if target.budget_bytes < smallest:
            raise InvalidArgument(
                f"the budget of {budget_mode.describe(target.budget_bytes, target.fp16_bytes)}"
                f" is below the smallest container any setting reaches for this layout: "
                f"{budget_mode.describe(smallest, target.fp16_bytes)} at least"
            )
        return cls(
            layout, policy, dict(settings), selector, None, base, store, return_cache, key,
            model, token_ids, target, tuple(candidates), fewest,
        )  # fmt: skip

    def allocation(self, stats: StatsKind | None) -> Allocation:
        """How this request selects, given the statistics sent (None: none were).

        GLOBAL when the policy reads only SCORES (KVCompose's exact allocation across layers,
        PyramidKV's pyramid) or reads no tensor at all (streaming, random: from the layout):
        one selection before layer 0. PER_LAYER when the policy reads keys or values (knorm,
        kvcompose with add_v_norm) or the statistics are WINDOW_QUERIES (scores need each
        layer's keys): each layer as it arrives, with its share of the budget
        (``codec.selection.layer_shares``), so the whole cache is never buffered.
        InvalidArgument when the policy reads statistics and none were sent.
        """
        pol = self.selector
        if pol is None:
            return Allocation.NONE
        if pol.needs_scores and stats is None:
            raise InvalidArgument(
                f"policy {self.policy!r} needs attention statistics (a SCORES or "
                "WINDOW_QUERIES tensor) before layer 0's KEYS"
            )
        if pol.needs_keys or pol.needs_values or stats == "window_queries":
            if self.target is not None:
                raise InvalidArgument(
                    f"target_ratio / target_bytes need a policy that selects every layer at "
                    f"once: {self.policy!r} reads each layer's keys or values, or the "
                    "statistics are WINDOW_QUERIES (send SCORES)"
                )
            return Allocation.PER_LAYER
        return Allocation.GLOBAL

    def budget_kwargs(self) -> dict[str, Any]:
        """``ratio=`` or ``n_keep=`` of the request, for ``codec.select`` over every layer."""
        assert self.budget is not None
        b = self.budget
        return {"ratio": b.ratio} if b.ratio is not None else {"n_keep": b.n_keep}

    def container_meta(self, ratio: float | None = None) -> dict[str, str]:
        """The container's meta: policy, model and budget (budget mode: the ``ratio`` it chose
        and what was asked, e.g. ``target_ratio``)."""
        meta = {"policy": self.policy, **({"model": self.model} if self.model else {})}
        if self.target is not None:
            if ratio is not None and self.selector is not None:
                meta["ratio"] = repr(ratio)
            meta.update({k: repr(v) for k, v in self.target.key_fields().items()})
        elif self.budget is not None:
            name, value = next(iter(self.budget_kwargs().items()))
            meta[name] = repr(value) if name == "ratio" else str(value)
        return meta

    def content_key(self, statistics: Mapping[str, object] | None) -> str:
        """The key of the stored result, from every input that changes it (engine.keys):
        ``statistics`` describes the statistics the policy read (kind, shape), if any."""
        policy: dict[str, object] = {"policy": self.policy, "settings": {}}
        if self.selector is not None:
            policy["settings"] = dataclasses.asdict(self.selector.settings)
        if self.target is not None:  # the choice follows from what was asked
            policy.update(self.target.key_fields())
        elif self.selector is not None:
            policy.update(self.budget_kwargs())
        if statistics is not None:
            policy["statistics"] = dict(statistics)
        layout = {f.name: getattr(self.layout, f.name) for f in dataclasses.fields(Layout)}
        return content_key(self.model, layout, self.quant.to_dict(), policy, self.token_ids)


def _check_policy_name(policy: str) -> None:
    if policy not in POLICIES:
        raise InvalidArgument(f"unknown policy {shown(policy)} (known: {', '.join(POLICY_NAMES)})")


def _selector(policy: str, settings: Mapping[str, str], budget: Budget) -> Policy:
    """The policy with its settings checked against the layout's extent (InvalidArgument)."""
    try:
        return policy_for_layout(policy, settings, budget)
    except ValueError as e:
        raise InvalidArgument(f"policy {policy}: {e}") from e


def _check_key_and_model(key: str, model: str, token_ids: Sequence[int], layout: Layout) -> None:
    """The store key (when given), the model fingerprint and token ids: the model is stored in
    the container meta (at most MAX_META_CHARS characters) and the store's entry settings;
    token ids are uint32."""
    if key:
        validate_key(key)
    if len(model) > MAX_META_CHARS:
        raise InvalidArgument(
            f"model is {len(model)} characters, at most {MAX_META_CHARS} (the container meta's "
            "limit)"
        )
    if not model.isprintable():
        raise InvalidArgument(f"model {shown(model)} has control characters (printable only)")
    if token_ids and not model:
        raise InvalidArgument("token_ids given without model: content keys need both")
    most = layout.batch_size * layout.seq_len  # a cache of B rows of n tokens: B*n tokens
    if len(token_ids) > most:
        raise InvalidArgument(
            f"token_ids has {len(token_ids)} ids, at most batch_size*seq_len={most} "
            "(the tokens the cache was computed from)"
        )
    bad = next((t for t in token_ids if not (isinstance(t, int) and 0 <= t <= MAX_TOKEN_ID)), None)
    if bad is not None:
        raise InvalidArgument(f"token id {shown(bad)} is not an integer in [0, 2^32)")


def _quant_given(quant: object) -> frozenset[str]:
    """The quant fields a ``compress`` caller set: a message's present fields, a mapping's
    non-None keys, every field of a ``QuantSettings``."""
    if quant is None:
        return frozenset()
    if isinstance(quant, pb.QuantSettings):
        return frozenset(f.name for f, _ in quant.ListFields())
    if isinstance(quant, QuantSettings):
        return frozenset(schema.QUANT_FIELDS)
    if isinstance(quant, Mapping):
        return frozenset(str(k) for k, v in quant.items() if v is not None)
    return frozenset()
