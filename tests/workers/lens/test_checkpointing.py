"""Gradient checkpointing of the gate fits: the same gate gradients and the same fits
with it as without, in each pass a family may take (the written-out Llama-style pass,
the stock forward under hooks, per-layer head widths, mixture-of-experts), and the
blocks really recomputed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from workers.lens.cchg import fit_cchg
from workers.lens.chg import fit_chg
from workers.lens.errors import InvalidParameter
from workers.lens.gate_fit import score_targets
from workers.lens.gated_forward import shortcuts
from workers.lens.loading import LoadedModel, load_model
from workers.lens.prompt_targets import encode_prompt_targets
from workers.lens.testing import build_tiny_model

PROMPTS = ["The capital of France is", "One two three", "a b a. c d", "Rome is in"]
TARGETS = [" Paris.", " four five", " c.", " Italy"]
FAMILIES = ("llama", "gpt2", "gpt_neox", "gemma4_text", "mixtral")
"""Llama takes the written-out pass; GPT-2 the stock forward under hooks with every
shortcut; GPT-NeoX parallel blocks; Gemma 4 heads of two widths; Mixtral experts."""
OFF = 10_000
TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    root = tmp_path_factory.mktemp("ckpt")
    return {f: load_model(str(build_tiny_model(f, Path(root) / f))) for f in FAMILIES}


@contextmanager
def counting_block_calls(lm: LoadedModel) -> Iterator[list[int]]:
    """Counts the calls of the last block's MLP (each pass, each recomputation)."""
    calls: list[int] = []
    handle = lm.adapter.blocks[-1].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def gate_gradient(lm: LoadedModel, checkpoint_above: int) -> tuple[torch.Tensor, int]:
    """d(NLL)/d(gates) of three gate sets on the prompts, and the last MLP's calls."""
    batch = encode_prompt_targets(lm.tokenizer, PROMPTS, TARGETS, lm.device)
    gen = torch.Generator().manual_seed(0)
    gates = torch.rand(3, lm.adapter.num_layers, lm.adapter.num_heads, generator=gen)
    gates.requires_grad_(True)
    with counting_block_calls(lm) as calls:
        scores = score_targets(lm, batch, gates, checkpoint_above)
        (-scores.logprob.mean(dim=1)).sum().backward()
    assert gates.grad is not None
    return gates.grad, len(calls)


@pytest.mark.parametrize("family", FAMILIES)
def test_gate_gradients_are_the_same_checkpointed(
    models: dict[str, LoadedModel], family: str
) -> None:
    lm = models[family]
    shortcuts(lm)  # its one-time check runs passes of its own, not counted
    plain, plain_calls = gate_gradient(lm, OFF)
    ckpt, ckpt_calls = gate_gradient(lm, 1)
    assert plain_calls == 1 and ckpt_calls == 2, "checkpointed: the backward recomputes"
    assert plain.abs().sum() > 0
    torch.testing.assert_close(ckpt, plain, **TOL)
    assert_left_unchanged(lm)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_chg_fit_is_the_same_checkpointed(models: dict[str, LoadedModel], family: str) -> None:
    lm = models[family]
    args = {"num_masks": 2, "num_updates": 2, "num_reg_updates": 1, "batch_size": 2, "seed": 3}
    plain = fit_chg(lm, PROMPTS, TARGETS, **args, checkpoint_above=OFF)
    with counting_block_calls(lm) as calls:
        ckpt = fit_chg(lm, PROMPTS, TARGETS, **args, checkpoint_above=1)
    # Each of the 3 updates runs the last block once and recomputes it once.
    assert len(calls) == 2 * 3
    for name in ("masks.none", "masks.positive", "masks.negative", "gate_signal", "nll.none"):
        torch.testing.assert_close(ckpt.tensors[name], plain.tensors[name], **TOL)
    assert_left_unchanged(lm)


def test_cchg_fit_is_the_same_checkpointed(models: dict[str, LoadedModel]) -> None:
    lm = models["gpt_neox"]
    pairs = (PROMPTS[:2], TARGETS[:2], PROMPTS[2:], TARGETS[2:])
    args = {"num_masks": 2, "num_updates": 3, "batch_size": 2, "seed": 5}
    plain = fit_cchg(lm, *pairs, **args, checkpoint_above=OFF)
    ckpt = fit_cchg(lm, *pairs, **args, checkpoint_above=1)
    for name in ("masks.contrastive", "nll.retain", "nll.forget"):
        torch.testing.assert_close(ckpt.tensors[name], plain.tensors[name], **TOL)
    assert_left_unchanged(lm)


def test_checkpoint_above_must_be_positive(models: dict[str, LoadedModel]) -> None:
    with pytest.raises(InvalidParameter, match="checkpoint_above"):
        fit_chg(models["llama"], PROMPTS, TARGETS, num_updates=1, checkpoint_above=0)


def assert_left_unchanged(lm: LoadedModel) -> None:
    for module in lm.model.modules():
        assert "forward" not in module.__dict__
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert all(p.grad is None for p in lm.model.parameters())
