"""Train kvpack's reference Llama on RULER-style tasks with a length curriculum (CPU).

``python -m kvpack.eval.train --out eval/reference --max-minutes 70``

Recipe (what made a ~1M-parameter model learn retrieval on CPU):
- a warm-up on one random chunk repeated (``repeat`` at ``--warmup-length`` tokens) until the
  answer loss shows an induction (match-and-copy) circuit has formed (EMA < ``--warmup-gate``),
  capped at ``--warmup-fraction`` of the run. Measured on a 2-core CPU: at lr 1e-3 the loss on
  predictable tokens starts falling after ~2 M tokens and the committed run passed the 0.3 gate
  after 8.2 M; at 3e-3 the loss sat on the unigram plateau (ln 384 = 5.95) for 3 M tokens and
  more, which is why the default peak lr is 1e-3;
- loss = cross-entropy on the answer tokens + ``lm_weight`` x LM loss on filler (which contains
  copied spans) and needle syntax, never on the random key/value tokens inside needles;
- a curriculum over lengths (128 -> ... -> ``--lengths[-1]``) gated on competence: the run moves
  to the next length only once the in-run monitor (single needle + multi-key exact match at the
  current length) reaches ``--gate``, so a slow, shared CPU never outruns what the model has
  learned. Each step is ~``tokens-per-step`` tokens, half at the current length and half at an
  earlier one so short lengths are not forgotten.
The cosine LR follows progress = max(step / steps, elapsed / max-minutes): on an idle CPU the run
may be step-bound; on a busy, shared CPU the wall-clock cap takes over so the LR decay still
completes (with fewer steps, recorded in ``train_state.json``). Every ``--checkpoint-minutes`` the
monitor runs and a checkpoint (``save_pretrained`` + ``train_state.json``) is written. ``--init``
continues from an earlier checkpoint's weights (and skips the warm-up).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kvpack.eval.tasks import (
    FAMILIES,
    PAD,
    Example,
    make_example,
    make_examples,
    sample_distractors,
)

LR_WARMUP_FRACTION = 0.01
# Retrieval families get full weight; the aggregation tasks are sampled less so they don't eat the
# small CPU budget, and some copy keeps the induction heads sharp.
FAMILY_WEIGHTS = {"vartrack": 0.5, "cwe": 0.15, "fwe": 0.15, "copy": 0.3}
MONITOR_FAMILIES = ("single_filler", "multikey")


def pick_length(stage: int, lengths: Sequence[int], rng: np.random.Generator) -> int:
    """Prompt length for one step: the stage's length or (half the time) an earlier one,
    jittered down by up to a quarter so positions between the grid points are seen too."""
    base = lengths[stage] if rng.random() < 0.5 else lengths[int(rng.integers(0, stage + 1))]
    return int(rng.integers(base * 3 // 4, base + 1))


def pick_family(rng: np.random.Generator) -> str:
    """A family for one training example, at ``FAMILY_WEIGHTS`` (1 where not listed)."""
    families = [*FAMILIES, "copy"]
    weights = np.array([FAMILY_WEIGHTS.get(f, 1.0) for f in families])
    return str(rng.choice(families, p=weights / weights.sum()))


def collate(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded batch.

    Returns ids (B, T) int64, answer_mask and lm_mask (B, T - 1) bool over *targets* ids[:, 1:].
    """
    seqs = [ex.prompt + ex.answer for ex in examples]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    answer_mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    lm_mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, (ex, seq) in enumerate(zip(examples, seqs, strict=True)):
        ids[i, : len(seq)] = torch.tensor(seq)
        lm_mask[i, : len(ex.prompt)] = torch.tensor(ex.lm_mask)
        answer_mask[i, len(ex.prompt) : len(seq)] = True
    return ids, answer_mask[:, 1:], lm_mask[:, 1:]


def lr_at(progress: float, peak: float) -> float:
    if progress < LR_WARMUP_FRACTION:
        return peak * progress / LR_WARMUP_FRACTION
    x = (progress - LR_WARMUP_FRACTION) / (1 - LR_WARMUP_FRACTION)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, x))))


def optimizer(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW as every reference-model run uses it (the LR is set per step by the caller)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)


def train_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    lm_weight: float,
    bf16: bool = False,
) -> tuple[float, float]:
    """One step on a ``collate``d batch: loss = answer cross-entropy + lm_weight x LM
    cross-entropy, gradient norm clipped to 1. Returns (answer loss, LM loss)."""
    ids, answer_mask, lm_mask = batch
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=ids[:, :-1]).logits
    nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
    answer_loss = nll[answer_mask].mean()
    lm_loss = nll[lm_mask].mean()
    loss = answer_loss + lm_weight * lm_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return answer_loss.item(), lm_loss.item()


def save(model: torch.nn.Module, out: Path, state: dict[str, object]) -> None:
    model.save_pretrained(out, safe_serialization=True)  # type: ignore[operator]
    (out / "train_state.json").write_text(json.dumps(state, indent=2) + "\n")


def monitor(model: torch.nn.Module, length: int, samples: int) -> dict[str, float]:
    """Quick exact-match on a few families at ``length`` (fixed seed, so comparable over time)."""
    from kvpack.eval.accuracy import exact_match

    model.eval()
    accs = {
        fam: exact_match(model, make_examples(fam, length, samples, seed=777))  # type: ignore[arg-type]
        for fam in MONITOR_FAMILIES
    }
    model.train()
    return accs


def main(argv: Sequence[str] | None = None) -> None:
    from tqdm import tqdm
    from transformers import LlamaForCausalLM

    from kvpack.eval.model import reference_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--max-minutes", type=float, default=70.0)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--tokens-per-step", type=int, default=4096)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lm-weight", type=float, default=0.5)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument(
        "--bf16", action="store_true", help="bf16 autocast (slower on CPUs without bf16 units)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup-length", type=int, default=64, help="prompt length of the warm-up")
    p.add_argument("--warmup-gate", type=float, default=0.3, help="answer-loss EMA to end it")
    p.add_argument("--warmup-fraction", type=float, default=0.25, help="cap, of progress")
    p.add_argument("--gate", type=float, default=0.8, help="monitor accuracy to lengthen")
    p.add_argument(
        "--gate-families",
        nargs="+",
        default=list(MONITOR_FAMILIES),
        choices=MONITOR_FAMILIES,
        help="monitored families that must all reach --gate",
    )
    p.add_argument("--init", type=Path, default=None, help="start from these weights")
    p.add_argument("--checkpoint-minutes", type=float, default=2.0)
    p.add_argument("--monitor-samples", type=int, default=16)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    config = reference_config(
        args.hidden,
        args.layers,
        args.heads,
        args.kv_heads,
        args.intermediate,
        max_positions=max(4096, max(args.lengths)),
    )
    config._attn_implementation = "sdpa"
    if args.init:
        model = LlamaForCausalLM.from_pretrained(args.init, attn_implementation="sdpa")
    else:
        model = LlamaForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = optimizer(model, args.lr)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{n_params / 1e6:.2f} M parameters; args {vars(args)}", flush=True)

    start = time.monotonic()
    last_ckpt = start
    tokens = 0
    step = 0
    stage = 0
    ema: dict[str, float] = {}
    warmup = args.init is None
    bar = tqdm(total=args.steps, mininterval=15, smoothing=0.05)
    while True:
        elapsed = time.monotonic() - start
        progress = max(step / args.steps, elapsed / (60 * args.max_minutes))
        if progress >= 1:
            break
        if warmup and (progress >= args.warmup_fraction or ema.get("ans", 99.0) < args.warmup_gate):
            warmup = False
            ema.clear()  # the losses of the task mix are not comparable with the warm-up's
            bar.write(f"warm-up done at step {step}, {tokens} tokens", end="\n")
        length = args.warmup_length if warmup else pick_length(stage, args.lengths, rng)
        n_examples = max(1, args.tokens_per_step // length)
        families = (
            ["repeat"] * n_examples if warmup else [pick_family(rng) for _ in range(n_examples)]
        )
        batch = [make_example(f, length, rng, sample_distractors(f, length, rng)) for f in families]
        collated = collate(batch)
        for group in opt.param_groups:
            group["lr"] = lr_at(progress, args.lr)
        answer_loss, lm_loss = train_step(model, opt, collated, args.lm_weight, args.bf16)

        step += 1
        tokens += collated[0].numel()
        for name, value in (("ans", answer_loss), ("lm", lm_loss)):
            ema[name] = value if name not in ema else 0.98 * ema[name] + 0.02 * value
        bar.update(1)
        bar.set_postfix(
            len=length,
            ans=f"{ema['ans']:.3f}",
            lm=f"{ema['lm']:.3f}",
            tok_s=f"{tokens / (time.monotonic() - start):.0f}",
            refresh=False,
        )
        now = time.monotonic()
        if now - last_ckpt > 60 * args.checkpoint_minutes:
            accs_length = args.lengths[stage]
            accs = {} if warmup else monitor(model, accs_length, args.monitor_samples)
            promoted = bool(accs) and min(accs[f] for f in args.gate_families) >= args.gate
            if promoted and stage + 1 < len(args.lengths):
                stage += 1
            state = {
                "step": step,
                "tokens": tokens,
                "elapsed_s": round(now - start),
                "progress": round(progress, 4),
                "warmup": warmup,
                "monitor_length": accs_length,
                "next_length": args.lengths[stage],
                "ema_answer_loss": ema["ans"],
                "ema_lm_loss": ema["lm"],
                "monitor": accs,
                "args": {k: str(v) for k, v in vars(args).items()},
            }
            save(model, args.out, state)
            bar.write(json.dumps({k: state[k] for k in list(state)[:-1]}), end="\n")
            last_ckpt = time.monotonic()
    bar.close()
    elapsed = time.monotonic() - start
    accs = monitor(model, args.lengths[stage], args.monitor_samples)
    state = {
        "final_stage_length": args.lengths[stage],
        "step": step,
        "tokens": tokens,
        "elapsed_s": round(elapsed),
        "tokens_per_s": round(tokens / elapsed),
        "progress": 1.0,
        "parameters": n_params,
        "monitor": accs,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    save(model, args.out, state)
    print(json.dumps(state), flush=True)


if __name__ == "__main__":
    main()
