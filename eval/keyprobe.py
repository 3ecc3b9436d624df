"""Probe: fine-tune a checkpoint on a multi-key-heavy mix and watch whether key matching appears.

``python -m kvpack.eval.keyprobe --init eval/reference --minutes 30 --threads 2``

The reference model (issue #7) retrieves single needles but answers multi-key questions at
chance. This probe is the short experiment behind the model card's "Not learned" section: short
prompts (``--min-len``..``--max-len`` tokens) where a fraction ``--mk`` of the examples are
multi-key needles with 1..capacity distractors (``--dense`` of them packed with at least half the
needles that fit, little filler), the rest single needles in filler (up to ``--sf``) and
repeat/copy. Every ``--every`` seconds it prints exact match (fixed seeds) on multi-key at 128
tokens with 2 distractors (chance 1/3) and with the default 8, at 512 tokens, and single-needle
at 128, as one JSON line. ``--key-len 1`` switches the generator to one-token keys (a format
change, so the checkpoint's single-needle accuracy drops at first). ``--init fresh`` starts from
random weights.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from kvpack.eval import tasks


def _example(args: argparse.Namespace, length: int, rng: np.random.Generator) -> tasks.Example:
    r = rng.random()
    if r < args.mk:
        overhead, item = tasks._layout("multikey")
        cap = (length - overhead) // item
        if rng.random() < args.dense:
            d = int(rng.integers(max(1, cap // 2), cap + 1))
        else:
            d = int(rng.integers(1, max(2, cap // 2 + 1)))
        return tasks.make_example("multikey", length, rng, d)
    family = "single_filler" if r < args.sf else ("repeat" if r < 0.9 else "copy")
    return tasks.make_example(family, length, rng)


def _monitor(model: torch.nn.Module) -> dict[str, float]:
    from kvpack.eval.accuracy import exact_match

    model.eval()
    out = {
        "mk128_d2": exact_match(model, tasks.make_examples("multikey", 128, 48, 5, 2)),  # type: ignore[arg-type]
        "mk128": exact_match(model, tasks.make_examples("multikey", 128, 48, 5)),  # type: ignore[arg-type]
        "mk512": exact_match(model, tasks.make_examples("multikey", 512, 32, 5)),  # type: ignore[arg-type]
        "sf128": exact_match(model, tasks.make_examples("single_filler", 128, 32, 5)),  # type: ignore[arg-type]
    }
    model.train()
    return out


def main(argv: Sequence[str] | None = None) -> None:
    from transformers import LlamaForCausalLM

    from kvpack.eval.model import reference_config
    from kvpack.eval.train import collate, optimizer, train_step

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init", default="eval/reference", help="checkpoint folder, or 'fresh'")
    p.add_argument("--out", type=Path, default=None, help="save the weights here as it goes")
    p.add_argument("--minutes", type=float, default=12.0)
    p.add_argument("--every", type=float, default=120.0, help="seconds between monitor lines")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--key-len", type=int, default=tasks.KEY_LEN)
    p.add_argument("--mk", type=float, default=0.6, help="fraction of multi-key examples")
    p.add_argument("--sf", type=float, default=0.8, help="multi-key + single-needle fraction")
    p.add_argument("--dense", type=float, default=0.5, help="multi-key packed with needles")
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=128)
    args = p.parse_args(argv)

    # The generator reads these module constants at call time; only this probe changes them.
    tasks.KEY_LEN = args.key_len
    tasks.NEEDLE_LEN = 3 + args.key_len + tasks.VALUE_LEN
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    if args.init == "fresh":
        config = reference_config()
        config._attn_implementation = "sdpa"
        model = LlamaForCausalLM(config)
    else:
        model = LlamaForCausalLM.from_pretrained(args.init, attn_implementation="sdpa")
    model.train()
    opt = optimizer(model, args.lr)
    start = last = time.monotonic()
    step = 0
    print(json.dumps({"t": 0, "step": 0, **_monitor(model)}), flush=True)
    while time.monotonic() - start < 60 * args.minutes:
        length = int(rng.integers(args.min_len, args.max_len + 1))
        batch = collate([_example(args, length, rng) for _ in range(4096 // length)])
        answer_loss, _ = train_step(model, opt, batch, lm_weight=0.5)
        step += 1
        if time.monotonic() - last > args.every:
            last = time.monotonic()
            line = {
                "t": round(last - start),
                "step": step,
                "ans": round(answer_loss, 3),
            }
            print(json.dumps({**line, **_monitor(model)}), flush=True)
            if args.out:
                model.save_pretrained(args.out)
    print(
        json.dumps({"t": round(time.monotonic() - start), "step": step, **_monitor(model)}),
        flush=True,
    )
    if args.out:
        model.save_pretrained(args.out)


if __name__ == "__main__":
    main()
