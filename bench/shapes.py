"""The shapes of the models labs serve, built here with random weights.

No hub is reachable from the benchmark's machines, but the shapes are public: each
entry below holds the values of the model's published ``config.json`` that set what it
costs (hidden and MLP widths, layers, query and key/value heads, head width,
vocabulary, tied embeddings, rope settings, context). A model built from them with
random weights costs, in time and memory, what the real one does; only what it
predicts differs. The token ids of BOS/EOS/padding are the local tokenizer's (the real
ones index a vocabulary we do not have).

:func:`build_shape` saves a shape with ``save_pretrained`` (weights in bfloat16, as the
real checkpoints are published) and a local byte-level BPE tokenizer padded to the
model's vocabulary size, so ``lens serve --model NAME=DIR`` loads it as it would the real
checkpoint::

    python -m bench.shapes llama-3.2-1b            # builds into ~/.cache/lens-bench/shapes
    lens serve --model llama-3.2-1b=~/.cache/lens-bench/shapes/llama-3.2-1b
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

from workers.lens.testing import BOS, EOS, PAD, UNK, build_tokenizer, save_random_model

CACHE_ENV = "LENS_BENCH_SHAPES"
DEFAULT_CACHE = Path.home() / ".cache" / "lens-bench" / "shapes"


@dataclass(frozen=True)
class Shape:
    """A published model's shape: its hub id and the ``config.json`` values that size it."""

    name: str
    mirrors: str
    model_type: str
    config: dict[str, Any]
    built_by_default: bool = True
    """False where building it on a small CPU machine is not reasonable (its size says why)."""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def vocab_size(self) -> int:
        return int(self.config.get("vocab_size", 0))

    def hf_config(self) -> PretrainedConfig:
        """The transformers configuration, with the local tokenizer's special ids."""
        return AutoConfig.for_model(
            self.model_type,
            **self.config,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )

    def parameters(self) -> int:
        """Parameter count (tied weights once), from a model built on the meta device."""
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.hf_config())
        return sum(p.numel() for p in model.parameters())


_LLAMA_3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
}

SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape(
            "smollm2-135m",
            "HuggingFaceTB/SmolLM2-135M",
            "llama",
            {
                "hidden_size": 576,
                "intermediate_size": 1536,
                "num_hidden_layers": 30,
                "num_attention_heads": 9,
                "num_key_value_heads": 3,
                "head_dim": 64,
                "vocab_size": 49152,
                "tie_word_embeddings": True,
                "rope_theta": 100000.0,
                "max_position_embeddings": 8192,
                "rms_norm_eps": 1e-5,
                "hidden_act": "silu",
            },
        ),
        Shape(
            "pythia-160m",
            "EleutherAI/pythia-160m",
            "gpt_neox",
            {
                "hidden_size": 768,
                "intermediate_size": 3072,
                "num_hidden_layers": 12,
                "num_attention_heads": 12,
                "vocab_size": 50304,
                "tie_word_embeddings": False,
                "rotary_pct": 0.25,
                "rotary_emb_base": 10000,
                "max_position_embeddings": 2048,
                "use_parallel_residual": True,
                "layer_norm_eps": 1e-5,
                "hidden_act": "gelu",
            },
        ),
        Shape(
            "gpt2",
            "openai-community/gpt2",
            "gpt2",
            {
                "n_embd": 768,
                "n_layer": 12,
                "n_head": 12,
                "n_positions": 1024,
                "n_ctx": 1024,
                "n_inner": None,
                "vocab_size": 50257,
                "tie_word_embeddings": True,
                "activation_function": "gelu_new",
                "layer_norm_epsilon": 1e-5,
            },
        ),
        Shape(
            "qwen2.5-0.5b",
            "Qwen/Qwen2.5-0.5B",
            "qwen2",
            {
                "hidden_size": 896,
                "intermediate_size": 4864,
                "num_hidden_layers": 24,
                "num_attention_heads": 14,
                "num_key_value_heads": 2,
                "vocab_size": 151936,
                "tie_word_embeddings": True,
                "rope_theta": 1000000.0,
                "max_position_embeddings": 32768,
                "sliding_window": 32768,
                "use_sliding_window": False,
                "max_window_layers": 24,
                "rms_norm_eps": 1e-6,
                "hidden_act": "silu",
            },
        ),
        Shape(
            "llama-3.2-1b",
            "meta-llama/Llama-3.2-1B",
            "llama",
            {
                "hidden_size": 2048,
                "intermediate_size": 8192,
                "num_hidden_layers": 16,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "head_dim": 64,
                "vocab_size": 128256,
                "tie_word_embeddings": True,
                "rope_theta": 500000.0,
                "rope_scaling": _LLAMA_3_ROPE,
                "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-5,
                "hidden_act": "silu",
            },
        ),
        Shape(
            "gemma-4-e2b",
            "google/gemma-4-E2B (its text model)",
            "gemma4_text",
            {
                "hidden_size": 1536,
                "intermediate_size": 6144,
                "num_hidden_layers": 35,
                "num_attention_heads": 8,
                "num_key_value_heads": 1,
                "head_dim": 256,
                "global_head_dim": 512,
                "num_global_key_value_heads": None,
                "attention_k_eq_v": False,
                "sliding_window": 512,
                "layer_types": (["sliding_attention"] * 4 + ["full_attention"]) * 7,
                "vocab_size": 262144,
                "vocab_size_per_layer_input": 262144,
                "hidden_size_per_layer_input": 256,
                "num_kv_shared_layers": 20,
                "use_double_wide_mlp": True,
                "tie_word_embeddings": True,
                "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-6,
                "hidden_activation": "gelu_pytorch_tanh",
                "final_logit_softcapping": 30.0,
            },
            built_by_default=False,
            notes=(
                "4.6 B parameters in its text model (2.3 B of them per-layer input "
                "embeddings): 18.5 GB in float32, more than a 24 GB machine shared with "
                "others should build; built on request (python -m bench.shapes gemma-4-e2b)",
                "head width 256 in sliding layers, 512 in the 7 full-attention ones; gates "
                "stay [35, 8]",
            ),
        ),
    )
}
"""The shapes by name. Gemma 4 E2B's rope settings are transformers' defaults for
``gemma4_text``, which are the published ones (sliding: θ = 10,000; full attention:
proportional, θ = 1,000,000 on a quarter of each head)."""

DEFAULT_SHAPES: tuple[str, ...] = tuple(n for n, s in SHAPES.items() if s.built_by_default)


def cache_dir() -> Path:
    """Where built shapes are kept: ``$LENS_BENCH_SHAPES`` or ``~/.cache/lens-bench/shapes``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def sized_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """The test suite's byte-level BPE with its vocabulary padded to ``vocab_size`` entries.

    The padding entries (``<unused_N>``) have no merge that makes them, so they are never
    produced; they give the tokenizer the model's vocabulary size, as a real one has.
    """
    base = build_tokenizer()
    data = json.loads(base.backend_tokenizer.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size {vocab_size} is below the base tokenizer's {len(vocab)}")
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), vocab_size)})
    backend = Tokenizer.from_str(json.dumps(data))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD
    )


def build_shape(name: str, root: Path | None = None) -> Path:
    """``root/name`` holding the shape's random model and tokenizer (built once, then reused)."""
    shape = SHAPES[name]
    path = (root or cache_dir()) / name
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    config = shape.hf_config()
    config.dtype = torch.bfloat16
    return save_random_model(config, sized_tokenizer(shape.vocab_size), path, dtype=torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"shapes (default: {', '.join(DEFAULT_SHAPES)})")
    parser.add_argument("--root", type=Path, help=f"where to build (default: {cache_dir()})")
    parser.add_argument("--list", action="store_true", help="print the shapes and exit")
    args = parser.parse_args()
    if args.list:
        for shape in SHAPES.values():
            print(f"{shape.name}: {shape.mirrors}, {shape.parameters() / 1e6:.0f} M parameters")
        return
    for name in args.names or DEFAULT_SHAPES:
        print(build_shape(name, args.root), flush=True)


if __name__ == "__main__":
    main()
