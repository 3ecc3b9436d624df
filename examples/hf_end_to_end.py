"""End to end with Hugging Face transformers: prefill, compress on a kvpack server, generate
from the composite cache, fetch the offloaded entry back and compare.

Runs offline: the model is a small Llama-architecture network with random weights (fixed seed),
built here. Without --target the script starts an in-process server on a free loopback port.

    python examples/hf_end_to_end.py                      # own server
    python examples/hf_end_to_end.py --target 127.0.0.1:50051 --ratio 0.75
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvpack.client import KVPackClient
from kvpack.client.hf import compress_prefill, generate_from
from kvpack.client.hf.cache import output_cache


def build_model() -> LlamaForCausalLM:
    """4 layers, hidden 256, 8 query / 2 KV heads (GQA), vocab 1000; random weights."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


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


def run(target: str, ratio: float, context_len: int, new_tokens: int) -> None:
    model = build_model()
    generator = torch.Generator().manual_seed(1)
    context = torch.randint(0, 1000, (1, context_len), generator=generator)
    question = torch.randint(0, 1000, (1, 8), generator=generator)
    print(f"model: Llama {model.config.num_hidden_layers} layers, context {context_len} tokens")

    with KVPackClient(target) as client:
        print(f"server {target}: kvpack {client.info().version}")
        cache, result = compress_prefill(
            model, context, client, ratio=ratio, mode="agnostic", key="example/context"
        )
        kept = [s.kept_tokens for s in result.layers]
        print(
            f"compressed: ratio {ratio} -> kept tokens per layer {kept} "
            f"({result.token_ratio:.1%} of entries removed); stored {result.stored_bytes} bytes "
            f"under {result.key!r} ({result.compression_ratio:.2f}x vs {result.input_bytes})"
        )

        with torch.no_grad():
            full = output_cache(model(input_ids=context, use_cache=True))
        reference = generate_from(model, full, question, new_tokens, context_len)
        composite = generate_from(model, cache, question, new_tokens, context_len)
        same = int((reference == composite).sum())
        print(f"generation, full cache:      {reference.tolist()[0]}")
        print(f"generation, composite cache: {composite.tolist()[0]}")
        print(
            f"{same}/{new_tokens} tokens agree (random weights: agreement is not a quality score)"
        )

        fetched = client.fetch(result.key)
        errors = [
            float((f.float() - k.float()).abs().max())
            for f, k in zip(fetched.keys, result.keys, strict=True)
        ]
        print(f"fetched {len(fetched.layers)} layers; max |K - decoded K| per layer: {errors}")
        bounds = [s.key_max_abs_error for s in result.layers]
        print(f"server-reported bounds:                       {bounds}")
        client.delete(result.key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="kvpack server host:port (default: start one here)")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of entries removed")
    parser.add_argument("--context-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    if args.target:
        run(args.target, args.ratio, args.context_len, args.new_tokens)
    else:
        with local_server() as address:
            run(address, args.ratio, args.context_len, args.new_tokens)


if __name__ == "__main__":
    main()
