"""The hook toolkit: each helper records what it claims and leaves no handle behind."""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import torch

from workers.lens import hooks
from workers.lens.errors import InvalidParameter
from workers.lens.loading import LoadedModel, load_model
from workers.lens.testing import build_tiny_model


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = build_tiny_model("llama", tmp_path_factory.mktemp("llama"))
    return load_model(str(path), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def ids(lm: LoadedModel) -> torch.Tensor:
    return lm.tokenizer("The capital of France is Paris", return_tensors="pt")["input_ids"]


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-likelihood of the whole text: a scalar that depends on every position."""
    log_probs = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    return log_probs.gather(-1, ids[0, 1:, None]).sum()


def _embeds(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    return lm.model.get_input_embeddings()(ids).detach().requires_grad_(True)


def _leaf_at_output(module: torch.nn.Module, store: dict[str, torch.Tensor]):
    """A plain forward hook swapping the module's output for a leaf that autograd.grad can reach."""

    def hook(_m: torch.nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        store["out"] = output.detach().requires_grad_(True)
        return store["out"]

    return module.register_forward_hook(hook)


def _reference_output_grad(lm: LoadedModel, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """d loss / d (block ``layer`` output), by plain autograd on a leaf put in its place."""
    store: dict[str, torch.Tensor] = {}
    handle = _leaf_at_output(lm.adapter.blocks[layer].block, store)
    try:
        loss = _loss(lm.model(input_ids=ids).logits, ids)
        (grad,) = torch.autograd.grad(loss, store["out"])  # the leaf is the only thing needing grad
    finally:
        handle.remove()
    return grad


def _reference_embed_grad(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    embeds = _embeds(lm, ids)
    (grad,) = torch.autograd.grad(_loss(lm.model(inputs_embeds=embeds).logits, ids), embeds)
    return grad


def _assert_no_module_hooks(model: torch.nn.Module) -> None:
    for name, module in model.named_modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
        ):
            assert not getattr(module, attr), f"{name or 'model'}.{attr} left behind"


def test_module_grads_output_side_matches_autograd(lm: LoadedModel, ids: torch.Tensor) -> None:
    block = lm.adapter.blocks[1].block
    with hooks.module_grads(block, side="output") as rec:
        embeds = _embeds(lm, ids)
        _loss(lm.model(inputs_embeds=embeds).logits, ids).backward()
    assert len(rec) == 1 and rec.last.side == "output"
    torch.testing.assert_close(rec.last.grads[0], _reference_output_grad(lm, ids, 1))
    _assert_no_module_hooks(lm.model)
    embeds.grad = None
    loss = _loss(lm.model(inputs_embeds=embeds).logits, ids)
    loss.backward()  # a pass after the context is not recorded
    assert len(rec) == 1


def test_module_grads_input_side_matches_autograd(lm: LoadedModel, ids: torch.Tensor) -> None:
    # Block 1's positional input is block 0's output.
    with hooks.module_grads(lm.adapter.blocks[1].block, side="input") as rec:
        embeds = _embeds(lm, ids)
        torch.autograd.grad(_loss(lm.model(inputs_embeds=embeds).logits, ids), embeds)
    torch.testing.assert_close(rec.last.grads[0], _reference_output_grad(lm, ids, 0))


def test_forward_kwargs_records_what_the_module_receives(
    lm: LoadedModel, ids: torch.Tensor
) -> None:
    positions = torch.arange(ids.shape[1])[None]
    with hooks.forward_kwargs(lm.adapter.blocks[0].attention) as rec:
        lm.model(input_ids=ids, position_ids=positions)
    call = rec.last
    assert not call.edited
    torch.testing.assert_close(call.kwargs["position_ids"], positions)
    cos, _sin = call.kwargs["position_embeddings"]
    assert cos.shape[:2] == ids.shape


def test_forward_kwargs_edit_equals_passing_the_arguments(
    lm: LoadedModel, ids: torch.Tensor
) -> None:
    hidden = torch.ones_like(ids)
    hidden[0, 2] = 0
    shifted = torch.arange(ids.shape[1])[None] + 5

    def edit(kwargs: dict) -> dict:
        return {**kwargs, "attention_mask": hidden, "position_ids": shifted}

    with hooks.forward_kwargs(lm.model, edit) as rec:
        edited = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    direct = lm.model(input_ids=ids, attention_mask=hidden, position_ids=shifted).logits
    assert rec.last.edited and rec.last.kwargs["attention_mask"].all()
    torch.testing.assert_close(edited, direct)
    assert not torch.allclose(edited, lm.model(input_ids=ids).logits)


def test_forward_kwargs_returning_none_changes_nothing(lm: LoadedModel, ids: torch.Tensor) -> None:
    seen: list[set[str]] = []
    with hooks.forward_kwargs(lm.adapter.blocks[1].block, lambda kw: seen.append(set(kw))):
        logits = lm.model(input_ids=ids).logits
    torch.testing.assert_close(logits, lm.model(input_ids=ids).logits)
    assert "attention_mask" in seen[0] and "position_embeddings" in seen[0]


def test_tensor_grad_records_and_modifies(lm: LoadedModel, ids: torch.Tensor) -> None:
    reference = _reference_embed_grad(lm, ids)
    embeds = _embeds(lm, ids)
    with hooks.tensor_grad(embeds) as rec:
        _loss(lm.model(inputs_embeds=embeds).logits, ids).backward()
    torch.testing.assert_close(rec.last, reference)
    torch.testing.assert_close(embeds.grad, reference)
    assert not embeds._backward_hooks

    # A probe on an activation inside the model: doubling its gradient doubles everything upstream.
    store: dict[str, torch.Tensor] = {}

    def keep(_m, _a, output):
        store["out"] = output

    handle = lm.adapter.blocks[0].block.register_forward_hook(keep)
    embeds = _embeds(lm, ids)
    loss = _loss(lm.model(inputs_embeds=embeds).logits, ids)
    handle.remove()
    with hooks.tensor_grad(store["out"], modify=lambda g: 2 * g) as rec:
        (grad,) = torch.autograd.grad(loss, embeds)
    torch.testing.assert_close(rec.last, _reference_output_grad(lm, ids, 0))
    torch.testing.assert_close(grad, 2 * reference)


def test_node_grads_after_and_before(lm: LoadedModel, ids: torch.Tensor) -> None:
    embeds = _embeds(lm, ids)
    scaled = embeds * 3.0
    loss = _loss(lm.model(inputs_embeds=scaled).logits, ids)
    with hooks.node_grads(scaled, when="after") as after:
        (grad,) = torch.autograd.grad(loss, embeds, retain_graph=True)
    # The multiply node receives d loss / d scaled and hands on 3 × that.
    d_scaled = grad / 3.0
    torch.testing.assert_close(after.last.grad_outputs[0], d_scaled)
    torch.testing.assert_close(after.last.grad_inputs[0], grad)

    with hooks.node_grads(scaled.grad_fn, when="before", modify=lambda g: (g[0] * 0,)) as before:
        (zeroed,) = torch.autograd.grad(loss, embeds, retain_graph=True)
    assert before.last.grad_inputs is None
    torch.testing.assert_close(before.last.grad_outputs[0], d_scaled)
    assert not zeroed.any()

    # Once the contexts are closed, the node is unhooked: a new backward is not recorded or changed.
    (again,) = torch.autograd.grad(loss, embeds)
    assert len(after) == 1 and len(before) == 1
    torch.testing.assert_close(again, grad)


def test_module_grads_entering_records_and_modifies(lm: LoadedModel, ids: torch.Tensor) -> None:
    reference = _reference_embed_grad(lm, ids)
    block = lm.adapter.blocks[1].block
    with hooks.module_grads_entering(block, modify=lambda g: (2 * g[0],)) as rec:
        embeds = _embeds(lm, ids)
        loss = _loss(lm.model(inputs_embeds=embeds).logits, ids)
        (grad,) = torch.autograd.grad(loss, embeds, retain_graph=True)
    torch.testing.assert_close(rec.last.grads[0], _reference_output_grad(lm, ids, 1))
    torch.testing.assert_close(grad, 2 * reference)
    _assert_no_module_hooks(lm.model)
    # The graph built inside still references the hook; after exit it neither records nor doubles.
    (again,) = torch.autograd.grad(loss, embeds)
    assert len(rec) == 1
    torch.testing.assert_close(again, reference)


def _module_helpers(lm: LoadedModel) -> list[Callable[[], AbstractContextManager]]:
    block = lm.adapter.blocks[0].block
    return [
        lambda: hooks.module_grads(block, side="input"),
        lambda: hooks.module_grads(block, side="output"),
        lambda: hooks.forward_kwargs(block, lambda kw: None),
        lambda: hooks.module_grads_entering(block),
    ]


@pytest.mark.parametrize("index", range(4))
def test_module_helpers_remove_handles_on_exit_and_on_error(
    lm: LoadedModel, ids: torch.Tensor, index: int
) -> None:
    helper = _module_helpers(lm)[index]
    with helper():
        embeds = _embeds(lm, ids)
        torch.autograd.grad(_loss(lm.model(inputs_embeds=embeds).logits, ids), embeds)
    _assert_no_module_hooks(lm.model)
    with pytest.raises(RuntimeError, match="boom"), helper():
        raise RuntimeError("boom")
    _assert_no_module_hooks(lm.model)


def test_tensor_and_node_helpers_remove_handles_on_error(
    lm: LoadedModel, ids: torch.Tensor
) -> None:
    embeds = _embeds(lm, ids)
    scaled = embeds * 2.0
    loss = _loss(lm.model(inputs_embeds=scaled).logits, ids)
    with pytest.raises(RuntimeError, match="boom"), hooks.tensor_grad(scaled) as probe:
        raise RuntimeError("boom")
    assert not scaled._backward_hooks
    with pytest.raises(RuntimeError, match="boom"), hooks.node_grads(scaled) as after:
        raise RuntimeError("boom")
    with (
        pytest.raises(RuntimeError, match="boom"),
        hooks.node_grads(scaled, when="before") as before,
    ):
        raise RuntimeError("boom")
    torch.autograd.grad(loss, embeds)
    assert len(probe) == len(after) == len(before) == 0


def test_helpers_reject_what_they_cannot_hook(lm: LoadedModel, ids: torch.Tensor) -> None:
    with pytest.raises(InvalidParameter) as err, hooks.tensor_grad(torch.zeros(3)):
        pass
    assert err.value.field == "tensor"
    with pytest.raises(InvalidParameter) as err, hooks.node_grads(_embeds(lm, ids)):
        pass
    assert err.value.field == "tensor"
    with pytest.raises(InvalidParameter) as err, hooks.module_grads(lm.model, side="both"):  # type: ignore[arg-type]
        pass
    assert err.value.field == "side"
    with pytest.raises(LookupError):
        _ = hooks.Recording().last


def test_docs_examples_run() -> None:
    """Every example in docs/hooks.md runs as written, in order, and the checks it makes hold."""
    doc = Path(__file__).parents[3] / "docs" / "hooks.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 6
    namespace: dict[str, object] = {}
    for number, code in enumerate(blocks):
        exec(compile(code, f"{doc}:block{number}", "exec"), namespace)
