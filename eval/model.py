"""kvpack's reference model: a small Llama trained in-repo on RULER-style retrieval (issue #7).

transformers is imported lazily so ``import kvpack.eval`` stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kvpack.eval.tasks import BOS, EOS, PAD, VOCAB_SIZE

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


def reference_config(
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 384,
    max_positions: int = 4096,
    rope_theta: float = 10000.0,
) -> LlamaConfig:
    """Llama config for the synthetic vocabulary of ``kvpack.eval.tasks`` (RoPE, GQA)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )


def reference_model_path() -> Path:
    """Folder of the committed reference weights (``save_pretrained`` layout)."""
    return REFERENCE_DIR


def reference_model(path: str | Path | None = None) -> LlamaForCausalLM:
    """Load the reference model (fp32, eval mode) from ``path`` or the committed weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path or REFERENCE_DIR, dtype="float32", attn_implementation="sdpa"
    )
    return model.eval()
