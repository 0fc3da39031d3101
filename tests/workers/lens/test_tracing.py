"""trace() and record_sites() against independent hooks, hidden states and hand-written autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workers.lens.errors import InvalidParameter
from workers.lens.loading import LoadedModel, load_model
from workers.lens.testing import build_tiny_model
from workers.lens.tracing import record_sites, trace

TEXTS = ["The capital of France is Paris", "a b a", "One two three four"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = build_tiny_model("llama", tmp_path_factory.mktemp("llama"))
    return load_model(str(path), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def full(lm: LoadedModel) -> dict[str, torch.Tensor]:
    return trace(lm, TEXTS).tensors


def encode(lm: LoadedModel, texts: list[str]) -> dict[str, torch.Tensor]:
    enc = lm.tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def independent_hooks(lm: LoadedModel) -> dict[str, torch.Tensor]:
    """The Llama sites read by hand-placed hooks on the module tree."""
    seen: dict[str, torch.Tensor] = {}

    def keep_input(key: str):
        return lambda _m, args, kwargs: seen.__setitem__(
            key, (args or (kwargs["hidden_states"],))[0]
        )

    def keep_output(key: str):
        return lambda _m, _a, out: seen.__setitem__(key, out[0] if isinstance(out, tuple) else out)

    handles = []
    for i, layer in enumerate(lm.model.model.layers):
        for module, key in [
            (layer.self_attn.o_proj, f"attn_o_proj_pre.{i}"),
            (layer.post_attention_layernorm, f"post_attn_residual.{i}"),
            (layer.mlp, f"mlp_input.{i}"),
        ]:
            handles.append(module.register_forward_pre_hook(keep_input(key), with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(keep_output(f"attn_output.{i}")))
        handles.append(layer.mlp.register_forward_hook(keep_output(f"mlp_output.{i}")))
    handles.append(
        lm.model.lm_head.register_forward_pre_hook(keep_input("lm_head_input"), with_kwargs=True)
    )
    try:
        with torch.no_grad():
            seen["final_logits"] = lm.model(**encode(lm, TEXTS)).logits
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_residual_sites_match_output_hidden_states(
    lm: LoadedModel, full: dict[str, torch.Tensor]
) -> None:
    with torch.no_grad():
        hidden = lm.model(**encode(lm, TEXTS), output_hidden_states=True).hidden_states
        last = lm.model.model.norm(full[f"block_output.{lm.adapter.num_layers - 1}"])
    layers = lm.adapter.num_layers
    for layer in range(layers):
        torch.testing.assert_close(
            full[f"block_input.{layer}"], hidden[layer], atol=1e-5, rtol=1e-5
        )
    for layer in range(layers - 1):
        torch.testing.assert_close(
            full[f"block_output.{layer}"], hidden[layer + 1], atol=1e-5, rtol=1e-5
        )
    # transformers replaces the last hidden state by the final norm's output.
    torch.testing.assert_close(last, hidden[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full["final_norm"], hidden[-1], atol=1e-5, rtol=1e-5)


def test_attention_and_mlp_sites_match_independent_hooks(
    lm: LoadedModel, full: dict[str, torch.Tensor]
) -> None:
    seen = independent_hooks(lm)
    for key, value in seen.items():
        torch.testing.assert_close(full[key], value, atol=1e-5, rtol=1e-5)
    for layer in range(lm.adapter.num_layers):
        torch.testing.assert_close(
            full[f"post_attn_residual.{layer}"],
            full[f"block_input.{layer}"] + full[f"attn_output.{layer}"],
        )
        torch.testing.assert_close(
            full[f"block_output.{layer}"],
            full[f"post_attn_residual.{layer}"] + full[f"mlp_output.{layer}"],
        )


def test_logit_lens_is_final_norm_and_lm_head(
    lm: LoadedModel, full: dict[str, torch.Tensor]
) -> None:
    last = lm.adapter.num_layers - 1
    torch.testing.assert_close(full[f"logits.{last}"], full["final_logits"], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        lens0 = lm.model.lm_head(lm.model.model.norm(full["block_output.0"]))
    torch.testing.assert_close(full["logits.0"], lens0, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full["logits.0"], full["final_logits"], atol=1e-3)


def test_layers_and_sites_select_tensors(lm: LoadedModel, full: dict[str, torch.Tensor]) -> None:
    result = trace(lm, TEXTS, layers=[1], sites=["mlp_output", "lm_head_input", "logits"])
    assert set(result.tensors) == {
        "mlp_output.1",
        "lm_head_input",
        "logits.1",
        "final_logits",
        "input_ids",
        "attention_mask",
    }
    for key in ("mlp_output.1", "lm_head_input", "logits.1"):
        torch.testing.assert_close(result.tensors[key], full[key])
    assert result.summary["layers"] == [1]
    assert result.summary["tokens"][1] == [
        lm.tokenizer.decode([t]) for t in full["input_ids"][1][:4]
    ]


def test_last_position_is_each_texts_last_real_token(
    lm: LoadedModel, full: dict[str, torch.Tensor]
) -> None:
    result = trace(lm, TEXTS, positions="last").tensors
    last = full["attention_mask"].sum(1) - 1
    assert torch.equal(result["positions"], last[:, None])
    rows = torch.arange(len(TEXTS))
    for key, value in result.items():
        if key in ("input_ids", "attention_mask"):
            assert torch.equal(value, full[key])
            continue
        if key == "positions":
            continue
        assert value.shape[:2] == (len(TEXTS), 1)
        torch.testing.assert_close(value[:, 0], full[key][rows, last])


def test_listed_positions_count_from_start_or_each_end(
    lm: LoadedModel, full: dict[str, torch.Tensor]
) -> None:
    result = trace(lm, TEXTS, positions=[0, 2, -1, -3]).tensors
    lengths = full["attention_mask"].sum(1)
    expected = torch.stack(
        [torch.zeros_like(lengths), lengths * 0 + 2, lengths - 1, lengths - 3], 1
    )
    assert torch.equal(result["positions"], expected)
    for key in ("block_output.0", "attn_o_proj_pre.1", "logits.0", "final_logits", "final_norm"):
        for row in range(len(TEXTS)):
            torch.testing.assert_close(result[key][row], full[key][row, expected[row]])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_casts_the_activations(
    lm: LoadedModel, full: dict[str, torch.Tensor], dtype: str
) -> None:
    result = trace(lm, TEXTS, dtype=dtype).tensors
    for key, value in result.items():
        if key in ("input_ids", "attention_mask"):
            assert value.dtype == torch.int64
        elif key == "final_logits":
            assert torch.equal(value, full[key])
        else:
            assert torch.equal(value, full[key].to(getattr(torch, dtype))), key


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"layers": [2]}, "layers"),
        ({"layers": [-1]}, "layers"),
        ({"layers": []}, "layers"),
        ({"sites": ["nope"]}, "sites"),
        ({"positions": [4]}, "positions"),
        ({"positions": [-5]}, "positions"),
        ({"positions": "first"}, "positions"),
        ({"dtype": "int8"}, "dtype"),
    ],
)
def test_invalid_parameters_name_their_field(lm: LoadedModel, kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        trace(lm, TEXTS, **kwargs)
    assert info.value.field == field


def target_log_prob(logits: torch.Tensor, enc: dict[str, torch.Tensor], token: int) -> torch.Tensor:
    last = enc["attention_mask"].sum(1) - 1
    return logits[torch.arange(len(last)), last].log_softmax(-1)[:, token].sum()


def test_record_sites_gives_in_graph_tensors_with_true_gradients(lm: LoadedModel) -> None:
    enc = encode(lm, TEXTS)
    layer = lm.model.model.layers[1]
    with record_sites(
        lm.adapter, [1], ["block_input", "post_attn_residual", "mlp_output"], detach=False
    ) as got:
        logits = lm.model(**enc).logits
    with torch.no_grad():
        torch.testing.assert_close(logits, lm.model(**enc).logits, atol=0, rtol=0)
    grads = torch.autograd.grad(
        target_log_prob(logits, enc, 7), [got["block_input.1"], got["post_attn_residual.1"]]
    )

    # By hand: the same last block, written out, from detached leaves.
    residual = got["post_attn_residual.1"].detach().requires_grad_()
    out = residual + layer.mlp(layer.post_attention_layernorm(residual))
    by_hand = target_log_prob(lm.model.lm_head(lm.model.model.norm(out)), enc, 7)
    torch.testing.assert_close(
        grads[1], torch.autograd.grad(by_hand, residual)[0], atol=1e-6, rtol=1e-5
    )

    # By hand: the model's own forward with block 1's input swapped for a leaf.
    block_input = got["block_input.1"].detach().requires_grad_()

    def swap(_m: nn.Module, args: tuple, kwargs: dict) -> tuple:
        return (block_input, *args[1:]), kwargs

    handle = layer.register_forward_pre_hook(swap, with_kwargs=True)
    try:
        by_hand = target_log_prob(lm.model(**enc).logits, enc, 7)
    finally:
        handle.remove()
    torch.testing.assert_close(
        grads[0], torch.autograd.grad(by_hand, block_input)[0], atol=1e-6, rtol=1e-5
    )
    assert not got["mlp_output.1"].is_leaf


def test_record_sites_detached_by_default(lm: LoadedModel) -> None:
    with record_sites(lm.adapter, sites=["attn_output", "final_norm"]) as got:
        lm.model(**encode(lm, TEXTS))
    assert set(got) == {"attn_output.0", "attn_output.1", "final_norm"}
    assert not any(t.requires_grad for t in got.values())
    with pytest.raises(InvalidParameter), record_sites(lm.adapter, sites=["logits"]):
        pass
