"""Tiny random models of every supported family, saved like a real checkpoint, for tests.

Tests never download from a hub: :func:`build_tiny_model` builds a model from its
config class with a few dozen hidden units and a local BPE tokenizer (with offsets),
and saves both with ``save_pretrained`` so they load through the same path as a
served model. The geometries are chosen to exercise the adapter: grouped-query
attention, heads whose total width differs from the hidden size, parallel blocks,
sandwich norms, sparse MoE blocks and output logit transforms. Gemma 4's has three
layers, so that it has everything its real checkpoints have: heads twice as wide in
its full-attention layers, which share one key/value head (``attention_k_eq_v``), a
last layer that reuses an earlier one's keys and values and has a double-wide MLP,
and per-layer input embeddings added at the end of every block.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

VOCAB_SIZE = 160
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"

_CORPUS = (
    "The capital of France is Paris.",
    "The capital of Italy is Rome, and the capital of Spain is Madrid.",
    "When Mary and John went to the store, John gave a drink to Mary.",
    "a b a. c d c. e f e. a b b. c d d. e f f.",
    "One two three four five six seven eight nine ten.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a little model that learned to count.",
)

_SMALL = {"num_hidden_layers": 2, "max_position_embeddings": 64}
_ROPE_GQA = {**_SMALL, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4}

# Tiny configs per family: every entry is a model_type known to AutoConfig plus overrides.
_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {**_ROPE_GQA, "num_key_value_heads": 2}),
    "mistral": ("mistral", {**_ROPE_GQA, "num_key_value_heads": 2, "sliding_window": 8}),
    "mixtral": (
        "mixtral",
        {**_ROPE_GQA, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "qwen2": ("qwen2", {**_ROPE_GQA, "num_key_value_heads": 2}),
    "qwen3": ("qwen3", {**_ROPE_GQA, "num_key_value_heads": 2, "head_dim": 16}),
    "qwen2_moe": (
        "qwen2_moe",
        {
            **_ROPE_GQA,
            "num_key_value_heads": 4,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 32,
            "mlp_only_layers": [1],
        },
    ),
    "qwen3_moe": (
        "qwen3_moe",
        {
            **_ROPE_GQA,
            "num_key_value_heads": 2,
            "head_dim": 12,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
        },
    ),
    "gemma": (
        "gemma",
        {**_ROPE_GQA, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 24},
    ),
    "gemma2": (
        "gemma2",
        {
            **_ROPE_GQA,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 4,
            "final_logit_softcapping": 3.0,
            "attn_logit_softcapping": 5.0,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "gemma3_text": (
        "gemma3_text",
        {
            **_ROPE_GQA,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 4,
            "final_logit_softcapping": 3.0,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "gemma4_text": (
        "gemma4_text",
        {
            **_ROPE_GQA,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "global_head_dim": 32,
            "num_global_key_value_heads": 1,
            "attention_k_eq_v": True,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention", "full_attention"],
            "hidden_size_per_layer_input": 8,
            "vocab_size_per_layer_input": VOCAB_SIZE,
            "num_kv_shared_layers": 1,
            "use_double_wide_mlp": True,
            "final_logit_softcapping": 3.0,
        },
    ),
    "phi": ("phi", {**_ROPE_GQA}),
    "phi3": ("phi3", {**_ROPE_GQA, "num_key_value_heads": 2}),
    "gpt2": ("gpt2", {"n_layer": 2, "n_positions": 64, "n_embd": 32, "n_head": 4, "n_inner": 64}),
    "gpt_neox": ("gpt_neox", {**_ROPE_GQA, "use_parallel_residual": True}),
    "gptj": ("gptj", {"n_layer": 2, "n_positions": 64, "n_embd": 32, "n_head": 4, "rotary_dim": 4}),
    "olmo": ("olmo", {**_ROPE_GQA}),
    "olmo2": ("olmo2", {**_ROPE_GQA, "num_key_value_heads": 2}),
    "granite": (
        "granite",
        {
            **_ROPE_GQA,
            "num_key_value_heads": 2,
            "embedding_multiplier": 2.0,
            "residual_multiplier": 0.5,
            "attention_multiplier": 0.3,
            "logits_scaling": 4.0,
        },
    ),
    "cohere": ("cohere", {**_ROPE_GQA, "num_key_value_heads": 2, "logit_scale": 0.5}),
    "falcon": (
        "falcon",
        {
            **_SMALL,
            "hidden_size": 32,
            "num_attention_heads": 4,
            "parallel_attn": True,
            "alibi": False,
        },
    ),
    "stablelm": (
        "stablelm",
        {**_ROPE_GQA, "num_key_value_heads": 2, "use_parallel_residual": False},
    ),
    "starcoder2": ("starcoder2", {**_ROPE_GQA, "num_key_value_heads": 2}),
    "gpt_neox_sequential": ("gpt_neox", {**_ROPE_GQA, "use_parallel_residual": False}),
    "codegen": (
        "codegen",
        {"n_layer": 2, "n_positions": 64, "n_embd": 32, "n_head": 4, "rotary_dim": 4},
    ),
    "gpt_bigcode": ("gpt_bigcode", {"n_layer": 2, "n_positions": 64, "n_embd": 32, "n_head": 4}),
    "olmoe": (
        "olmoe",
        {
            **_ROPE_GQA,
            "intermediate_size": 32,
            "num_key_value_heads": 2,
            "num_experts": 4,
            "num_experts_per_tok": 2,
        },
    ),
    "deepseek_v3": (
        "deepseek_v3",
        {
            **_ROPE_GQA,
            "num_key_value_heads": 4,
            "moe_intermediate_size": 16,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
            "q_lora_rank": 16,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 4,
            "qk_nope_head_dim": 8,
            "v_head_dim": 6,
            "head_dim": 4,
        },
    ),
    "bloom": ("bloom", {"n_layer": 2, "hidden_size": 32, "n_head": 4}),
    "mpt": (
        "mpt",
        {"n_layers": 2, "d_model": 32, "n_heads": 4, "max_seq_len": 64, "expansion_ratio": 2},
    ),
    "opt": (
        "opt",
        {
            **_SMALL,
            "hidden_size": 32,
            "ffn_dim": 64,
            "num_attention_heads": 4,
            "word_embed_proj_dim": 32,
        },
    ),
}

FAMILIES: list[str] = list(_CONFIGS)
"""Names accepted by :func:`build_tiny_model`: one tiny configuration per family."""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer that prepends ``<s>``.

    Byte-level like GPT-2 and Qwen, so that families whose tokenizer class rebuilds the
    pipeline from the vocabulary (AutoTokenizer forces ``Qwen2Tokenizer`` for qwen2)
    tokenise the same way. Its alphabet is printable ASCII, space and newline only,
    to stay under 200 ids.
    """
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=[chr(c) for c in range(33, 127)] + ["\u0120", "\u010a"],
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=True),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD
    )


def tiny_config(family: str) -> PretrainedConfig:
    """The configuration :func:`build_tiny_model` builds ``family`` from."""
    if family not in _CONFIGS:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    model_type, overrides = _CONFIGS[family]
    tokenizer = build_tokenizer()
    return AutoConfig.for_model(
        model_type,
        vocab_size=VOCAB_SIZE,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.1,
        **overrides,
    )


def build_tiny_model(family: str, path: Path, *, seed: int = 0) -> Path:
    """Save a random tiny ``family`` model and its tokenizer into ``path``; return ``path``."""
    return save_random_model(tiny_config(family), build_tokenizer(), path, seed=seed)


def save_random_model(
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Build ``config``'s causal LM with random weights in ``dtype`` and save it with
    ``tokenizer`` (also what ``bench/shapes.py`` builds real shapes with)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
