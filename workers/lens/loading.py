"""Load a model once, with its tokenizer and adapter, on the right device and dtype."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from workers.lens.adapters import ModelAdapter, adapt

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class LoadedModel:
    """A resident model: weights, tokenizer, adapter and where it lives."""

    source: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: ModelAdapter
    device: torch.device
    dtype: torch.dtype

    @property
    def max_context(self) -> int | None:
        config = self.model.config.get_text_config()
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, name, None)
            if value:
                return int(value)
        return None


def pick_device(device: str | None = None) -> torch.device:
    """The requested device, else CUDA when available, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device, dtype: str | None = None) -> torch.dtype:
    """The requested dtype, else bf16 (or fp16 without bf16 support) on CUDA and fp32 on CPU."""
    if dtype:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(
    source: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load ``source`` (a local directory or hub id) with ``from_pretrained``, safetensors only."""
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dt, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    model.to(dev).eval()  # type: ignore[arg-type]  # transformers' @wraps(Module.to) loses self
    model.requires_grad_(False)
    return LoadedModel(
        source=source,
        model=model,
        tokenizer=tokenizer,
        adapter=adapt(model),
        device=dev,
        dtype=dt,
    )
