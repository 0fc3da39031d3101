"""Every supported family, checked against its own modules, hidden states and hand-placed hooks.

The expectations below (module paths, which blocks are parallel, which families put
a norm or a multiplier on each write) are written from reading each family's
modeling code, independently of the adapter's probe.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from workers.lens.adapters import BlockKind
from workers.lens.gating import head_gates
from workers.lens.loading import LoadedModel, load_model
from workers.lens.sites import LAYER_SITES, MODEL_SITES
from workers.lens.testing import (
    FAMILIES,
    build_tiny_model,
    build_tokenizer,
    save_random_model,
    tiny_config,
)
from workers.lens.tracing import record_sites, select_positions, trace

TEXTS = ["The capital of France is Paris", "a b a", "One two"]
TOL = {"atol": 1e-5, "rtol": 1e-5}

BLOCKS = {
    **dict.fromkeys(["gpt2", "gptj", "falcon", "codegen", "gpt_bigcode", "bloom"], "transformer.h"),
    **dict.fromkeys(["gpt_neox", "gpt_neox_sequential"], "gpt_neox.layers"),
    "mpt": "transformer.blocks",
    "opt": "model.decoder.layers",
}
O_PROJ = {
    **dict.fromkeys(["gpt2", "gpt_bigcode"], "attn.c_proj"),
    **dict.fromkeys(["gptj", "codegen", "mpt"], "attn.out_proj"),
    **dict.fromkeys(["gpt_neox", "gpt_neox_sequential"], "attention.dense"),
    **dict.fromkeys(["falcon", "bloom"], "self_attention.dense"),
    "phi": "self_attn.dense",
    "opt": "self_attn.out_proj",
}
PARALLEL = {"phi", "gpt_neox", "gptj", "codegen", "cohere", "falcon"}
KV_HEADS = {"falcon": 1, "gpt_bigcode": 1}  # multi-query attention


Write = Callable[[nn.Module, torch.Tensor], torch.Tensor]
SANDWICH: tuple[Write, Write] = (
    lambda b, a: b.post_attention_layernorm(a),
    lambda b, m: b.post_feedforward_layernorm(m),
)
# What each write adds to the residual stream, given the attention / MLP module output.
WRITES: dict[str, tuple[Write, Write]] = {
    "gemma2": SANDWICH,
    "gemma3_text": SANDWICH,
    "gemma4_text": SANDWICH,
    "olmo2": SANDWICH,
    "granite": (lambda b, a: a * b.residual_multiplier, lambda b, m: m * b.residual_multiplier),
}
IDENTITY: tuple[Write, Write] = (lambda _b, a: a, lambda _b, m: m)


class Models:
    """Each family's tiny model and full trace, built once per test module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.models: dict[str, LoadedModel] = {}
        self.traces: dict[str, dict[str, torch.Tensor]] = {}

    def lm(self, family: str) -> LoadedModel:
        if family not in self.models:
            path = build_tiny_model(family, self.root / family)
            self.models[family] = load_model(str(path), device="cpu", dtype="float32")
        return self.models[family]

    def trace(self, family: str) -> dict[str, torch.Tensor]:
        if family not in self.traces:
            self.traces[family] = trace(self.lm(family), TEXTS).tensors
        return self.traces[family]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return Models(tmp_path_factory.mktemp("families"))


def blocks(lm: LoadedModel, family: str) -> nn.ModuleList:
    return lm.model.get_submodule(BLOCKS.get(family, "model.layers"))


def encode(lm: LoadedModel) -> dict[str, torch.Tensor]:
    enc = lm.tokenizer(TEXTS, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def plain_logits(lm: LoadedModel) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(**encode(lm)).logits


def config_head_dims(config: PretrainedConfig) -> list[int]:
    """Each layer's head width, read from the config as its modeling code reads it."""
    if config.is_heterogeneous:  # Gemma 4: per-layer entries are refused on the config itself
        return [layer.head_dim for layer in config.per_layer_config]
    head_dim = getattr(config, "v_head_dim", None) or getattr(config, "head_dim", None)
    head_dim = head_dim or config.hidden_size // config.num_attention_heads  # MLA: v heads
    return [head_dim] * config.num_hidden_layers


def config_kv_heads(config: PretrainedConfig, family: str) -> int:
    if config.is_heterogeneous:
        return config.per_layer_config[0].num_key_value_heads
    return (
        KV_HEADS.get(family)
        or getattr(config, "num_key_value_heads", None)
        or (config.num_attention_heads)
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_head_geometry_follows_the_config(models: Models, family: str) -> None:
    lm = models.lm(family)
    config = lm.model.config
    heads = config.num_attention_heads
    hidden = config.hidden_size
    head_dims = config_head_dims(config)
    kv = config_kv_heads(config, family)
    a = lm.adapter
    assert (a.num_layers, a.num_heads, a.num_kv_heads) == (config.num_hidden_layers, heads, kv)
    assert list(a.head_dims) == head_dims
    assert a.head_dim == (head_dims[0] if len(set(head_dims)) == 1 else None)
    assert (a.hidden_size, a.vocab_size) == (hidden, config.vocab_size)
    expected = BlockKind.PARALLEL if family in PARALLEL else BlockKind.SEQUENTIAL
    assert all(b.kind is expected for b in a.blocks)
    assert a.describe()["family"] == config.model_type
    assert a.describe()["head_dims"] == head_dims


@pytest.mark.parametrize("family", FAMILIES)
def test_every_site_is_present_with_its_shape(models: Models, family: str) -> None:
    lm, full = models.lm(family), models.trace(family)
    a = lm.adapter
    batch, seq = full["input_ids"].shape
    for site in LAYER_SITES:
        for layer in range(a.num_layers):
            widths = {"attn_o_proj_pre": a.num_heads * a.head_dims[layer], "logits": a.vocab_size}
            assert full[f"{site}.{layer}"].shape == (batch, seq, widths.get(site, a.hidden_size))
    for site in MODEL_SITES:
        assert full[site].shape == (batch, seq, a.hidden_size)
    assert full["final_logits"].shape == (batch, seq, a.vocab_size)
    assert "positions" not in full


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_positions_hold_the_full_trace_at_them(models: Models, family: str) -> None:
    """With ``positions`` the LM head runs at those positions only, in every family."""
    lm, full = models.lm(family), models.trace(family)
    kept = trace(lm, TEXTS, positions=[0, -1]).tensors
    index = kept.pop("positions")
    for name, value in kept.items():
        whole = (
            full[name]
            if name in ("input_ids", "attention_mask")
            else (select_positions(full[name], index))
        )
        torch.testing.assert_close(value, whole, **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_stream_matches_hidden_states_and_logits(models: Models, family: str) -> None:
    lm, full = models.lm(family), models.trace(family)
    last = lm.adapter.num_layers - 1
    with torch.no_grad():
        out = lm.model(**encode(lm), output_hidden_states=True)
        normed = lm.adapter.final_norm(full[f"block_output.{last}"])
    hidden = out.hidden_states
    for layer in range(last):
        torch.testing.assert_close(full[f"block_input.{layer}"], hidden[layer], **TOL)
        torch.testing.assert_close(full[f"block_output.{layer}"], hidden[layer + 1], **TOL)
    torch.testing.assert_close(full[f"block_input.{last}"], hidden[last], **TOL)
    # transformers hands back the final norm's output as the last hidden state.
    torch.testing.assert_close(normed, hidden[-1], **TOL)
    torch.testing.assert_close(full["final_norm"], hidden[-1], **TOL)
    torch.testing.assert_close(full["lm_head_input"], hidden[-1], **TOL)
    torch.testing.assert_close(full["final_logits"], out.logits, **TOL)
    torch.testing.assert_close(full[f"logits.{last}"], out.logits, **TOL)


def per_layer_inputs(lm: LoadedModel, family: str) -> dict[int, torch.Tensor]:
    """Gemma 4's per-layer input embeddings, as each block receives them (second argument)."""
    seen: dict[int, torch.Tensor] = {}
    handles = [
        block.register_forward_pre_hook(
            lambda _m, args, _kw, i=i: seen.__setitem__(i, args[1]),
            with_kwargs=True,
        )
        for i, block in enumerate(blocks(lm, family))
    ]
    try:
        plain_logits(lm)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def gemma4_block_end(b: nn.Module, residual: torch.Tensor, per_layer: torch.Tensor) -> torch.Tensor:
    """What a Gemma 4 block does after its MLP write: add its per-layer input, then scale."""
    gate = b.per_layer_projection(b.act_fn(b.per_layer_input_gate(residual)) * per_layer)
    return (residual + b.post_per_layer_input_norm(gate)) * b.layer_scalar


@pytest.mark.parametrize("family", FAMILIES)
def test_writes_add_up_to_the_block_output(models: Models, family: str) -> None:
    lm, full = models.lm(family), models.trace(family)
    attn_write, mlp_write = WRITES.get(family, IDENTITY)
    per_layer = per_layer_inputs(lm, family) if family == "gemma4_text" else {}
    for layer, block in enumerate(blocks(lm, family)):
        x, a = full[f"block_input.{layer}"], full[f"attn_output.{layer}"]
        m, y = full[f"mlp_output.{layer}"], full[f"block_output.{layer}"]
        post = full[f"post_attn_residual.{layer}"]
        with torch.no_grad():
            torch.testing.assert_close(post, x + attn_write(block, a), **TOL)
            after_mlp = post + mlp_write(block, m)
            if layer in per_layer:
                after_mlp = gemma4_block_end(block, after_mlp, per_layer[layer])
            torch.testing.assert_close(y, after_mlp, **TOL)
        if family in PARALLEL:
            assert not torch.allclose(full[f"mlp_input.{layer}"], post, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_sites_match_an_independent_hook(models: Models, family: str) -> None:
    lm, full = models.lm(family), models.trace(family)
    seen: dict[int, torch.Tensor] = {}
    handles = [
        block.get_submodule(O_PROJ.get(family, "self_attn.o_proj")).register_forward_pre_hook(
            lambda _m, args, i=i: seen.__setitem__(i, args[0])
        )
        for i, block in enumerate(blocks(lm, family))
    ]
    try:
        plain_logits(lm)
    finally:
        for handle in handles:
            handle.remove()
    for layer, value in seen.items():
        torch.testing.assert_close(full[f"attn_o_proj_pre.{layer}"], value, **TOL)


def zero_head_by_hand(lm: LoadedModel, family: str, layer: int, head: int) -> torch.Tensor:
    width = lm.adapter.head_dims[layer]
    lo, hi = head * width, (head + 1) * width
    o_proj = blocks(lm, family)[layer].get_submodule(O_PROJ.get(family, "self_attn.o_proj"))

    def zero(_m: nn.Module, args: tuple) -> tuple:
        x = args[0].clone()
        x[..., lo:hi] = 0
        return (x, *args[1:])

    handle = o_proj.register_forward_pre_hook(zero)
    try:
        return plain_logits(lm)
    finally:
        handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_gates_scale_query_heads(models: Models, family: str) -> None:
    lm = models.lm(family)
    a = lm.adapter
    base = plain_logits(lm)
    ones = torch.ones(a.num_layers, a.num_heads)
    with head_gates(a, ones):
        torch.testing.assert_close(plain_logits(lm), base, atol=0, rtol=0)
    head = a.num_heads - 1
    for layer in {0, a.num_layers - 1}:  # Gemma 4's last layer has wider heads than its first
        gates = ones.clone()
        gates[layer, head] = 0
        with head_gates(a, gates):
            gated = plain_logits(lm)
        assert not torch.allclose(gated, base, atol=1e-4)
        torch.testing.assert_close(gated, zero_head_by_hand(lm, family, layer, head), **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_the_last_blocks_sites(models: Models, family: str) -> None:
    lm = models.lm(family)
    enc = encode(lm)
    last = enc["attention_mask"].sum(1) - 1
    rows = torch.arange(len(TEXTS))
    layer = lm.adapter.num_layers - 1
    names = [f"post_attn_residual.{layer}", f"block_output.{layer}"]
    sites = ["post_attn_residual", "block_output"]
    with record_sites(lm.adapter, [layer], sites, detach=False) as got:
        logits = lm.model(**enc).logits
    target = logits[rows, last].log_softmax(-1)[:, 5].sum()
    grads = dict(zip(names, torch.autograd.grad(target, [got[n] for n in names]), strict=True))
    # By hand: the last block's output as a leaf, through final norm and LM head.
    leaf = got[names[1]].detach().requires_grad_()
    by_hand = lm.adapter.unembed(leaf)[rows, last].log_softmax(-1)[:, 5].sum()
    expected = torch.autograd.grad(by_hand, leaf)[0]
    torch.testing.assert_close(grads[names[1]], expected, atol=1e-6, rtol=1e-4)
    if family in PARALLEL:
        torch.testing.assert_close(grads[names[0]], expected, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(logits.detach(), plain_logits(lm), atol=0, rtol=0)


def test_gemma4_checkpoints_load_through_their_multimodal_class(tmp_path: Path) -> None:
    """Real Gemma 4 checkpoints are ``gemma4`` (text, vision and audio towers): the text
    model inside is adapted, with its head width per layer."""
    text = tiny_config("gemma4_text")
    config = AutoConfig.for_model(
        "gemma4", text_config=text.to_dict(), vision_config=None, audio_config=None
    )
    path = save_random_model(config, build_tokenizer(), tmp_path / "gemma4")
    lm = load_model(str(path), device="cpu", dtype="float32")
    assert type(lm.model).__name__ == "Gemma4ForConditionalGeneration"
    assert lm.adapter.head_dims == (16, 32, 32)
    full = trace(lm, TEXTS).tensors
    torch.testing.assert_close(full["logits.2"], plain_logits(lm), **TOL)
