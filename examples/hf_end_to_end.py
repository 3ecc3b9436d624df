"""End to end with Hugging Face transformers: a retrieval prompt survives compression.

The reference model (a 1 M-parameter Llama shipped with kvpack, trained to retrieve needles; see
kvpack/eval/reference/README.md) reads a long context holding one ``KEY k1 k2 IS v1 v2``
needle. The context is prefilled once; kvpack then compresses that one prefill at several
eviction ratios (KVCompose on task-agnostic statistics, lossy encoding), stores each container on
a kvpack server, fetches it back, and the model answers the question from the decoded cache.
Runs offline; without --target it starts a kvpack server on a free loopback port. Not every
prompt survives every ratio: docs/QUALITY.md gives the accuracy per policy and ratio (97.5 % of
these prompts at 0.875 with the default policy, 65 % with KVCompose); --seed picks another one.

    python examples/hf_end_to_end.py                       # own server, 2048-token prompt
    python examples/hf_end_to_end.py --target 127.0.0.1:50051 --ratios 0.5,0.875
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from kvpack.client import KVPackClient
from kvpack.client.hf import compress_prefilled, generate_from, prefill, tensors_to_cache
from kvpack.eval.model import reference_model
from kvpack.eval.tasks import make_example

#: Lossy settings for storage: error bounds relative to each group's range, no fp16 windows.
QUANT = {"mode": "lossy", "k_error_bound": 0.1, "v_error_bound": 0.2, "k_window": 0, "v_window": 0}


@contextmanager
def local_server() -> Iterator[str]:
    """A kvpack server on 127.0.0.1 (free port) in a background thread; yields its address."""
    from kvpack.server.app import KVPackServer
    from kvpack.server.config import ServerConfig

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> KVPackServer:
        server = KVPackServer(ServerConfig(host="127.0.0.1", port=0, metrics_port=0))
        await server.start()
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result()
    try:
        yield server.address
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace=1.0), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def run(target: str, ratios: list[float], length: int, seed: int) -> int:
    """Answers the question from each fetched cache; returns how many ratios answered right."""
    import numpy as np

    model = reference_model()
    example = make_example("single_filler", length, np.random.default_rng(seed))
    n = example.context_len
    context = torch.tensor([example.prompt[:n]])
    question = torch.tensor([example.prompt[n:]])
    print(f"prompt: {length} tokens, the needle's value is {example.answer}")

    pre = prefill(model, context)  # one prefill and its statistics for every ratio below
    right = 0
    with KVPackClient(target) as client:
        print(f"server {target}: kvpack {client.info().version}")
        for ratio in ratios:
            _, result = compress_prefilled(pre, client, ratio=ratio, quant=QUANT)
            fetched = client.fetch(result.key)  # what a worker restores from kvpack
            cache = tensors_to_cache(list(fetched.keys), list(fetched.values))
            answer = generate_from(model, cache, question, len(example.answer), n)[0].tolist()
            ok = answer == example.answer
            right += ok
            kept = [s.kept_tokens for s in result.layers]
            print(
                f"ratio {ratio:<6g} kept {kept} of {n} tokens per layer, stored "
                f"{result.stored_bytes:>7} bytes ({result.compression_ratio:5.1f}x smaller than "
                f"fp16): answer {answer} {'right' if ok else 'WRONG'}"
            )
            client.delete(result.key)
    print(f"{right}/{len(ratios)} compressed caches answered right")
    return right


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="kvpack server host:port (default: start one here)")
    parser.add_argument(
        "--ratios", default="0,0.5,0.75,0.875", help="fractions of tokens evicted, comma list"
    )
    parser.add_argument("--length", type=int, default=2048, help="prompt tokens")
    parser.add_argument("--seed", type=int, default=2, help="which retrieval example")
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    if args.target:
        run(args.target, ratios, args.length, args.seed)
    else:
        with local_server() as address:
            run(address, ratios, args.length, args.seed)


if __name__ == "__main__":
    main()
