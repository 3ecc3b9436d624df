"""`kvpack eval`: accuracy against compression on a causal LM (tables, JSON, CSV, PNG plots).

Example (the reference model, every default policy/ratio/mode, in-process codec)::

    kvpack eval --model reference --length 1024 --samples 20 --out eval-out

Writes ``results.json``, ``results.csv`` (one row per task x point, plus task ``all``, the
average over task families), ``results.md`` (tables and the issue #8 targets),
``accuracy_vs_ratio.png`` and ``accuracy_vs_bytes.png``.

Any model, any tasks: ``--model`` takes a Hugging Face causal LM folder and
``--task-generator module:function`` replaces kvpack's synthetic families with your own examples
(prompts in the model's ids, split into context and question by the generator; see
:mod:`kvpack.eval.plugins`).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

from kvpack.eval.tasks import FAMILIES

DEFAULT_POLICIES = "kvpack,kvcompose,kvcompose_uniform,snapkv,tova,pyramidkv,streaming"
DEFAULT_RATIOS = "0.5,0.75,0.875,0.9375"
# No full-precision windows: the question is not part of the compressed context, and windows of
# 128/256 tokens would hold a third of a 1k-token cache in fp16. block=32 keeps short composite
# layers (high eviction ratios) quantised instead of falling back to the full-precision tail.
#: `--dtype` choices: torch dtype names, or "auto" for the checkpoint's own.
DTYPES = ("float32", "bfloat16", "float16", "auto")
DEFAULT_QUANTS = [
    "eb=K:0.05,V:0.1,kwin=0,vwin=0",
    "eb=K:0.1,V:0.2,kwin=0,vwin=0",
    "eb=K:0.1,V:0.2,kwin=0,vwin=0,block=32",
    "eb=K:0.2,V:0.4,kwin=0,vwin=0,block=32",
]
DEFAULT_MODES = "evict,lossy,fixed,evict+lossy"
DEFAULT_TARGETS = "16,32"


def parse_quant(text: str) -> Any:
    """``eb=K:0.05,V:0.1[,kwin=N,vwin=N,block=N,group=channel|block,entropy=...]`` -> Quant.

    ``eb=X`` sets both bounds; ``K:``/``V:`` items after ``eb=`` set one each; the other items
    are ``QuantSettings`` fields by their short option names (``codec.quant_settings``'s
    SHORT_NAMES) or their own. Unset fields keep the codec's defaults.
    """
    from kvpack.codec.quant_settings import BOTH_BOUNDS, QuantSettings, option_name
    from kvpack.eval.runner import Quant

    items: list[tuple[str, str]] = []
    for raw in text.split(","):
        item = raw.strip().removeprefix(f"{BOTH_BOUNDS}=")
        name, sep, value = item.partition(":" if item[:2] in ("K:", "V:") else "=")
        if not sep:
            if not raw.strip().startswith(f"{BOTH_BOUNDS}="):
                raise argparse.ArgumentTypeError(f"--quant: cannot parse {raw!r} in {text!r}")
            name, value = BOTH_BOUNDS, item
        items.append((name, value))
    try:
        full, settings = QuantSettings.from_options(items)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--quant {text!r}: {e}") from e
    label = f"K{full.k_error_bound:g}/V{full.v_error_bound:g}"
    bounds = ("k_error_bound", "v_error_bound")
    extra = [f"{option_name(f)}={v}" for f, v in settings.items() if f not in bounds]
    return Quant(label + "".join(f",{e}" for e in extra), settings)


def _csv(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]

    return parse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0] if __doc__ else None
    parser.add_argument("--model", default="reference", help="HF causal LM folder or 'reference'")
    parser.add_argument(
        "--tasks",
        type=_csv(str),
        default=None,
        help="comma list (default: every kvpack family, or the --task-generator's own list)",
    )
    parser.add_argument(
        "--task-generator",
        default=None,
        metavar="MODULE:FUNCTION",
        help="examples from this callable instead of kvpack's synthetic families: "
        "fn(task=, length=, n=, seed=, model=) -> list of kvpack.eval.tasks.Example in the "
        "model's token ids (see kvpack.eval.plugins)",
    )
    parser.add_argument("--length", type=int, default=1024, help="prompt tokens per example")
    parser.add_argument("--samples", type=int, default=20, help="examples per task family")
    parser.add_argument(
        "--policies",
        type=_csv(str),
        default=_csv(str)(DEFAULT_POLICIES),
        help="eviction policies, comma list; name:setting=value:... sets a policy's settings "
        f"(e.g. kvpack:allocation=mass:floor=0.5) and labels its rows (default {DEFAULT_POLICIES})",
    )
    parser.add_argument(
        "--ratios",
        type=_csv(float),
        default=_csv(float)(DEFAULT_RATIOS),
        help="fractions of tokens evicted",
    )
    parser.add_argument(
        "--targets",
        type=_csv(float),
        default=_csv(float)(DEFAULT_TARGETS),
        help="budget mode (--modes budget): x smaller than fp16, each with every "
        f"--combo-policies policy (default {DEFAULT_TARGETS})",
    )
    parser.add_argument(
        "--quant",
        type=parse_quant,
        action="append",
        default=None,
        help=f"lossy setting (repeat to sweep); default {' '.join(DEFAULT_QUANTS)}",
    )
    parser.add_argument(
        "--modes",
        type=_csv(str),
        default=_csv(str)(DEFAULT_MODES),
        help="evict, lossy, fixed, evict+lossy, budget (the uncompressed baseline always runs)",
    )
    parser.add_argument(
        "--combo-policies",
        type=_csv(str),
        default=["kvpack"],
        help="policies combined with every --quant in evict+lossy",
    )
    parser.add_argument(
        "--stats",
        choices=("agnostic", "aware", "window"),
        default="agnostic",
        help="KVCompose's statistics",
    )
    parser.add_argument(
        "--server",
        default=None,
        metavar="ADDR",
        help="compress through this kvpack server (default in-process)",
    )
    parser.add_argument("--token", default=None, help="bearer token for --server")
    parser.add_argument("--seed", type=int, default=1234, help="task generator seed")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="weights and activations (default float32, whatever the checkpoint holds: fp16 "
        "matmuls on CPU are slow and lose accuracy; 'auto' keeps the checkpoint's dtype)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("kvpack-eval"), help="output folder")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_model(name: str, device: str, dtype: str = "float32") -> Any:
    """The reference model, or any HF causal LM folder/hub id, in eval mode on ``device`` in
    ``dtype`` (one of :data:`DTYPES`; "auto" keeps the checkpoint's)."""
    from kvpack.eval.model import reference_model

    model: Any
    if name == "reference":
        model = reference_model()
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa")
        model = model.eval()
    if dtype != "auto":
        import torch

        model = model.to(getattr(torch, dtype))
    return model.to(device)


def plots_unavailable() -> str | None:
    """Why the PNG plots cannot be drawn (matplotlib missing), or None: checked before a run of
    minutes, not after it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "PNG plots need matplotlib: pip install 'kvpack[eval]', or pass --no-plots"
    return None


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from kvpack.client import KVPackClient, LocalKVPack
    from kvpack.eval import plugins, report
    from kvpack.eval.runner import MODES, EvalConfig, run_eval

    bad = [m for m in args.modes if m not in MODES]
    if bad:
        print(f"kvpack eval: unknown modes {bad}; known: {list(MODES)}", file=sys.stderr)
        return 2
    generator = None
    try:
        if args.task_generator is not None:
            generator = plugins.load_generator(args.task_generator)
            tasks = args.tasks or plugins.default_tasks(generator, args.task_generator)
        else:
            tasks = args.tasks or list(FAMILIES)
            plugins.check_builtin_tasks(tasks)
    except ValueError as e:
        print(f"kvpack eval: {e}", file=sys.stderr)
        return 2
    missing = None if args.no_plots else plots_unavailable()
    if missing:
        print(f"kvpack eval: {missing}", file=sys.stderr)
        return 2
    if args.device == "cpu" and args.dtype == "float16":
        print("kvpack eval: warning: float16 on CPU is slow and less accurate", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = EvalConfig(
            tasks=tasks, length=args.length, samples=args.samples, policies=args.policies,
            ratios=args.ratios, quants=args.quant or [parse_quant(q) for q in DEFAULT_QUANTS],
            modes=args.modes, combo_policies=args.combo_policies, stats=args.stats, seed=args.seed,
            targets=args.targets,
        )  # fmt: skip
    except ValueError as e:
        print(f"kvpack eval: {e}", file=sys.stderr)
        return 2
    start = time.monotonic()
    model = load_model(args.model, args.device, args.dtype)
    try:
        if generator is None:
            examples = plugins.builtin_examples(
                tasks, length=args.length, n=args.samples, seed=args.seed
            )
        else:
            examples = plugins.plugin_examples(
                generator, args.task_generator, tasks, length=args.length, n=args.samples,
                seed=args.seed, model=args.model, vocab_size=int(model.config.vocab_size),
            )  # fmt: skip
    except ValueError as e:
        print(f"kvpack eval: {e}", file=sys.stderr)
        return 2
    total = sum(len(v) for v in examples.values()) * len(config.points)
    client = LocalKVPack() if args.server is None else KVPackClient(args.server, token=args.token)
    with client, tqdm(total=total, unit="pt", disable=args.no_progress, file=sys.stderr) as bar:

        def progress(task: str) -> None:
            bar.set_postfix_str(task, refresh=False)
            bar.update()

        results = run_eval(
            model, client, config, examples, progress, task_vocabulary=generator is None
        )
    wall = time.monotonic() - start
    rows = report.aggregate(results)

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "kvpack " + " ".join(sys.argv[1:]),
        "model": args.model,
        "tasks": tasks,
        "task_generator": args.task_generator or "kvpack.eval.tasks",
        "length": args.length,
        "samples_per_task": args.samples,
        "stats": args.stats,
        "seed": args.seed,
        "backend": args.server or "in-process",
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, {args.device}",
        "wall_seconds": round(wall, 1),
    }
    report.write_json(args.out / "results.json", rows, meta)
    report.write_csv(args.out / "results.csv", rows)
    high = max((r for r in args.ratios if r <= 0.875), default=args.ratios[-1])
    markdown = "\n\n".join(
        [
            "Accuracy (%) by eviction policy and token ratio, average over task families:",
            report.eviction_table(rows),
            f"Accuracy (%) per task family at ratio {high:g} (eviction only):",
            report.family_table(rows, high),
            "Every point (average over task families; ± = binomial standard error):",
            report.bytes_table(rows),
            *(
                [
                    "Budget mode against the best fixed point storing no more (average over "
                    "task families):",
                    report.budget_table(rows, results),
                ]
                if any(r.mode == "budget" for r in rows)
                else []
            ),
            "Targets:",
            report.headline(rows),
        ]
    )
    (args.out / "results.md").write_text(markdown + "\n")
    print("\n" + markdown)
    if report.baseline_too_low(rows):
        print(f"kvpack eval: warning: {report.LOW_BASELINE}", file=sys.stderr)
    if not args.no_plots:
        from kvpack.eval import plots

        plots.accuracy_vs_ratio(rows, args.out / "accuracy_vs_ratio.png")
        plots.accuracy_vs_bytes(rows, args.out / "accuracy_vs_bytes.png")
    print(f"\n{len(results)} point evaluations in {wall:.0f} s; wrote {args.out}/")
    return 0
