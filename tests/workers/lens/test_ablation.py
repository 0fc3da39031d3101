"""Ablation figures against plain forward passes of a model whose W_O columns are scaled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from workers.lens.ablation import ablate
from workers.lens.adapters import adapt
from workers.lens.demo import HEADS, LAYERS, copy_task_examples
from workers.lens.errors import InvalidParameter
from workers.lens.gated_forward import Shortcuts, shortcuts
from workers.lens.loading import LoadedModel, load_model
from workers.lens.results import Progress
from workers.lens.testing import build_tiny_model

PROMPTS = ["The capital of France is", "When Mary and John went to the store, John gave a drink to"]
TARGETS = [" Paris.", " Mary"]
SHAPE = (LAYERS, HEADS)
"""The demo model's layers and heads."""
FAMILIES = ["llama", "gpt2", "gpt_neox", "qwen2_moe", "gemma2", "falcon", "bloom", "mpt"]


def _reference(path: str, prompts: list[str], targets: list[str], mask: torch.Tensor):
    """Per-example target NLL and exact-match accuracy of a model whose W_O input columns
    of head h in layer l are multiplied by mask[l, h]: the same as gating that head."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    adapter = adapt(model)
    with torch.no_grad():
        for layer, parts in enumerate(adapter.blocks):
            scale = mask[layer].repeat_interleave(adapter.head_dim)
            if isinstance(parts.o_proj, Conv1D):
                parts.o_proj.weight.mul_(scale[:, None])
            else:
                parts.o_proj.weight.mul_(scale[None, :])
    nll, correct = [], []
    for prompt, target in zip(prompts, targets, strict=True):
        # The service's default join: a word target gets its space.
        joined = target if target[:1].isspace() else " " + target
        prompt_ids = tok(prompt)["input_ids"]
        ids = tok(prompt + joined)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids, "the test needs a clean boundary"
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        predicting = range(len(prompt_ids) - 1, len(ids) - 1)
        wanted = torch.tensor(ids[len(prompt_ids) :])
        logp = logits[list(predicting)].log_softmax(-1).gather(1, wanted[:, None])
        nll.append(-logp.mean().item())
        correct.append(float((logits[list(predicting)].argmax(-1) == wanted).all()))
    return torch.tensor(nll), torch.tensor(correct)


WRITTEN_OUT = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "olmo", "starcoder2"}
)
"""Families built as ``workers.lens.llama_gated_pass`` assumes (its check runs on each)."""


@pytest.mark.parametrize("family", FAMILIES)
def test_ablate_matches_scaled_weights(family: str, tmp_path: Path) -> None:
    path = str(build_tiny_model(family, tmp_path / family))
    lm = load_model(path)
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(lm.adapter.num_layers, lm.adapter.num_heads, generator=gen)
    mask[0, 0] = 0.0
    result = ablate(lm, PROMPTS, TARGETS, mask, batch_size=2)
    base_nll, base_acc = _reference(path, PROMPTS, TARGETS, torch.ones_like(mask))
    masked_nll, masked_acc = _reference(path, PROMPTS, TARGETS, mask)
    torch.testing.assert_close(result.tensors["nll.baseline"], base_nll, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(result.tensors["nll.masked"], masked_nll, rtol=1e-4, atol=1e-4)
    assert result.tensors["accuracy.baseline"].tolist() == base_acc.tolist()
    assert result.tensors["accuracy.masked"].tolist() == masked_acc.tolist()
    summary = result.summary
    assert summary["baseline_nll"] == pytest.approx(base_nll.mean().item(), rel=1e-4)
    assert summary["delta_nll"] == pytest.approx(summary["masked_nll"] - summary["baseline_nll"])
    assert summary["heads_on"] == lm.adapter.num_layers * lm.adapter.num_heads - 1
    # Bloom and MPT pass per-batch attention biases the shared first attention cannot cut.
    shared = family not in ("bloom", "mpt")
    written_out = family in WRITTEN_OUT
    assert shortcuts(lm) == Shortcuts(shared, True, True, written_out=written_out)


@pytest.fixture(scope="module")
def demo(demo_model_dir: Path) -> LoadedModel:
    return load_model(str(demo_model_dir))


def test_ablate_on_the_demo_model(demo: LoadedModel, demo_model_dir: Path) -> None:
    prompts, targets = copy_task_examples(24, seed=5)
    mask = torch.ones(demo.adapter.num_layers, demo.adapter.num_heads)
    mask[-1] = 0.0  # the layer of the induction heads
    reports: list[Progress] = []
    result = ablate(demo, prompts, targets, mask, batch_size=10, progress=reports.append)
    assert [(r.stage, r.step, r.total) for r in reports] == [("ablate", i, 3) for i in (1, 2, 3)]
    base_nll, base_acc = _reference(str(demo_model_dir), prompts, targets, torch.ones_like(mask))
    masked_nll, masked_acc = _reference(str(demo_model_dir), prompts, targets, mask)
    torch.testing.assert_close(result.tensors["nll.baseline"], base_nll, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(result.tensors["nll.masked"], masked_nll, rtol=1e-4, atol=1e-4)
    assert result.tensors["accuracy.baseline"].tolist() == base_acc.tolist()
    assert result.tensors["accuracy.masked"].tolist() == masked_acc.tolist()
    assert result.summary["baseline_accuracy"] > 0.75
    assert result.summary["delta_nll"] > 1.0
    torch.testing.assert_close(result.tensors["head_mask"], mask)
    assert json.loads(json.dumps(result.summary)) == result.summary


def test_all_heads_on_changes_nothing(demo: LoadedModel) -> None:
    prompts, targets = copy_task_examples(8, seed=6)
    result = ablate(demo, prompts, targets, torch.ones(*SHAPE), batch_size=3)
    summary = result.summary
    # Both conditions run as rows of one batch; kernels may round rows differently.
    assert summary["delta_nll"] == pytest.approx(0.0, abs=1e-5)
    assert summary["delta_accuracy"] == 0.0


@pytest.mark.parametrize(
    ("mask", "kwargs", "field"),
    [
        (torch.ones(SHAPE[0], SHAPE[1] - 1), {}, "head_mask"),
        (torch.full(SHAPE, 1.5), {}, "head_mask"),
        (torch.full(SHAPE, float("nan")), {}, "head_mask"),
        (torch.ones(*SHAPE), {"batch_size": 0}, "batch_size"),
        (torch.ones(*SHAPE), {"max_length": 1}, "max_length"),
    ],
)
def test_invalid_ablations(demo: LoadedModel, mask: torch.Tensor, kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidParameter) as err:
        ablate(demo, ["red cat | red"], [" cat"], mask, **kwargs)
    assert err.value.field == field
    with pytest.raises(InvalidParameter) as err:
        ablate(demo, ["red cat | red", "x"], [" cat"], torch.ones(*SHAPE))
    assert err.value.field == "targets"
