"""Hugging Face transformers integration (needs the ``hf`` extra: ``pip install 'kvpack[hf]'``).

- :func:`collect_scores`: attention statistics ``[L, B, Hq, n]`` from a causal LM (task-agnostic,
  task-aware or observation window), the input of KVCompose.
- :func:`cache_to_tensors` / :func:`tensors_to_cache`: ``DynamicCache`` <-> per-layer K/V lists,
  ragged per-layer lengths included (transformers >= 4.56 and 5.x).
- :func:`ragged_attention`: multi-token forwards over a cache whose layers hold different lengths.
- :func:`compress_prefill` / :func:`generate_from`: prefill, compress, continue generating at the
  original positions; :func:`prefill` once and :func:`compress_prefilled` per setting to sweep
  ratios or policies over one prefill.
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "kvpack.client.hf needs Hugging Face transformers: pip install 'kvpack[hf]'"
    ) from exc

from kvpack.client.hf.cache import cache_to_tensors, tensors_to_cache
from kvpack.client.hf.generate import (
    Prefilled,
    compress_prefill,
    compress_prefilled,
    generate_from,
    prefill,
)
from kvpack.client.hf.ragged import ragged_attention
from kvpack.client.hf.stats import collect_scores, prefill_with_scores

__all__ = [
    "Prefilled",
    "cache_to_tensors",
    "collect_scores",
    "compress_prefill",
    "compress_prefilled",
    "generate_from",
    "prefill",
    "prefill_with_scores",
    "ragged_attention",
    "tensors_to_cache",
]
