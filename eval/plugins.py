"""Task generators for `kvpack eval`: kvpack's synthetic families, or a plug-in named
``module:function`` (``--task-generator``).

A plug-in is any importable callable taking keyword arguments ``task`` (a name from
``--tasks``), ``length`` (the ``--length`` hint, in tokens), ``n`` (``--samples``), ``seed`` and
``model`` (the ``--model`` argument, e.g. to load its tokenizer) and returning ``n``
:class:`~kvpack.eval.tasks.Example` whose ids are already the model's token ids. Each example
says where its context ends (``context_len``): the context is compressed, the question after it
is not. It may list its task names in a ``tasks`` attribute, the default for ``--tasks``.
Example::

    def passkeys(*, task, length, n, seed, model):
        tok = AutoTokenizer.from_pretrained(model)
        ...
        return [Example(task, context + question, answer, context_len=len(context)), ...]
    passkeys.tasks = ("passkey",)

    kvpack eval --model ./my-llama --task-generator mytasks:passkeys --length 4096
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from kvpack.eval.tasks import FAMILIES, Example, make_examples

TaskGenerator = Callable[..., Sequence[Example]]


def load_generator(spec: str) -> TaskGenerator:
    """The callable ``module:function`` names; ValueError naming what could not be found."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--task-generator {spec!r}: expected module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--task-generator {spec!r}: cannot import {module_name!r}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"--task-generator {spec!r}: {module_name} has no callable {attr!r}")
    return fn


def default_tasks(fn: TaskGenerator, spec: str) -> list[str]:
    """The plug-in's ``tasks`` attribute; ValueError when it has none (then --tasks is needed)."""
    tasks = getattr(fn, "tasks", None)
    if not tasks:
        raise ValueError(f"--task-generator {spec!r} lists no tasks: pass --tasks")
    return [str(t) for t in tasks]


def plugin_examples(
    fn: TaskGenerator,
    spec: str,
    tasks: Sequence[str],
    *,
    length: int,
    n: int,
    seed: int,
    model: str,
    vocab_size: int,
) -> dict[str, list[Example]]:
    """Every task's examples from the plug-in, checked before any model runs: a list of ``n``
    Examples of that task with ids in ``[0, vocab_size)``; ValueError naming the first problem."""
    out: dict[str, list[Example]] = {}
    for task in tasks:
        got: Any = fn(task=task, length=length, n=n, seed=seed, model=model)
        examples = list(got) if isinstance(got, Sequence) else None
        if examples is None or not all(isinstance(e, Example) for e in examples):
            raise ValueError(
                f"--task-generator {spec!r}: {task!r} did not return a list of Example"
            )
        if len(examples) != n:
            raise ValueError(
                f"--task-generator {spec!r}: {task!r} gave {len(examples)} examples, not {n}"
            )
        for i, ex in enumerate(examples):
            ids = [*ex.prompt, *ex.answer]
            bad = next((t for t in ids if not 0 <= int(t) < vocab_size), None)
            if bad is not None:
                raise ValueError(
                    f"--task-generator {spec!r}: {task!r} example {i} has token id {bad}, "
                    f"outside the model's vocabulary [0, {vocab_size})"
                )
        out[task] = examples
    return out


def builtin_examples(
    tasks: Sequence[str], *, length: int, n: int, seed: int
) -> dict[str, list[Example]]:
    """kvpack's synthetic families (:mod:`kvpack.eval.tasks`); ValueError for an unknown one."""
    check_builtin_tasks(tasks)
    return {t: make_examples(t, length, n, seed) for t in tasks}


def check_builtin_tasks(tasks: Sequence[str]) -> None:
    """ValueError naming the tasks that are not kvpack families (checked before a run)."""
    unknown = [t for t in tasks if t not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {list(FAMILIES)}")
