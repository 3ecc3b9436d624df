"""Token-level generator of RULER-style long-context tasks (seeded, no tokenizer, no downloads).

Every example is a prompt of exactly ``length`` token ids ending in ``ANSWER``, followed by the
answer ids the model must produce greedily. The vocabulary is synthetic:

- special tokens ``0..15`` (``PAD``, ``BOS``, markers), query-kind markers ``16..31``;
- "words" ``32..415`` for filler, keys and variable names;
- "numbers" ``416..511`` for values (a value is ``VALUE_LEN`` number tokens).

A needle reads ``KEY k1 k2 IS v1 v2 SEP``; a question reads ``QUERY <kind> ... ANSWER``.

Families (``FAMILIES``): ``single_filler`` / ``single_repeat`` / ``single_noisy`` (one needle in
random filler with copied spans, in a repeated pattern, or among near-duplicate keys),
``multikey`` (distractor needles with other keys), ``multivalue`` (one key bound to several
values, answered in order of appearance), ``multiquery`` (several keys asked at once),
``vartrack`` (``VAR x EQ value`` then ``VAR y EQ x`` chains; answer every variable in the chain
of the queried value), ``cwe`` (common-word extraction: the few words that each occur far more
often than any other, in order of first appearance) and ``fwe`` (frequent-word extraction: the
three most frequent words of a Zipf-distributed text, most frequent first). Two families are
training-only: ``repeat`` (one random chunk of 4-24 words repeated to fill the prompt; the
warm-up in which induction heads form) and ``copy`` (random chunks each repeated a few times);
in both the answer continues the last repetition.

``Example.lm_mask`` marks the prompt positions whose token is fair game for a language-model
loss: filler and needle syntax, never the random key/value tokens (training on those teaches the
model to grab any value after any key).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PAD, BOS, EOS, QUERY, ANSWER, KEY, IS, SEP, VAR, EQ = range(10)
# Query kinds: what the answer after ANSWER consists of.
Q_VALUE, Q_ALL_VALUES, Q_VARS, Q_COMMON, Q_FREQUENT, Q_CONTINUE = range(16, 22)
WORD_LO, WORD_HI = 32, 416
NUM_LO, NUM_HI = 416, 512
VOCAB_SIZE = 512

KEY_LEN = 2
VALUE_LEN = 2
NEEDLE_LEN = 3 + KEY_LEN + VALUE_LEN  # KEY k.. IS v.. SEP
N_VALUES = 4  # multivalue: values bound to the queried key (RULER uses 4)
N_QUERIES = 4  # multiquery: keys asked at once (RULER uses 4)
VT_HOPS = 4  # vartrack: variables in the queried chain
N_COMMON = 3  # cwe / fwe: words in the answer

RETRIEVAL_FAMILIES = (
    "single_filler",
    "single_repeat",
    "single_noisy",
    "multikey",
    "multivalue",
    "multiquery",
)
FAMILIES = (*RETRIEVAL_FAMILIES, "vartrack", "cwe", "fwe")
TRAIN_ONLY_FAMILIES = ("copy", "repeat")

# Default number of distractor needles (or chains for vartrack), clamped to what fits in half
# the haystack so short contexts stay mostly haystack.
DEFAULT_DISTRACTORS = {
    "single_filler": 0,
    "single_repeat": 0,
    "single_noisy": 16,
    "multikey": 8,
    "multivalue": 4,
    "multiquery": 4,
    "vartrack": 2,
}


@dataclass(frozen=True)
class Example:
    """One task instance (kvpack's own families, or a ``--task-generator`` plug-in's).

    ``prompt``: token ids; ``prompt[:context_len]`` is the context that is prefilled and
    compressed, the rest the question fed after it (``0 < context_len < len(prompt)``).
    ``answer``: the ids to generate (exact match). ``lm_mask``: one bool per prompt token, True
    where a language-model loss may be applied (training only; empty for plug-in examples).
    """

    task: str
    prompt: list[int]
    answer: list[int]
    context_len: int
    lm_mask: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0 < self.context_len < len(self.prompt):
            raise ValueError(
                f"{self.task}: context_len {self.context_len} must be in [1, {len(self.prompt)})"
                " (the prompt is context then question)"
            )
        if not self.answer:
            raise ValueError(f"{self.task}: the answer is empty")


class _Builder:
    """Accumulates token ids with their LM-loss flags."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.mask: list[bool] = []

    def add(self, ids: list[int] | np.ndarray, lm: bool) -> None:
        ids = [int(t) for t in ids]
        self.ids.extend(ids)
        self.mask.extend([lm] * len(ids))

    def extend(self, other: _Builder) -> None:
        self.ids.extend(other.ids)
        self.mask.extend(other.mask)


def _words(rng: np.random.Generator, n: int, replace: bool = True) -> np.ndarray:
    return rng.choice(np.arange(WORD_LO, WORD_HI), size=n, replace=replace)


def _distinct_values(rng: np.random.Generator, n: int) -> list[list[int]]:
    """``n`` distinct values, each ``VALUE_LEN`` number tokens."""
    n_num = NUM_HI - NUM_LO
    codes = rng.choice(n_num**VALUE_LEN, size=n, replace=False)
    return [[NUM_LO + int(c) // n_num**i % n_num for i in range(VALUE_LEN)] for c in codes]


def _distinct_keys(rng: np.random.Generator, n: int) -> list[list[int]]:
    n_word = WORD_HI - WORD_LO
    codes = rng.choice(n_word**KEY_LEN, size=n, replace=False)
    return [[WORD_LO + int(c) // n_word**i % n_word for i in range(KEY_LEN)] for c in codes]


def _near_duplicate_keys(rng: np.random.Generator, key: list[int], n: int) -> list[list[int]]:
    """``n`` distinct keys that each differ from ``key`` in exactly one position."""
    out: list[list[int]] = []
    seen = {tuple(key)}
    while len(out) < n:
        k = list(key)
        k[int(rng.integers(KEY_LEN))] = int(_words(rng, 1)[0])
        if tuple(k) not in seen:
            seen.add(tuple(k))
            out.append(k)
    return out


def _needle(key: list[int], value: list[int]) -> _Builder:
    b = _Builder()
    b.add([KEY], lm=False)  # where a needle starts is unpredictable
    b.add(key, lm=False)
    b.add([IS], lm=True)
    b.add(value, lm=False)
    b.add([SEP], lm=True)
    return b


def filler(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` random words in which about a third of the runs copy an earlier span.

    The copied spans make filler worth a language-model loss: predicting them needs the same
    induction (match-and-copy) circuit that retrieval needs.
    """
    out: list[int] = []
    while len(out) < n:
        run = int(rng.integers(4, 17))
        if len(out) >= 16 and rng.random() < 0.35:
            start = int(rng.integers(0, len(out) - run + 1)) if len(out) > run else 0
            out.extend(out[start : start + run])
        else:
            out.extend(int(t) for t in _words(rng, run))
    return np.asarray(out[:n], dtype=np.int64)


def repeated_pattern(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` words: one random pattern of 8-32 words repeated (RULER's "grass is green")."""
    pattern = _words(rng, int(rng.integers(8, 33)))
    return np.resize(pattern, n)


def _insert(haystack: np.ndarray, items: list[_Builder], rng: np.random.Generator) -> _Builder:
    """Insert ``items`` (in order) at random word boundaries of ``haystack`` (all LM-eligible)."""
    cuts = np.sort(rng.integers(0, len(haystack) + 1, size=len(items)))
    out = _Builder()
    prev = 0
    for cut, item in zip(cuts, items, strict=True):
        out.add(haystack[prev:cut], lm=True)
        out.extend(item)
        prev = int(cut)
    out.add(haystack[prev:], lm=True)
    return out


def _layout(task: str) -> tuple[int, int]:
    """(tokens a needle/chain task always uses, tokens per distractor) for ``task``."""
    if task == "vartrack":
        # VAR x EQ v.. SEP, then VAR y EQ x SEP per hop; question: Q_VARS v..
        chain_len = 4 + VALUE_LEN + (VT_HOPS - 1) * 5
        return 3 + 1 + VALUE_LEN + chain_len, chain_len
    n_keys = N_QUERIES if task == "multiquery" else 1
    n_vals = N_VALUES if task == "multivalue" else 1
    # BOS, QUERY, ANSWER; question: kind + keys; the queried needles.
    return 3 + 1 + n_keys * KEY_LEN + n_keys * n_vals * NEEDLE_LEN, NEEDLE_LEN


def sample_distractors(task: str, length: int, rng: np.random.Generator) -> int | None:
    """A random distractor count in ``[0, 2 * default]`` that fits ``length`` (for training).

    None for families without distractors.
    """
    if task not in DEFAULT_DISTRACTORS:
        return None
    overhead, item_len = _layout(task)
    wanted = int(rng.integers(0, 2 * DEFAULT_DISTRACTORS[task] + 1))
    return min(wanted, _capacity(length, overhead, item_len))


def _capacity(length: int, overhead: int, item_len: int) -> int:
    """How many items of ``item_len`` fit in half of what the prompt leaves for the haystack."""
    return max(0, (length - overhead) // 2 // item_len)


def _finish(
    task: str, length: int, body: _Builder, question: list[int], answer: list[int]
) -> Example:
    out = _Builder()
    out.add([BOS], lm=False)
    out.extend(body)
    context_len = len(out.ids)
    out.add([QUERY, *question, ANSWER], lm=False)
    if len(out.ids) != length:
        raise AssertionError(f"{task}: built {len(out.ids)} tokens, wanted {length}")
    return Example(task, out.ids, answer, context_len, lm_mask=out.mask)


def _resolve_distractors(
    task: str, distractors: int | None, length: int, overhead: int, item_len: int
) -> int:
    if distractors is None:
        return min(DEFAULT_DISTRACTORS[task], _capacity(length, overhead, item_len))
    if distractors < 0:
        raise ValueError("distractors must be >= 0")
    return distractors


def _needle_task(
    task: str, length: int, rng: np.random.Generator, distractors: int | None
) -> Example:
    n_keys = N_QUERIES if task == "multiquery" else 1
    n_vals = N_VALUES if task == "multivalue" else 1
    overhead, item_len = _layout(task)
    d = _resolve_distractors(task, distractors, length, overhead, item_len)
    haystack_len = length - overhead - d * NEEDLE_LEN
    if haystack_len < 0:
        raise ValueError(f"{task}: length {length} too short for {d} distractors")

    if task == "single_noisy":
        keys = _distinct_keys(rng, 1)
        keys += _near_duplicate_keys(rng, keys[0], d)
    else:
        keys = _distinct_keys(rng, n_keys + d)
    values = _distinct_values(rng, n_keys * n_vals + d)
    queried = keys[:n_keys]
    pairs = [(k, values[i * n_vals + j]) for i, k in enumerate(queried) for j in range(n_vals)]
    pairs += [(k, values[n_keys * n_vals + i]) for i, k in enumerate(keys[n_keys:])]
    order = rng.permutation(len(pairs))
    needles = [_needle(*pairs[i]) for i in order]
    if task == "multivalue":
        answer = [t for i in order if pairs[i][0] == queried[0] for t in pairs[i][1]]
    else:
        first = {tuple(pairs[i][0]): pairs[i][1] for i in reversed(order)}
        answer = [t for k in queried for t in first[tuple(k)]]

    if task == "single_repeat":
        hay = repeated_pattern(rng, haystack_len)
    else:
        hay = filler(rng, haystack_len)
    kind = Q_ALL_VALUES if task == "multivalue" else Q_VALUE
    question = [kind, *(t for k in queried for t in k)]
    return _finish(task, length, _insert(hay, needles, rng), question, answer)


def _vartrack(length: int, rng: np.random.Generator, distractors: int | None) -> Example:
    overhead, chain_len = _layout("vartrack")
    d = _resolve_distractors("vartrack", distractors, length, overhead, chain_len)
    haystack_len = length - overhead - d * chain_len
    if haystack_len < 0:
        raise ValueError(f"vartrack: length {length} too short for {d} distractor chains")
    names = _words(rng, (d + 1) * VT_HOPS, replace=False).reshape(d + 1, VT_HOPS)
    values = _distinct_values(rng, d + 1)
    chains: list[list[_Builder]] = []
    for c in range(d + 1):
        stmts: list[_Builder] = []
        for h in range(VT_HOPS):
            b = _Builder()
            b.add([VAR], lm=False)
            b.add([names[c, h]], lm=False)
            b.add([EQ], lm=True)
            b.add(values[c] if h == 0 else [names[c, h - 1]], lm=False)
            b.add([SEP], lm=True)
            stmts.append(b)
        chains.append(stmts)
    # Interleave the chains at random while keeping each chain's own order.
    owner = rng.permutation(np.repeat(np.arange(d + 1), VT_HOPS))
    cursor = [0] * (d + 1)
    items: list[_Builder] = []
    for c in owner:
        items.append(chains[c][cursor[c]])
        cursor[c] += 1
    answer = [int(t) for t in names[0]]
    body = _insert(filler(rng, haystack_len), items, rng)
    return _finish("vartrack", length, body, [Q_VARS, *values[0]], answer)


def _cwe(length: int, rng: np.random.Generator) -> Example:
    n = length - 4  # BOS, QUERY, Q_COMMON, ANSWER
    common_count = max(6, n // 16)
    budget = n - N_COMMON * common_count
    if budget < 0:
        raise ValueError(f"cwe: length {length} too short")
    pool = _words(rng, WORD_HI - WORD_LO, replace=False)
    common, rare = pool[:N_COMMON], pool[N_COMMON:]
    counts: list[int] = []
    max_rare = max(1, common_count // 3)
    while sum(counts) < budget:
        if len(counts) == len(rare):
            raise ValueError(f"cwe: length {length} needs more distinct words")
        counts.append(min(int(rng.integers(1, max_rare + 1)), budget - sum(counts)))
    seq = np.concatenate([np.repeat(common, common_count), np.repeat(rare[: len(counts)], counts)])
    seq = rng.permutation(seq)
    first = {int(w): i for i, w in reversed(list(enumerate(seq)))}
    answer = sorted((int(w) for w in common), key=first.__getitem__)
    body = _Builder()
    body.add(seq, lm=True)
    return _finish("cwe", length, body, [Q_COMMON], answer)


def _fwe(length: int, rng: np.random.Generator) -> Example:
    n = length - 4  # BOS, QUERY, Q_FREQUENT, ANSWER
    n_words = 128
    p = 1.0 / np.arange(1, n_words + 1)
    p /= p.sum()
    counts = np.floor(p * n).astype(np.int64)
    # Spread the rounding remainder over the tail so the top counts stay exactly Zipf.
    tail = np.arange(N_COMMON + 1, n_words)
    np.add.at(counts, tail[np.arange(n - counts.sum()) % len(tail)], 1)
    if not all(counts[i] > counts[i + 1] for i in range(N_COMMON)) or counts.sum() != n:
        raise ValueError(f"fwe: length {length} too short for distinct top counts")
    words = _words(rng, n_words, replace=False)
    seq = rng.permutation(np.repeat(words, counts))
    body = _Builder()
    body.add(seq, lm=True)
    return _finish("fwe", length, body, [Q_FREQUENT], [int(w) for w in words[:N_COMMON]])


def _copy(length: int, rng: np.random.Generator) -> Example:
    """Random chunks of 4-48 words, each repeated 2-4 times; continue the last repetition."""
    n = length - 4  # BOS, QUERY, Q_CONTINUE, ANSWER
    last = [int(t) for t in _words(rng, int(rng.integers(4, 25)))]
    # The prompt ends with at least one full copy of ``last`` plus part of the next copy, so the
    # answer (the next 4 tokens of the repetition) is determined by the prompt.
    head_len = max(0, n - len(last) - int(rng.integers(1, 2 * len(last) + 1)))
    seq: list[int] = []
    while len(seq) < head_len:
        chunk = [int(t) for t in _words(rng, int(rng.integers(4, 49)))]
        seq.extend(chunk * int(rng.integers(2, 5)))
    tail = last * ((n - head_len + 4) // len(last) + 1)
    seq = seq[:head_len] + tail[: n - head_len + 4]
    body = _Builder()
    body.add(seq[:n], lm=True)
    return _finish("copy", length, body, [Q_CONTINUE], seq[n:])


def _repeat(length: int, rng: np.random.Generator) -> Example:
    """One random chunk of 4-24 words repeated; continue the repetition for 4 tokens.

    Every token after the first period is predictable only by matching the previous occurrence
    of the current token and copying its successor, and the period varies, so a fixed
    positional offset does not solve it: the quickest circuit to learn it is an induction head.
    """
    n = length - 4  # BOS, QUERY, Q_CONTINUE, ANSWER
    seq = [int(t) for t in np.resize(_words(rng, int(rng.integers(4, 25))), n + 4)]
    body = _Builder()
    body.add(seq[:n], lm=True)
    return _finish("repeat", length, body, [Q_CONTINUE], seq[n:])


def make_example(
    task: str, length: int, rng: np.random.Generator, distractors: int | None = None
) -> Example:
    """One example of ``task`` whose prompt is exactly ``length`` tokens.

    ``distractors``: extra needles (chains for ``vartrack``); None = family default, clamped to
    fit. Raises ValueError if ``length`` is too short.
    """
    if task in RETRIEVAL_FAMILIES:
        return _needle_task(task, length, rng, distractors)
    if task == "vartrack":
        return _vartrack(length, rng, distractors)
    if task == "cwe":
        return _cwe(length, rng)
    if task == "fwe":
        return _fwe(length, rng)
    if task == "copy":
        return _copy(length, rng)
    if task == "repeat":
        return _repeat(length, rng)
    raise ValueError(f"unknown task {task!r}; known: {(*FAMILIES, *TRAIN_ONLY_FAMILIES)}")


def make_examples(
    task: str, length: int, n: int, seed: int, distractors: int | None = None
) -> list[Example]:
    """``n`` examples; the same (task, length, seed, distractors) always gives the same ids."""
    task_id = [*FAMILIES, *TRAIN_ONLY_FAMILIES].index(task)
    rng = np.random.default_rng([seed, task_id, length])
    return [make_example(task, length, rng, distractors) for _ in range(n)]
