"""adapt(): what it finds per family, what it reports, and how it refuses a model."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from workers.lens.adapters import BlockKind, LogitTransform, ModelAdapter, adapt
from workers.lens.errors import ModelNotAdaptable
from workers.lens.loading import load_model
from workers.lens.testing import build_tiny_model

Adapters = Callable[[str], ModelAdapter]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> Adapters:
    """Each family's adapter, built once for the module."""
    root = tmp_path_factory.mktemp("adapters")

    @cache
    def get(family: str) -> ModelAdapter:
        return load_model(str(build_tiny_model(family, root / family)), device="cpu").adapter

    return get


def tiny(model_type: str, **config: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)).eval()


def test_describe_reports_the_geometry_of_a_gqa_model(
    adapters: Adapters,
) -> None:
    a = adapters("qwen3")
    assert a.describe() == {
        "family": "qwen3",
        "architecture": "Qwen3ForCausalLM",
        "layers": 2,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 16,
        "head_dims": [16, 16],
        "hidden_size": 32,
        "vocab_size": 160,
        "block_kinds": ["sequential"],
    }
    assert a.num_heads * a.head_dim != a.hidden_size


def test_the_mlp_reads_the_residual_from_the_norm_in_front_of_it(
    adapters: Adapters,
) -> None:
    llama = adapters("llama").blocks[0]
    assert llama.post_attn_source is llama.block.post_attention_layernorm
    gemma2 = adapters("gemma2").blocks[0]  # sandwich norms: post_attention_layernorm is a write
    assert gemma2.post_attn_source is gemma2.block.pre_feedforward_layernorm
    olmo2 = adapters("olmo2").blocks[0]  # post-norm: no norm in front of the MLP
    assert olmo2.post_attn_source is olmo2.mlp


@pytest.mark.parametrize("family", ["gpt_neox", "gptj", "phi", "cohere", "falcon"])
def test_parallel_blocks_are_recognised(adapters: Adapters, family: str) -> None:
    a = adapters(family)
    assert a.parallel_blocks
    assert all(b.kind is BlockKind.PARALLEL and b.post_attn_source is None for b in a.blocks)


def test_the_same_family_can_be_sequential(adapters: Adapters) -> None:
    a = adapters("gpt_neox_sequential")
    assert not a.parallel_blocks
    assert a.blocks[1].post_attn_source is a.blocks[1].block.post_attention_layernorm


def test_writes_inside_modules_that_add_the_residual(
    adapters: Adapters,
) -> None:
    bloom = adapters("bloom").blocks[0]
    assert bloom.attn_writer is bloom.attention.dense
    assert bloom.mlp_writer is bloom.mlp.dense_4h_to_h
    mpt = adapters("mpt").blocks[0]
    assert mpt.attn_writer is mpt.attention
    assert mpt.mlp_writer is mpt.mlp.down_proj
    llama = adapters("llama").blocks[0]
    assert (llama.attn_writer, llama.mlp_writer) == (llama.attention, llama.mlp)


def test_logit_transforms_come_from_the_config(adapters: Adapters) -> None:
    assert adapters("granite").logit_transform == LogitTransform(multiplier=0.25)
    assert adapters("cohere").logit_transform == LogitTransform(multiplier=0.5)
    assert adapters("gemma2").logit_transform == LogitTransform(softcap=3.0)
    x = torch.tensor([-100.0, 0.0, 1.0])
    torch.testing.assert_close(LogitTransform(2.0, 3.0)(x), torch.tanh(2 * x / 3) * 3)


def test_an_unknown_logit_transform_is_refused() -> None:
    llama = tiny(
        "llama",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    adapt(llama)
    plain = llama.forward

    def capped(*args: object, **kwargs: object):
        out = plain(*args, **kwargs)
        out.logits = torch.tanh(out.logits / 0.5) * 0.5  # a transform no config announces
        return out

    llama.forward = capped
    with pytest.raises(ModelNotAdaptable, match="logit lens would be wrong"):
        adapt(llama)


def test_a_model_without_an_mlp_module_is_refused() -> None:
    xglm = tiny(
        "xglm",
        vocab_size=64,
        d_model=32,
        num_layers=1,
        attention_heads=4,
        ffn_dim=32,
        max_position_embeddings=16,
    )
    with pytest.raises(ModelNotAdaptable, match="cannot find the MLP in XGLMForCausalLM block 0"):
        adapt(xglm)


def test_opts_mlp_becomes_a_module_and_its_logits_do_not_change() -> None:
    """OPT keeps fc1/fc2 in the decoder layer (called on flattened tokens): the adapter
    gives each layer an ``mlp`` module, whose input is the normed post-attention residual."""
    opt = tiny(
        "opt",
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=48,
        word_embed_proj_dim=32,
    )
    ids = torch.tensor([[2, 5, 7, 9, 11], [2, 3, 4, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        before = opt(input_ids=ids, attention_mask=mask).logits
    a = adapt(opt)
    with torch.no_grad():
        after = opt(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    layer = opt.model.decoder.layers[0]
    assert a.blocks[0].mlp is layer.mlp and a.blocks[0].post_attn_source is layer.final_layer_norm
    assert a.blocks[0].kind is BlockKind.SEQUENTIAL


def test_a_model_without_a_final_norm_is_refused() -> None:
    gpt1 = tiny("openai-gpt", vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16)
    with pytest.raises(ModelNotAdaptable, match="final norm"):
        adapt(gpt1)
