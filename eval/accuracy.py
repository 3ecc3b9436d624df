"""Greedy exact-match accuracy of a causal LM on ``kvpack.eval.tasks`` examples (batched, CPU).

``python -m kvpack.eval.accuracy --lengths 128 256 --samples 50`` prints a family x length table
for the committed reference model (or ``--model PATH``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from kvpack.client.hf.cache import cache_argument, output_cache
from kvpack.eval.tasks import FAMILIES, Example, make_examples

if TYPE_CHECKING:
    from transformers import PreTrainedModel

EVAL_SEED = 1234  # training draws from other seeds; this keeps eval examples unseen


@torch.no_grad()
def greedy_generate(model: PreTrainedModel, prompts: torch.Tensor, n_new: int) -> torch.Tensor:
    """Greedy continuation with a KV cache: prompts (B, L) int64 -> new tokens (B, n_new)."""
    out = model(input_ids=prompts, use_cache=True, logits_to_keep=1)
    tokens = [out.logits[:, -1].argmax(-1)]
    for _ in range(n_new - 1):
        out = model(input_ids=tokens[-1][:, None], **cache_argument(model, output_cache(out)))
        tokens.append(out.logits[:, -1].argmax(-1))
    return torch.stack(tokens, dim=1)


def correct(
    model: PreTrainedModel, examples: Sequence[Example], batch_size: int = 16
) -> list[bool]:
    """Per example: does the greedy answer equal ``example.answer`` exactly?

    Examples are batched by (prompt length, answer length), so no padding is needed.
    """
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[len(ex.prompt), len(ex.answer)].append(i)
    result = [False] * len(examples)
    for (_, n_new), idx in groups.items():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            prompts = torch.tensor([examples[i].prompt for i in chunk])
            answers = torch.tensor([examples[i].answer for i in chunk])
            hits = (greedy_generate(model, prompts, n_new) == answers).all(dim=1)
            for i, hit in zip(chunk, hits.tolist(), strict=True):
                result[i] = bool(hit)
    return result


def exact_match(model: PreTrainedModel, examples: Sequence[Example], batch_size: int = 16) -> float:
    """Fraction of ``examples`` whose greedy answer matches exactly (0.0 for no examples)."""
    hits = correct(model, examples, batch_size)
    return sum(hits) / len(hits) if hits else 0.0


def accuracy_table(
    model: PreTrainedModel,
    families: Sequence[str],
    lengths: Sequence[int],
    samples: int,
    seed: int = EVAL_SEED,
    batch_size: int = 16,
) -> dict[str, dict[int, float]]:
    """``{family: {length: exact-match}}`` on ``samples`` fresh examples per cell."""
    table: dict[str, dict[int, float]] = {}
    for family in families:
        table[family] = {
            n: exact_match(model, make_examples(family, n, samples, seed), batch_size)
            for n in lengths
        }
    return table


def format_table(table: dict[str, dict[int, float]]) -> str:
    """Markdown table, one row per family, exact match in percent."""
    lengths = sorted({n for row in table.values() for n in row})
    lines = [
        "| family | " + " | ".join(str(n) for n in lengths) + " |",
        "|---|" + "---:|" * len(lengths),
    ]
    for family, row in table.items():
        cells = " | ".join(f"{100 * row[n]:.0f}" if n in row else "" for n in lengths)
        lines.append(f"| {family} | {cells} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    from kvpack.eval.model import reference_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="save_pretrained folder (default: reference)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the table here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = reference_model(args.model)
    start = time.monotonic()
    table = accuracy_table(
        model, args.families, args.lengths, args.samples, args.seed, args.batch_size
    )
    print(format_table(table))
    print(f"({args.samples} samples per cell, seed {args.seed}, {time.monotonic() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({fam: {str(n): v for n, v in row.items()} for fam, row in table.items()}, f)


if __name__ == "__main__":
    main()
