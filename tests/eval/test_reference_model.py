"""The committed reference model loads with plain transformers and really retrieves."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvpack.eval import reference_model, reference_model_path  # noqa: E402
from kvpack.eval.accuracy import correct, exact_match  # noqa: E402
from kvpack.eval.model import reference_config  # noqa: E402
from kvpack.eval.tasks import make_examples  # noqa: E402

if TYPE_CHECKING:
    from transformers import PreTrainedModel

THRESHOLD = 4  # of 5: the trained model clearly passes, a random init scores 0


@pytest.fixture(scope="module")
def model() -> PreTrainedModel:
    torch.set_num_threads(2)
    return reference_model()


def test_loads_with_auto_model() -> None:
    m = transformers.AutoModelForCausalLM.from_pretrained(reference_model_path())
    assert m.config.model_type == "llama"
    assert m.config.num_key_value_heads < m.config.num_attention_heads  # grouped-query attention
    weights = reference_model_path() / "model.safetensors"
    assert weights.stat().st_size < 20 * 2**20


@pytest.mark.parametrize("task", ["single_filler", "single_repeat", "multikey"])
def test_answers_short_examples(model: PreTrainedModel, task: str) -> None:
    assert not model.training
    examples = make_examples(task, 256, 5, seed=42)
    assert sum(correct(model, examples)) >= THRESHOLD


def test_random_init_fails() -> None:
    torch.manual_seed(0)
    config = reference_config()
    random_model = transformers.LlamaForCausalLM(config).eval()
    assert exact_match(random_model, make_examples("single_filler", 256, 5, seed=42)) < 0.2
