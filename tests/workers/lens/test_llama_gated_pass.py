"""The written-out gated pass against the stock forward under gate hooks: logits and
gate gradients, on every kind of Llama-style block it takes, and the models it refuses."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from workers.lens import llama_gated_pass
from workers.lens.gated_forward import gated_logits, shortcuts
from workers.lens.gating import head_gates
from workers.lens.loading import LoadedModel, load_model
from workers.lens.testing import build_tiny_model

KEPT = 4
PICK = torch.tensor([[0, 3], [2, 3], [1, 1]])
"""Three rows, two picks each within the last ``KEPT`` positions (a repeat included)."""


def _reference(lm: LoadedModel, ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Logits [sets * rows, picks, vocab] from the stock forward with one gate set per row."""
    sets, rows = gates.shape[0], ids.shape[0]
    with head_gates(lm.adapter, gates.repeat_interleave(rows, dim=0)):
        logits = lm.model(input_ids=ids.repeat(sets, 1), use_cache=False).logits[:, -KEPT:]
    pick = PICK.repeat(sets, 1)
    return logits.gather(1, pick[..., None].expand(-1, -1, logits.shape[-1]))


def _inputs(lm: LoadedModel, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(lm.adapter.vocab_size, (3, seq), generator=gen)
    shape = (4, lm.adapter.num_layers, lm.adapter.num_heads)
    return ids, torch.randn(shape, generator=gen).requires_grad_(True)


def _assert_same_pass(lm: LoadedModel, seq: int) -> None:
    ids, logits = _inputs(lm, seq)
    want = _reference(lm, ids, logits.sigmoid())
    (want_grad,) = torch.autograd.grad(want.log_softmax(-1)[..., 0].sum(), logits)
    got = llama_gated_pass.gated_logits(lm, ids, logits.sigmoid(), KEPT, PICK)
    (got_grad,) = torch.autograd.grad(got.log_softmax(-1)[..., 0].sum(), logits)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mixtral", "gemma", "starcoder2"])
def test_matches_the_stock_forward(family: str, tmp_path: Path) -> None:
    """GQA (llama), q/k norms (qwen3), a routed MLP (mixtral), scaled embeddings (gemma),
    biases and LayerNorm (starcoder2)."""
    lm = load_model(str(build_tiny_model(family, tmp_path)))
    assert llama_gated_pass.applies(lm) and shortcuts(lm).written_out
    _assert_same_pass(lm, seq=8)


def test_one_layer_model(tmp_path: Path) -> None:
    """The first gated layer is also the last: shared rows and picked queries at once."""
    source = build_tiny_model("llama", tmp_path / "two")
    config = AutoConfig.from_pretrained(source)
    config.num_hidden_layers = 1
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "one")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, tmp_path / "one" / name)
    lm = load_model(str(tmp_path / "one"))
    assert lm.adapter.num_layers == 1 and shortcuts(lm).written_out
    _assert_same_pass(lm, seq=7)


@pytest.mark.parametrize("family", ["gpt2", "olmo2", "phi3", "gemma2", "cohere"])
def test_other_blocks_are_refused(family: str, tmp_path: Path) -> None:
    lm = load_model(str(build_tiny_model(family, tmp_path)))
    assert not llama_gated_pass.applies(lm)
    assert not shortcuts(lm).written_out


def test_past_a_sliding_window_the_hooked_pass_runs(tmp_path: Path) -> None:
    """The tiny Mistral has an 8-token window: longer inputs must not take this pass."""
    lm = load_model(str(build_tiny_model("mistral", tmp_path)))
    assert llama_gated_pass.covers(lm, 8) and not llama_gated_pass.covers(lm, 12)
    ids, logits = _inputs(lm, 12)
    with torch.no_grad():
        got = gated_logits(lm, ids, logits.sigmoid(), KEPT, PICK)
        torch.testing.assert_close(got, _reference(lm, ids, logits.sigmoid()))
