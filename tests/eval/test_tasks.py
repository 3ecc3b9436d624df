"""The RULER-style generator: deterministic, exact lengths, and answers that really are correct."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from kvpack.eval.tasks import (
    ANSWER,
    BOS,
    EQ,
    FAMILIES,
    IS,
    KEY,
    KEY_LEN,
    N_COMMON,
    N_QUERIES,
    N_VALUES,
    QUERY,
    SEP,
    TRAIN_ONLY_FAMILIES,
    VALUE_LEN,
    VAR,
    VOCAB_SIZE,
    VT_HOPS,
    WORD_HI,
    WORD_LO,
    Example,
    make_example,
    make_examples,
    sample_distractors,
)

LENGTHS = (128, 512, 2048)


def needles(prompt: list[int]) -> list[tuple[list[int], list[int]]]:
    """(key, value) of every ``KEY k.. IS v.. SEP`` in the prompt, in order."""
    out = []
    for i, t in enumerate(prompt):
        if t == KEY:
            key = prompt[i + 1 : i + 1 + KEY_LEN]
            j = i + 1 + KEY_LEN
            assert prompt[j] == IS and prompt[j + 1 + VALUE_LEN] == SEP
            out.append((key, prompt[j + 1 : j + 1 + VALUE_LEN]))
    return out


def resolve(assign: dict[int, list[int]], var: int) -> list[int]:
    """Follow ``VAR y EQ x`` links from ``var`` down to the value it was assigned."""
    rhs = assign[var]
    return rhs if len(rhs) == VALUE_LEN else resolve(assign, rhs[0])


def question(ex: Example) -> list[int]:
    """Tokens between ``QUERY <kind>`` and the final ``ANSWER``."""
    q = len(ex.prompt) - 1 - ex.prompt[::-1].index(QUERY)
    return ex.prompt[q + 2 : -1]


@pytest.mark.parametrize("task", FAMILIES + TRAIN_ONLY_FAMILIES)
@pytest.mark.parametrize("length", LENGTHS)
def test_shape_and_determinism(task: str, length: int) -> None:
    a = make_examples(task, length, 3, seed=5)
    b = make_examples(task, length, 3, seed=5)
    c = make_examples(task, length, 3, seed=6)
    assert a == b
    assert [e.prompt for e in a] != [e.prompt for e in c]
    for ex in a:
        assert ex.task == task
        assert len(ex.prompt) == len(ex.lm_mask) == length
        assert ex.prompt[0] == BOS and ex.prompt[-1] == ANSWER
        # The context/question split is the generator's: the question starts at the last QUERY.
        assert ex.context_len == len(ex.prompt) - 1 - ex.prompt[::-1].index(QUERY)
        assert ex.answer and all(0 <= t < VOCAB_SIZE for t in ex.prompt + ex.answer)


@pytest.mark.parametrize("task", ["single_filler", "single_repeat", "single_noisy", "multikey"])
@pytest.mark.parametrize("length", LENGTHS)
def test_single_key_answer_is_bound_value(task: str, length: int) -> None:
    for ex in make_examples(task, length, 5, seed=1):
        key = question(ex)
        found = [v for k, v in needles(ex.prompt) if k == key]
        assert found == [ex.answer]  # exactly one needle carries the queried key


def test_noisy_distractors_are_near_duplicates() -> None:
    ex = make_examples("single_noisy", 1024, 1, seed=2, distractors=20)[0]
    key = question(ex)
    others = [k for k, _ in needles(ex.prompt) if k != key]
    assert len(others) == 20
    assert all(sum(a == b for a, b in zip(k, key, strict=True)) == KEY_LEN - 1 for k in others)


def test_multikey_distractor_count_is_a_parameter() -> None:
    for d in (0, 3, 30):
        ex = make_examples("multikey", 1024, 1, seed=3, distractors=d)[0]
        assert len(needles(ex.prompt)) == d + 1
    with pytest.raises(ValueError):
        make_examples("multikey", 128, 1, seed=3, distractors=100)


def test_multivalue_answer_is_all_values_in_order() -> None:
    for ex in make_examples("multivalue", 512, 5, seed=4):
        key = question(ex)
        values = [t for k, v in needles(ex.prompt) if k == key for t in v]
        assert len(values) == N_VALUES * VALUE_LEN
        assert values == ex.answer


def test_multiquery_answer_follows_query_order() -> None:
    for ex in make_examples("multiquery", 512, 5, seed=4):
        q = question(ex)
        keys = [q[i : i + KEY_LEN] for i in range(0, len(q), KEY_LEN)]
        assert len(keys) == N_QUERIES
        bound = {tuple(k): v for k, v in needles(ex.prompt)}
        assert ex.answer == [t for k in keys for t in bound[tuple(k)]]


def test_vartrack_chain_resolves_to_queried_value() -> None:
    for ex in make_examples("vartrack", 1024, 5, seed=7):
        assign: dict[int, list[int]] = {}
        p = ex.prompt
        for i, t in enumerate(p):
            if t == VAR:
                end = p.index(SEP, i)
                assert p[i + 2] == EQ
                assign[p[i + 1]] = p[i + 3 : end]

        value = question(ex)
        assert len(ex.answer) == VT_HOPS
        assert all(resolve(assign, v) == value for v in ex.answer)
        assert sorted(v for v in assign if resolve(assign, v) == value) == sorted(ex.answer)


def test_cwe_answer_is_most_common_words() -> None:
    for ex in make_examples("cwe", 1024, 5, seed=8):
        counts = Counter(t for t in ex.prompt if WORD_LO <= t < WORD_HI)
        top = [w for w, _ in counts.most_common(N_COMMON + 1)]
        assert set(ex.answer) == set(top[:N_COMMON])
        assert counts[top[N_COMMON - 1]] > counts[top[N_COMMON]]  # no tie at the cut
        assert ex.answer == sorted(ex.answer, key=ex.prompt.index)  # order of first appearance


@pytest.mark.parametrize("length", LENGTHS)
def test_fwe_answer_is_top_words_by_frequency(length: int) -> None:
    for ex in make_examples("fwe", length, 3, seed=9):
        counts = Counter(t for t in ex.prompt if WORD_LO <= t < WORD_HI)
        ranked = counts.most_common(N_COMMON + 1)
        assert ex.answer == [w for w, _ in ranked[:N_COMMON]]
        assert len({c for _, c in ranked}) == N_COMMON + 1  # strictly decreasing counts


@pytest.mark.parametrize("task", TRAIN_ONLY_FAMILIES)
def test_copy_answer_continues_repetition(task: str) -> None:
    for ex in make_examples(task, 256, 5, seed=10):
        body = ex.prompt[1:-3]  # strip BOS and QUERY, Q_CONTINUE, ANSWER
        # Some period p of the final repetition predicts every answer token.
        seq = body + ex.answer
        assert any(
            all(seq[-i] == seq[-i - p] for i in range(1, len(ex.answer) + 1)) for p in range(4, 25)
        )


def test_lm_mask_excludes_needle_keys_and_values() -> None:
    ex = make_examples("multikey", 512, 1, seed=11)[0]
    for i, t in enumerate(ex.prompt):
        if t == KEY:
            span = range(i, i + 1 + KEY_LEN + 1 + VALUE_LEN)
            assert [ex.lm_mask[j] for j in span if ex.prompt[j] not in (IS,)] == [False] * (
                KEY_LEN + VALUE_LEN + 1
            )


def test_sample_distractors_fits() -> None:
    rng = np.random.default_rng(0)
    for task in FAMILIES:
        for length in (128, 256, 4096):
            d = sample_distractors(task, length, rng)
            ex = make_example(task, length, rng, d)
            assert len(ex.prompt) == length


def test_unknown_task_and_short_length_raise() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        make_example("nope", 128, rng)
    with pytest.raises(ValueError):
        make_example("multiquery", 20, rng)


def test_example_refuses_a_split_outside_the_prompt() -> None:
    with pytest.raises(ValueError, match="context_len 5 must be in"):
        Example("mine", [1, 2, 3, 4, 5], [6], context_len=5)
    with pytest.raises(ValueError, match="answer is empty"):
        Example("mine", [1, 2, 3], [], context_len=1)
