"""Gradients in trace equal torch.autograd.grad of the same target w.r.t. the same activation."""

from __future__ import annotations

import pytest
import torch

from workers.lens.errors import InvalidParameter
from workers.lens.gradients import trace_gradients
from workers.lens.loading import LoadedModel, load_model
from workers.lens.testing import build_tiny_model
from workers.lens.tracing import select_positions, trace

TEXTS = ["The capital of France is", "When Mary and John went to the store, John gave a drink to"]
TARGET = " Paris."


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = build_tiny_model("llama", tmp_path_factory.mktemp("llama"))
    return load_model(str(path), device="cpu", dtype="float32")


def _site_module(lm: LoadedModel, name: str) -> tuple[torch.nn.Module, str]:
    """The module whose output (or, for attn_o_proj_pre, input) a site is, found by hand."""
    layers = lm.model.model.layers
    site, _, layer = name.partition(".")
    if site == "block_output":
        return layers[int(layer)], "output"
    if site == "attn_o_proj_pre":
        return layers[int(layer)].self_attn.o_proj, "input"
    if site == "mlp_output":
        return layers[int(layer)].mlp, "output"
    if site == "final_norm":
        return lm.model.model.norm, "output"
    raise KeyError(name)


def _reference(lm: LoadedModel, prefix: list[int], target: list[int], name: str) -> torch.Tensor:
    """d log P(target | prefix) / d site, by one unbatched pass with a leaf put at the site."""
    module, side = _site_module(lm, name)
    store: dict[str, torch.Tensor] = {}

    def at_output(_m, _a, out):
        store["x"] = out.detach().requires_grad_(True)
        return store["x"]

    def at_input(_m, args):
        store["x"] = args[0].detach().requires_grad_(True)
        return (store["x"], *args[1:])

    handle = (
        module.register_forward_hook(at_output)
        if side == "output"
        else module.register_forward_pre_hook(at_input)
    )
    try:
        ids = torch.tensor([prefix + target])
        log_probs = torch.log_softmax(lm.model(input_ids=ids).logits[0], dim=-1)
        start = len(prefix)
        total = sum(log_probs[start + k - 1, t] for k, t in enumerate(target))
        (grad,) = torch.autograd.grad(total, store["x"])
    finally:
        handle.remove()
    return grad[0]


def _text_ids(lm: LoadedModel, text: str) -> list[int]:
    return lm.tokenizer(text)["input_ids"]


NAMES = ["block_output.0", "block_output.1", "attn_o_proj_pre.1", "mlp_output.0", "final_norm"]


def test_target_text_matches_autograd_at_the_last_token(lm: LoadedModel) -> None:
    grads = trace_gradients(
        lm,
        TEXTS,
        layers=[0, 1],
        sites=["block_output", "attn_o_proj_pre", "mlp_output", "final_norm"],
        target=TARGET,
    )
    assert set(grads) == {
        f"grad.{s}.{layer}"
        for s in ("block_output", "attn_o_proj_pre", "mlp_output")
        for layer in (0, 1)
    } | {"grad.final_norm"}
    activations = trace(lm, TEXTS, layers=[0, 1], sites=["block_output", "attn_o_proj_pre"]).tensors
    for row, text in enumerate(TEXTS):
        ids = _text_ids(lm, text)
        full = _text_ids(lm, text + TARGET)
        assert full[: len(ids)] == ids  # the target continues the text's own tokens here
        target = full[len(ids) :]
        for name in NAMES:
            got = grads[f"grad.{name}"][row]
            expected = _reference(lm, ids, target, name)[: len(ids)]
            torch.testing.assert_close(got[: len(ids)], expected, rtol=1e-5, atol=1e-6)
            assert not got[len(ids) :].any()  # padding
            if name in activations:
                assert got.shape == activations[name][row].shape


def test_earlier_position_and_target_ids(lm: LoadedModel) -> None:
    target = _text_ids(lm, "The capital")[1:]
    grads = trace_gradients(
        lm, TEXTS, layers=[1], sites=["block_output"], target_ids=target, position=2
    )
    got = grads["grad.block_output.1"]
    for row, text in enumerate(TEXTS):
        prefix = _text_ids(lm, text)[:3]
        torch.testing.assert_close(
            got[row, :3], _reference(lm, prefix, target, "block_output.1")[:3], rtol=1e-5, atol=1e-6
        )
        assert not got[row, 3:].any()
    negative = trace_gradients(
        lm, TEXTS[:1], layers=[1], sites=["block_output"], target_ids=target, position=-3
    )
    n = len(_text_ids(lm, TEXTS[0]))
    reference = _reference(lm, _text_ids(lm, TEXTS[0])[: n - 2], target, "block_output.1")[: n - 2]
    torch.testing.assert_close(
        negative["grad.block_output.1"][0, : n - 2], reference, rtol=1e-5, atol=1e-6
    )


def test_logit_lens_gets_no_gradient_and_the_model_is_left_clean(lm: LoadedModel) -> None:
    grads = trace_gradients(
        lm, TEXTS[:1], layers=[0], sites=["logits", "block_input"], target=TARGET
    )
    assert list(grads) == ["grad.block_input.0"]
    for module in lm.model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert all(not p.requires_grad and p.grad is None for p in lm.model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"target": TARGET, "position": 5}, "gradients.position"),
        ({"target": TARGET, "position": -6}, "gradients.position"),
        ({"target": TARGET, "target_ids": [3]}, "gradients"),
        ({}, "gradients"),
        ({"target": ""}, "gradients.target"),
        ({"target_ids": []}, "gradients.target_ids"),
        ({"target_ids": [10_000]}, "gradients.target_ids"),
        ({"target": TARGET, "sites": ["nowhere"]}, "sites"),
        ({"target": TARGET, "layers": [7]}, "layers"),
    ],
)
def test_bad_input_names_the_field(lm: LoadedModel, kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidParameter) as err:
        trace_gradients(lm, ["The capital of"], **kwargs)
    assert err.value.field == field


def test_works_when_the_caller_is_in_inference_mode(lm: LoadedModel) -> None:
    kwargs = {"layers": [0], "sites": ["block_output"], "target": TARGET}
    expected = trace_gradients(lm, TEXTS, **kwargs)["grad.block_output.0"]
    with torch.inference_mode():
        got = trace_gradients(lm, TEXTS, **kwargs)["grad.block_output.0"]
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kept_positions_and_dtype_are_the_full_gradients_cut_and_cast(
    lm: LoadedModel, dtype: str
) -> None:
    kwargs = {"layers": [1], "sites": ["block_output", "lm_head_input"], "target": TARGET}
    full = trace_gradients(lm, TEXTS, **kwargs)
    kept = trace_gradients(lm, TEXTS, positions=[0, -2, -1], dtype=dtype, **kwargs)
    index = trace(lm, TEXTS, positions=[0, -2, -1], layers=[0], sites=["block_input"]).tensors[
        "positions"
    ]
    assert set(kept) == set(full)
    for name, grad in full.items():
        expected = select_positions(grad, index).to(getattr(torch, dtype))
        assert kept[name].dtype == expected.dtype
        torch.testing.assert_close(kept[name], expected, atol=1e-6, rtol=1e-5)
    assert kept["grad.block_output.1"].abs().sum() > 0
