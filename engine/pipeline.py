"""The compress pipeline over a :class:`~kvpack.engine.request.CompressRequest`.

One :class:`Compression` per request: :meth:`~Compression.start` once with the statistics (or
none), :meth:`~Compression.layer` for every layer as its K/V arrive (select if the allocation is
per layer, gather, encode; thread-safe, so layers can run in parallel), then
:meth:`~Compression.store` (assemble the container, its key and entry settings) and
:meth:`~Compression.summary`. The server drives it from the gRPC stream (``server.compress``),
LocalKVPack from its arguments (:func:`compress_cache`); neither has pipeline logic of its own,
so both keep the same tokens and write the same bytes under the same key.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvpack import codec
from kvpack.codec import EncodedLayer, QuantSettings
from kvpack.codec.selection import all_finite, layer_shares
from kvpack.engine import budget as budget_mode
from kvpack.engine.entries import Stored, entry_settings
from kvpack.engine.keys import CONTENT_KEY_PREFIX
from kvpack.engine.request import Allocation, CompressRequest, StatsKind
from kvpack.errors import InvalidArgument
from kvpack.v1 import kvpack_pb2 as pb


@dataclass
class LayerResult:
    """What one layer produced (tensors on the device of the layer's K/V)."""

    layer: int
    keys: torch.Tensor  # [B, Hkv, b_l, d] composite
    values: torch.Tensor
    indices: torch.Tensor  # [B, Hkv, b_l] int64, -1 padded
    encoded: EncodedLayer | None  # None when the cache is not stored
    input_bytes: int  # raw K+V bytes uploaded
    kept_bytes: int  # raw K+V bytes of the composite layer
    timings: dict[str, float]  # stage -> seconds


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _timed(timings: dict[str, float], stage: str, start: float) -> None:
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


class Compression:
    """The pipeline state of one request (see the module docstring).

    ``timings``: stage -> seconds over the whole call (per-layer stages once :meth:`record`
    has seen the layer). ``quant``: the settings layers are encoded with (budget mode: the
    plan's, once layer 0 has arrived).

    Budget mode (``request.target``): :meth:`start` keeps the statistics; layer 0's
    :meth:`layer` makes the plan (``engine.budget``: trial encodings of layer 0, ratio, bounds,
    block, then the selection of every layer) while later layers wait for it; every layer's
    composite cache is held until :meth:`store` has checked the container against the budget
    (re-encoding it coarser, then evicting further, when it is over).
    """

    def __init__(self, request: CompressRequest) -> None:
        self.request = request
        self.allocation: Allocation | None = None
        self.timings: dict[str, float] = {}
        self._statistics: dict[str, object] | None = None  # what the policy read, for the key
        self._indices: list[torch.Tensor] | None = None  # GLOBAL: every layer's kept positions
        self._scores: torch.Tensor | None = None  # PER_LAYER: [L, B, H, n]
        self._queries: torch.Tensor | None = None  # PER_LAYER: [L, B, Hq, W, d]
        self._shares: list[int] = []  # PER_LAYER: token slots per layer
        self.quant: QuantSettings = request.quant
        # Budget mode: the plan (made by layer 0; later layers wait on it) and what it chose.
        self._planned = threading.Event()
        self._plan_failed = False
        self._budget_scores: torch.Tensor | None = None  # SCORES [L, B, H, n] as sent
        self._held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # composite K/V
        self.choice: pb.BudgetChoice | None = None
        self._damage: Callable[[float], float] | None = None
        self._ratio: float | None = None  # budget mode: the eviction ratio chosen
        self._models: dict[QuantSettings, budget_mode.SizeModel] = {}  # the plan's trials
        self._share_bytes: list[float] = []  # each layer's share of the budget (plan)

    def start(self, kind: StatsKind | None = None, stats: torch.Tensor | None = None) -> None:
        """Fix the allocation, once, before layer 0: ``stats`` is the statistics tensor the
        client sent (``kind`` says which), None when it sent none. With a GLOBAL allocation this
        runs the selection of every layer (CPU-heavy: the server calls it on its codec pool)."""
        r, pol = self.request, self.request.selector
        if kind is not None:
            assert stats is not None
            r.layout.check_statistics(kind, stats.shape, stats.dtype)
        self.allocation = r.allocation(kind)
        if pol is None:
            return
        if pol.needs_scores:
            assert stats is not None
            self._statistics = {"kind": kind, "shape": list(stats.shape)}
        else:
            stats = None  # statistics are optional for this policy and unused
        if r.target is not None:  # selected by the plan, at layer 0
            self._budget_scores = stats
            return
        if self.allocation is Allocation.PER_LAYER:
            assert r.budget is not None
            self._shares = layer_shares(pol, r.budget)
            if kind == "window_queries":
                self._queries = stats
            else:
                self._scores = stats
            return
        lay = r.layout
        shape = (lay.num_layers, lay.batch_size, lay.num_kv_heads, lay.seq_len)
        start = time.perf_counter()
        try:
            self._indices = codec.select(
                stats, policy=r.policy, num_kv_heads=lay.num_kv_heads, shape=shape,
                **r.budget_kwargs(), **r.settings,
            )  # fmt: skip
        except ValueError as e:
            raise InvalidArgument(f"select: {e}") from e
        finally:
            _timed(self.timings, "select", start)

    def layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> LayerResult:
        """Select (per-layer allocation), gather and encode (when stored) layer ``layer``:
        ``k``, ``v`` ``[B, Hkv, n, d]``. Thread-safe."""
        r = self.request
        t: dict[str, float] = {}
        if r.target is not None:
            self._await_plan(layer, k, v, t)
        idx = self._select(layer, k, v, t)
        start = time.perf_counter()
        if self.allocation is Allocation.NONE:
            ck, cv = k, v
        else:
            try:
                (ck,), (cv,) = codec.gather([k], [v], [idx])
            except ValueError as e:
                raise InvalidArgument(f"gather (layer {layer}): {e}") from e
        _timed(t, "gather", start)
        encoded = None
        if r.store:
            if r.quant.mode != "lossless":
                _require_finite(layer, ck, cv)
            start = time.perf_counter()
            kept = None if self.allocation is Allocation.NONE else idx
            try:
                encoded = codec.encode_layer(ck, cv, kept, self.quant)
            except ValueError as e:
                raise InvalidArgument(f"encode (layer {layer}): {e}") from e
            if r.target is not None:
                encoded = self._within_share(layer, ck, cv, kept, encoded)
                self._held[layer] = (ck, cv)
            _timed(t, "encode", start)
        return LayerResult(
            layer, ck, cv, idx, encoded, _nbytes(k) + _nbytes(v), _nbytes(ck) + _nbytes(cv), t
        )

    # -- budget mode -----------------------------------------------------------------------------

    def _await_plan(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, t: dict[str, float]
    ) -> None:
        """Layer 0 makes the plan; later layers wait for it (layers are queued in order, so
        layer 0 is running or done when another layer waits)."""
        if layer == 0:
            start = time.perf_counter()
            try:
                self._plan(k, v)
            except BaseException:
                self._plan_failed = True
                raise
            finally:
                self._planned.set()
                _timed(t, "plan", start)
            return
        self._planned.wait()
        if self._plan_failed:
            raise InvalidArgument(f"layer {layer}: the budget plan failed at layer 0")

    def _plan(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Choose ratio, bounds and block from layer 0's K/V and the statistics (see
        ``engine.budget``), then select every layer at that ratio."""
        r = self.request
        target = r.target
        assert target is not None
        lay = r.layout
        _require_finite(0, k, v)  # lossy and fixed only: the trial encodes layer 0 first
        meta = r.container_meta(0.5)
        models = [budget_mode.trial_model(k, v, s, lay.num_layers, meta) for s in r.candidates]
        self._models = {m.settings: m for m in models}
        evicts = r.selector is not None
        self._damage = damage = budget_mode.eviction_damage(self._budget_scores, lay.num_kv_heads)
        most = target.max_ratio if evicts else 0.0
        choice = budget_mode.choose(
            models, target.budget_bytes, lay.num_layers, lay.seq_len, most, evicts, damage
        )
        if choice is None:  # predicted over budget everywhere: the smallest; store() decides
            model = budget_mode.coarsest(models)
            ratio = most
        else:
            model, ratio = choice.model, choice.ratio
        self.quant = model.settings
        if evicts:
            self._ratio = self._settle(model, ratio, most)
            model = self._calibrate(model, k, v)
            self._ratio = self._settle(model, self._ratio, most)
            assert self._indices is not None
            kept = [int(i.shape[-1]) for i in self._indices]
        else:
            self._ratio = ratio
            kept = [lay.seq_len] * lay.num_layers
        # Shares: each layer's predicted bytes, scaled so that they fill the goal.
        predicted = [model.layer(b) for b in kept]
        room = target.budget_bytes * (1 - budget_mode.MARGIN) - model.fixed
        scale = max(1.0, room / max(1.0, sum(predicted)))
        self._share_bytes = [p * scale for p in predicted]

    def _calibrate(
        self, model: budget_mode.SizeModel, k: torch.Tensor, v: torch.Tensor
    ) -> budget_mode.SizeModel:
        """The model scaled by what layer 0's real composite (the tokens the selection keeps,
        not the trial's even sample) costs against its prediction: kept tokens are the
        attended ones and compress differently from the average token."""
        assert self._indices is not None
        idx = self._indices[0]
        (ck,), (cv,) = codec.gather([k], [v], [idx])
        try:
            enc = codec.encode_layer(ck, cv, idx, model.settings)
        except ValueError as e:
            raise InvalidArgument(f"encode (layer 0): {e}") from e
        predicted = model.data(int(idx.shape[-1]))
        if predicted <= 0:
            return model
        factor = min(2.0, max(0.5, enc.nbytes / predicted))
        return model.calibrated(factor)

    def _settle(self, model: budget_mode.SizeModel, ratio: float, most: float) -> float:
        """The ratio whose real selection (the policy's own per-layer split: each layer's
        full-precision tail depends on it) is predicted within the goal, searched from the
        search's ratio by a few secant steps; the least eviction that fits, else the most."""
        target = self.request.target
        assert target is not None
        goal = target.budget_bytes * (1 - budget_mode.MARGIN)
        tried: dict[float, float] = {}
        for _ in range(budget_mode.SETTLE_STEPS):
            self._select_all(ratio, model.settings)
            assert self._indices is not None
            predicted = model.total([int(i.shape[-1]) for i in self._indices])
            tried[ratio] = predicted
            fixed = model.fixed
            nxt = 1 - (1 - ratio) * (goal - fixed) / max(1.0, predicted - fixed)
            nxt = min(most, max(0.0, nxt))
            if nxt in tried or abs(nxt - ratio) < 1e-4:
                break
            ratio = nxt
        # Whole-block trimming makes the size a step function of the ratio: when the secant
        # steps found nothing within the goal, climb from the largest ratio tried.
        climb = max(tried)
        while not any(p <= goal for p in tried.values()) and climb < most:
            over = tried[climb]
            climb = min(most, climb + max(0.005, (1 - climb) * (over - goal) / over))
            self._select_all(climb, model.settings)
            assert self._indices is not None
            tried[climb] = model.total([int(i.shape[-1]) for i in self._indices])
            ratio = climb
        fits = [r for r, p in tried.items() if p <= goal]
        best = min(fits) if fits else max(tried)
        if best != ratio:
            self._select_all(best, model.settings)
        return best

    def _select_all(self, ratio: float, settings: QuantSettings) -> None:
        """The GLOBAL selection of every layer at ``ratio`` (budget mode), each layer trimmed
        to whole blocks of ``settings`` (``budget.whole_blocks``: each head drops its
        lowest-scored tokens)."""
        r, lay = self.request, self.request.layout
        shape = (lay.num_layers, lay.batch_size, lay.num_kv_heads, lay.seq_len)
        try:
            indices = codec.select(
                self._budget_scores, policy=r.policy, num_kv_heads=lay.num_kv_heads,
                shape=shape, ratio=ratio, **r.settings,
            )  # fmt: skip
        except ValueError as e:
            raise InvalidArgument(f"select: {e}") from e
        n = lay.seq_len
        keeps = [
            budget_mode.nearest_blocks(int(i.shape[-1]), settings, r.fewest_tokens, n)
            for i in indices
        ]
        if sum(keeps) < self._floor_slots():  # rounding must not evict past max_ratio
            keeps = [max(k, int(i.shape[-1])) for k, i in zip(keeps, indices, strict=True)]
        for layer, (idx, keep) in enumerate(zip(indices, keeps, strict=True)):
            if keep != int(idx.shape[-1]):
                indices[layer] = self._reselect(layer, idx, keep)
        self._indices = indices

    def _reselect(self, layer: int, idx: torch.Tensor, keep: int) -> torch.Tensor:
        """Layer ``layer``'s kept positions at ``keep`` tokens, chosen by the policy itself
        (one layer, ``n_keep=keep``: its own ranking, sinks and windows); where the policy
        refuses, ``idx`` cut to each head's best-scored ``keep`` (never grown)."""
        r, lay = self.request, self.request.layout
        scores = self._budget_scores
        try:
            return codec.select(
                None if scores is None else scores[layer : layer + 1], policy=r.policy,
                num_kv_heads=lay.num_kv_heads, n_keep=keep, **r.settings,
                shape=(1, lay.batch_size, lay.num_kv_heads, lay.seq_len),
            )[0]  # fmt: skip
        except ValueError:
            if keep >= int(idx.shape[-1]):
                return idx
            kv = self._kv_scores()
            layer_scores = None if kv is None else kv[layer]
            return idx.gather(-1, budget_mode.shrink_indices(idx, keep, layer_scores))

    def _floor_slots(self) -> int:
        """The fewest token slots (summed over layers) budget mode may keep: the policy's
        floor and ``max_ratio``."""
        r = self.request
        assert r.target is not None
        lay = r.layout
        return max(
            lay.num_layers * r.fewest_tokens,
            math.ceil(lay.num_layers * lay.seq_len * (1 - r.target.max_ratio) - 1e-9),
        )

    def _kv_scores(self) -> torch.Tensor | None:
        """The statistics per KV head ``[L, B, Hkv, n]`` (query heads averaged), or None."""
        lay = self.request.layout
        scores = self._budget_scores
        if scores is not None and scores.shape[2] != lay.num_kv_heads:
            g = scores.shape[2] // lay.num_kv_heads
            scores = scores.reshape(
                lay.num_layers, lay.batch_size, lay.num_kv_heads, g, lay.seq_len
            ).mean(dim=3)
        return scores

    def _fit(self, results: Sequence[LayerResult]) -> bytes:
        """Budget mode's final check: the container of ``results``, re-encoded with coarser
        settings, then with fewer tokens per layer (each head keeps its best-scored composite
        tokens), until it is within the budget. InvalidArgument naming the smallest size
        reached when nothing fits. Updates ``results`` and :attr:`quant` to what is stored."""
        r = self.request
        target = r.target
        assert target is not None
        budget = target.budget_bytes
        blob = self._assemble(results)
        encodes = 1
        floor_slots = self._floor_slots()
        while len(blob) > budget and encodes < budget_mode.MAX_ENCODES:
            coarser = self._coarser(len(blob))
            if coarser is not None:
                self.quant = coarser
            else:
                slots = sum(int(x.indices.shape[-1]) for x in results)
                if r.selector is None or slots <= floor_slots:
                    break
                fixed = len(blob) - sum(x.encoded.nbytes for x in results if x.encoded)
                scale = (budget * (1 - budget_mode.MARGIN) - fixed) / max(1, len(blob) - fixed)
                scale = min(0.95, max(scale, floor_slots / slots, 0.05))
                self._shrink(results, scale)
            self._reencode(results)
            blob = self._assemble(results)
            encodes += 1
        if len(blob) > budget:
            kept = sum(int(x.indices.shape[-1]) for x in results)
            raise InvalidArgument(
                f"the budget of {budget_mode.describe(budget, target.fp16_bytes)} is below "
                f"the smallest container reached for this cache: "
                f"{budget_mode.describe(len(blob), target.fp16_bytes)} keeping {kept} token "
                f"slots with error bounds K{self.quant.k_error_bound}/V"
                f"{self.quant.v_error_bound} (max_ratio {target.max_ratio:g})"
            )
        ratio = _evicted(results, r) if r.selector is not None else 0.0
        q = self.quant
        assert self._damage is not None
        self.choice = pb.BudgetChoice(
            budget_bytes=budget,
            stored_bytes=len(blob),
            fp16_bytes=target.fp16_bytes,
            token_ratio=ratio,
            k_error_bound=q.k_error_bound,
            v_error_bound=q.v_error_bound,
            block_tokens=q.block_tokens,
            estimated_damage=budget_mode.total_damage(ratio, q, self._damage),
            encodes=encodes,
        )
        self._ratio = ratio
        return blob

    def _within_share(
        self,
        layer: int,
        ck: torch.Tensor,
        cv: torch.Tensor,
        kept: torch.Tensor | None,
        encoded: EncodedLayer,
    ) -> EncodedLayer:
        """A layer over its share of the budget is encoded again at the finest coarser bound
        the plan's trials predict to fit the share (container v2 records per-layer bounds), so
        one layer that compresses worse than layer 0 does not coarsen every layer."""
        share = self._share_bytes[layer] if layer < len(self._share_bytes) else None
        if share is None or encoded.nbytes <= share:
            return encoded
        coarser = self._coarser(encoded.nbytes, share, encoded.settings)
        if coarser is None:
            return encoded
        try:
            return codec.encode_layer(ck, cv, kept, coarser)
        except ValueError as e:
            raise InvalidArgument(f"encode (layer {layer}): {e}") from e

    def _coarser(
        self, size: int, goal: float | None = None, settings: QuantSettings | None = None
    ) -> QuantSettings | None:
        """The finest candidate coarser than ``settings`` (default: the container's; same
        block) whose trial predicts ``size`` scaled down to ``goal`` (default: the budget's),
        else the coarsest; None when ``settings`` are the coarsest."""
        target = self.request.target
        assert target is not None
        if goal is None:
            goal = target.budget_bytes * (1 - budget_mode.MARGIN)
        now = self.quant if settings is None else settings
        current = self._models.get(now)
        options = [
            m
            for m in self._models.values()
            if m.settings.block_tokens == now.block_tokens
            and m.settings.k_error_bound >= now.k_error_bound
            and m.settings.v_error_bound >= now.v_error_bound
            and m.settings != now
        ]
        if not options or current is None:
            return None
        options.sort(key=lambda m: (m.settings.k_error_bound, m.settings.v_error_bound))
        per_token = current.layer(1024, expected=True)
        for m in options:
            if size * m.layer(1024, expected=True) / per_token <= goal:
                return m.settings
        return options[-1].settings

    def _shrink(self, results: Sequence[LayerResult], scale: float) -> None:
        """Keep ``scale`` of every layer's composite tokens (each head its best-scored)."""
        scores = self._kv_scores()
        fewest = self.request.fewest_tokens
        keeps = [max(fewest, int(int(x.indices.shape[-1]) * scale)) for x in results]
        whole = [budget_mode.whole_blocks(k, self.quant, fewest) for k in keeps]
        if sum(whole) >= self._floor_slots():  # whole blocks unless that evicts past the floor
            keeps = whole
        for x, keep in zip(results, keeps, strict=True):
            ck, cv = self._held[x.layer]
            # The policy's own choice at the smaller count when it keeps a subset of what is
            # held (rankings that do not change with the budget), else the best-scored.
            slots = budget_mode.subset_slots(x.indices, self._reselect(x.layer, x.indices, keep))
            if slots is None:
                layer_scores = None if scores is None else scores[x.layer]
                slots = budget_mode.shrink_indices(x.indices, keep, layer_scores)
            x.indices = x.indices.gather(-1, slots)
            expand = slots.unsqueeze(-1)
            ck = ck.gather(2, expand.expand(*slots.shape, ck.shape[-1]))
            cv = cv.gather(2, expand.expand(*slots.shape, cv.shape[-1]))
            self._held[x.layer] = (ck, cv)
            if x.keys.numel():  # the caller still holds the composite: it gets the stored one
                x.keys, x.values = ck, cv
            x.kept_bytes = _nbytes(ck) + _nbytes(cv)

    def _reencode(self, results: Sequence[LayerResult]) -> None:
        start = time.perf_counter()
        for x in results:
            ck, cv = self._held[x.layer]
            kept = None if self.allocation is Allocation.NONE else x.indices
            # A layer already coarser than the container's settings (its share) stays so.
            own = x.encoded.settings if x.encoded is not None else self.quant
            settings = own if own.k_error_bound > self.quant.k_error_bound else self.quant
            try:
                x.encoded = codec.encode_layer(ck, cv, kept, settings)
            except ValueError as e:
                raise InvalidArgument(f"encode (layer {x.layer}): {e}") from e
        _timed(self.timings, "encode", start)

    def _assemble(self, results: Sequence[LayerResult]) -> bytes:
        r = self.request
        encoded = [x.encoded for x in results]
        assert all(e is not None for e in encoded), "store() needs a request with store=True"
        if r.target is not None:  # the meta records the eviction ratio actually stored
            self._ratio = _evicted(results, r) if r.selector is not None else 0.0
        return codec.assemble(
            encoded,  # type: ignore[arg-type]
            self.quant,
            dtype=r.layout.dtype,
            meta=r.container_meta(self._ratio),
            seq_len=r.layout.seq_len,
        )

    # -- selection ---------------------------------------------------------------------------------

    def _select(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, t: dict[str, float]
    ) -> torch.Tensor:
        r = self.request
        if self.allocation is Allocation.NONE:
            n = r.layout.seq_len
            return torch.arange(n, device=k.device).expand(*k.shape[:2], n).contiguous()
        if self._indices is not None:
            return self._indices[layer].to(k.device)
        scores = None
        if self._queries is not None:
            start = time.perf_counter()
            scores = codec.scores_from_window(self._queries[layer], k).unsqueeze(0)
            _timed(t, "stats", start)
        elif self._scores is not None:
            scores = self._scores[layer : layer + 1]
        start = time.perf_counter()
        try:
            return codec.select(
                scores, policy=r.policy, num_kv_heads=r.layout.num_kv_heads, keys=[k],
                values=[v], n_keep=self._shares[layer], **r.settings,
            )[0]  # fmt: skip
        except ValueError as e:
            raise InvalidArgument(f"select (layer {layer}): {e}") from e
        finally:
            _timed(t, "select", start)

    def record(self, result: LayerResult) -> None:
        """Count a finished layer's stage timings into :attr:`timings`."""
        for stage, seconds in result.timings.items():
            self.timings[stage] = self.timings.get(stage, 0.0) + seconds

    def store(self, results: Sequence[LayerResult]) -> Stored:
        """The container of every layer's encoding (CPU-heavy), its store key (the request's,
        else its content key when token ids were given, else the container's sha256) and the
        entry's settings."""
        r = self.request
        start = time.perf_counter()
        if r.target is not None:
            blob = self._fit(results)
            meta = r.container_meta(self._ratio)
        else:
            blob = self._assemble(results)
            meta = r.container_meta()
        _timed(self.timings, "encode", start)
        digest = ""
        if r.key:
            key = r.key
        elif r.token_ids:
            key = r.content_key(self._statistics)
        else:  # the blob's content key (engine.keys.blob_key), digest kept for the store
            digest = hashlib.sha256(blob).hexdigest()
            key = CONTENT_KEY_PREFIX + digest
        return Stored(key, blob, entry_settings(self.quant, meta), digest)

    def summary(
        self, results: Sequence[LayerResult], stored: Stored | None = None
    ) -> pb.CompressSummary:
        """The call's CompressSummary: bytes, kept tokens and reconstruction errors per layer,
        what was stored, and :attr:`timings`."""
        input_bytes = sum(x.input_bytes for x in results)
        kept_entries = sum(int((x.indices >= 0).sum()) for x in results)
        summary = pb.CompressSummary(
            input_bytes=input_bytes,
            kept_bytes=sum(x.kept_bytes for x in results),
            token_ratio=1.0 - kept_entries / self.request.layout.entries,
        )
        for x in results:
            ls = summary.layers.add(layer=x.layer, kept_tokens=int(x.indices.shape[-1]))
            ls.input_bytes = x.input_bytes
            if x.encoded is not None:
                s = x.encoded.stats
                assert s is not None  # encode_layer measures every layer it encodes
                ls.stored_bytes = x.encoded.nbytes
                ls.key_max_abs_error = s.key_max_abs_error
                ls.value_max_abs_error = s.value_max_abs_error
                ls.key_rel_error = s.key_rel_error
                ls.value_rel_error = s.value_rel_error
                if x.encoded.settings.mode != "lossless":
                    ls.k_error_bound = x.encoded.settings.k_error_bound
                    ls.v_error_bound = x.encoded.settings.v_error_bound
        if stored is not None:
            summary.key = stored.key
            summary.stored_bytes = len(stored.blob)
            summary.compression_ratio = input_bytes / max(1, len(stored.blob))
        if self.choice is not None:
            summary.budget.CopyFrom(self.choice)
        summary.timings_seconds.update(self.timings)
        return summary

    def release(self) -> None:
        """Drop the statistics and selections held (a cancelled call frees them at once)."""
        self._indices = self._scores = self._queries = self._budget_scores = None
        self._held.clear()


@dataclass
class Outcome:
    """An in-process compression: every layer's result, the summary and what was stored."""

    results: list[LayerResult]
    summary: pb.CompressSummary
    stored: Stored | None


def compress_cache(
    request: CompressRequest,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    stats: tuple[StatsKind, torch.Tensor] | None = None,
) -> Outcome:
    """Run the whole pipeline in this thread: ``keys``/``values`` are the request's layers
    ``[B, Hkv, n, d]`` (any device; statistics are moved to it)."""
    compression = Compression(request)
    if stats is None:
        compression.start()
    else:
        compression.start(stats[0], stats[1].to(keys[0].device))
    results = []
    for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
        result = compression.layer(layer, k, v)
        compression.record(result)
        results.append(result)
    stored = compression.store(results) if request.store else None
    return Outcome(results, compression.summary(results, stored), stored)


def _evicted(results: Sequence[LayerResult], request: CompressRequest) -> float:
    """The fraction of KV entries the layers' kept positions leave out."""
    return 1.0 - sum(int((x.indices >= 0).sum()) for x in results) / request.layout.entries


def _require_finite(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Lossy and fixed encodings are error-bounded for finite values only, and the codec keeps its
    full-precision window as is: refuse NaN/Inf in any kept K/V so none is ever stored."""
    for name, t in (("KEYS", k), ("VALUES", v)):
        if not all_finite(t):
            raise InvalidArgument(
                f"layer {layer} {name} contain NaN or Inf (non-finite values); only quant mode "
                "'lossless' stores them"
            )
