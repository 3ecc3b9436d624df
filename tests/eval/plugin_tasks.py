"""A `kvpack eval --task-generator` plug-in for the tests: its own needle prompts, written
without kvpack's generator, in the reference model's ids (which the model answers)."""

from __future__ import annotations

from typing import Any

import numpy as np

from kvpack.eval.tasks import ANSWER, BOS, IS, KEY, NUM_HI, NUM_LO, Q_VALUE, QUERY, SEP, Example

TASK = "plugin_needle"


def needles(*, task: str, length: int, n: int, seed: int, model: str) -> list[Example]:
    """``n`` prompts of ``length`` ids: BOS, filler words with one ``KEY k1 k2 IS v1 v2 SEP``
    needle, then ``QUERY Q_VALUE k1 k2 ANSWER``; the answer is ``v1 v2``."""
    if task != TASK:
        raise ValueError(f"unknown task {task!r}")
    rng = np.random.default_rng([seed, length])
    out = []
    for _ in range(n):
        key = [int(t) for t in rng.choice(np.arange(32, 416), 2, replace=False)]
        value = [int(t) for t in rng.integers(NUM_LO, NUM_HI, 2)]
        question = [QUERY, Q_VALUE, *key, ANSWER]
        needle = [KEY, *key, IS, *value, SEP]
        filler = [int(t) for t in rng.integers(32, 416, length - 1 - len(needle) - len(question))]
        at = int(rng.integers(0, len(filler)))
        context = [BOS, *filler[:at], *needle, *filler[at:]]
        out.append(Example(task, context + question, value, context_len=len(context)))
    return out


needles.tasks = (TASK,)  # type: ignore[attr-defined]


def wrong_ids(**kwargs: Any) -> list[Example]:
    """Examples with a token id past the reference model's 512-token vocabulary."""
    return [Example(kwargs["task"], [1, 2, 600, 4], [5], context_len=2)] * kwargs["n"]


wrong_ids.tasks = ("x",)  # type: ignore[attr-defined]
