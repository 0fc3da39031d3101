"""head_gates() against hand-written hooks on W_O's input, and against hand-written autograd."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from workers.lens.errors import InvalidParameter
from workers.lens.gate_fit import GateUpdates, clamped_logit_mean
from workers.lens.gating import head_gates
from workers.lens.loading import LoadedModel, load_model
from workers.lens.testing import build_tiny_model

TEXTS = ["The capital of France is Paris", "a b a", "One two three"]
# Llama (GQA), Qwen3 (heads * head_dim != hidden) and GPT-2 (Conv1D c_proj).
O_PROJ = {
    "llama": "model.layers.{}.self_attn.o_proj",
    "qwen3": "model.layers.{}.self_attn.o_proj",
    "gpt2": "transformer.h.{}.attn.c_proj",
}


@pytest.fixture(scope="module", params=list(O_PROJ))
def lm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = build_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    return load_model(str(path), device="cpu", dtype="float32")


def o_proj(lm: LoadedModel, layer: int) -> nn.Module:
    return lm.model.get_submodule(O_PROJ[lm.model.config.model_type].format(layer))


def encode(lm: LoadedModel, texts: list[str] = TEXTS) -> dict[str, torch.Tensor]:
    enc = lm.tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def logits(lm: LoadedModel, texts: list[str] = TEXTS) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(**encode(lm, texts)).logits


@contextmanager
def scaled_by_hand(lm: LoadedModel, gates: torch.Tensor) -> Iterator[None]:
    """Scale each head's columns of W_O's input, one head at a time, with plain indexing."""
    config = lm.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def hook_for(layer: int):
        def hook(_m: nn.Module, args: tuple) -> tuple:
            x = args[0].clone()
            for head in range(gates.shape[1]):
                x[..., head * head_dim : (head + 1) * head_dim] *= gates[layer, head]
            return (x, *args[1:])

        return hook

    handles = [o_proj(lm, i).register_forward_pre_hook(hook_for(i)) for i in range(gates.shape[0])]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def shape(lm: LoadedModel) -> tuple[int, int]:
    return lm.adapter.num_layers, lm.adapter.num_heads


def test_open_gates_change_nothing(lm: LoadedModel) -> None:
    base = logits(lm)
    with head_gates(lm.adapter, torch.ones(shape(lm))):
        torch.testing.assert_close(logits(lm), base, atol=0, rtol=0)


def test_gates_equal_scaling_each_heads_slice_by_hand(lm: LoadedModel) -> None:
    gates = torch.rand(shape(lm), generator=torch.Generator().manual_seed(0))
    gates[1, 0] = 0
    with head_gates(lm.adapter, gates):
        gated = logits(lm)
    with scaled_by_hand(lm, gates):
        expected = logits(lm)
    torch.testing.assert_close(gated, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(gated, logits(lm), atol=1e-3)


def test_per_row_gates_equal_separate_runs(lm: LoadedModel) -> None:
    gates = torch.rand(len(TEXTS), *shape(lm), generator=torch.Generator().manual_seed(1))
    with head_gates(lm.adapter, gates):
        together = logits(lm)
    lengths = encode(lm)["attention_mask"].sum(1)
    for row, text in enumerate(TEXTS):
        with head_gates(lm.adapter, gates[row]):
            alone = logits(lm, [text])[0]
        n = int(lengths[row])
        torch.testing.assert_close(together[row, :n], alone[:n], atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_gates(lm: LoadedModel) -> None:
    enc = encode(lm)
    last = enc["attention_mask"].sum(1) - 1
    rows = torch.arange(len(TEXTS))
    gates = torch.ones(shape(lm), requires_grad=True)
    with head_gates(lm.adapter, gates):
        out = lm.model(**enc).logits
    target = out[rows, last].log_softmax(-1)[:, 3].sum()
    (grad,) = torch.autograd.grad(target, gates)

    # By hand: at gates 1, d target / d g[l, h] = <x_lh, d target / d x_lh> at W_O's input x_l,
    # with x_l in the graph through embeddings that require grad.
    seen: dict[int, torch.Tensor] = {}
    layers, heads = shape(lm)
    handles = [
        o_proj(lm, i).register_forward_pre_hook(lambda _m, args, i=i: seen.__setitem__(i, args[0]))
        for i in range(layers)
    ]
    embeds = lm.model.get_input_embeddings()(enc["input_ids"]).detach().requires_grad_()
    try:
        out = lm.model(inputs_embeds=embeds, attention_mask=enc["attention_mask"]).logits
    finally:
        for handle in handles:
            handle.remove()
    target = out[rows, last].log_softmax(-1)[:, 3].sum()
    grads = torch.autograd.grad(target, [seen[i] for i in range(layers)])
    for layer in range(layers):
        x, g = seen[layer].unflatten(-1, (heads, -1)), grads[layer].unflatten(-1, (heads, -1))
        expected = (x * g).sum(dim=(0, 1, 3))
        torch.testing.assert_close(grad[layer], expected, atol=1e-5, rtol=1e-4)


def test_hooks_are_removed_even_when_the_body_raises(lm: LoadedModel) -> None:
    base = logits(lm)
    with pytest.raises(RuntimeError), head_gates(lm.adapter, torch.zeros(shape(lm))):
        raise RuntimeError("boom")
    torch.testing.assert_close(logits(lm), base, atol=0, rtol=0)


@pytest.mark.parametrize("bad", [(1,), (2, 3), (3, 2, 9)])
def test_wrong_shapes_name_the_head_mask(lm: LoadedModel, bad: tuple[int, ...]) -> None:
    with pytest.raises(InvalidParameter) as info, head_gates(lm.adapter, torch.ones(bad)):
        pass
    assert info.value.field == "head_mask"


def test_a_gate_set_per_row_needs_one_row_each(lm: LoadedModel) -> None:
    with pytest.raises(InvalidParameter), head_gates(lm.adapter, torch.ones(2, *shape(lm))):
        logits(lm)


def test_gate_gradients_do_not_underflow_when_the_model_computes_in_fp16() -> None:
    """An fp32 loss on fp16 activations, as in a fit: the gradient reaching the fp16 gates is
    1e-9, below fp16's smallest subnormal (6e-8), so unscaled it is 0."""
    small = torch.tensor(1e-3, dtype=torch.float16)
    for dtype, expected in ((torch.float32, 0.0), (torch.float16, 1e-9)):
        fit = GateUpdates(torch.zeros(1, 1, 2), lr=0.1, lr_end=None, total=1, compute_dtype=dtype)
        gates = fit.gates()
        fit.backward((gates.half() * small * small).float().sum() * 1e-3)
        grad = fit.step(0, 0 * clamped_logit_mean(fit.logits).sum())
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, torch.full_like(grad, expected), rtol=0.05, atol=0.0)
