"""Load a model once, with its tokenizer and adapter, on the right device and dtype."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    placement: tuple[str, ...] = ()
    """Where the parts of a model loaded with a ``device_map`` live (``"cuda:0"``,
    ``"cpu"``, ``"disk"``); empty when the whole model is on ``device``."""

    @property
    def devices(self) -> set[torch.device]:
        """The devices that hold or run part of it."""
        return {self.device} | {torch.device(p) for p in self.placement if p != "disk"}

    @property
    def spread(self) -> bool:
        """Whether its layers live in more than one place."""
        return len(self.placement) > 1

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


def _check_local(source: str) -> None:
    """A source written as a path must be a directory: transformers would take a missing
    one for a malformed hub id and say only that. (``ModelSpec`` has expanded ``~``.)"""
    if source.startswith(("/", "./", "../")) and not Path(source).is_dir():
        raise FileNotFoundError("no such directory (a hub id looks like 'org/name')")


def load_model(
    source: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    device_map: str | dict[str, int | str] | None = None,
    offload_dir: Path | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load ``source`` (a local directory or hub id) with ``from_pretrained``, safetensors only.

    With ``device_map`` (accelerate's strategies or a module → device map) the model is
    spread over several devices, modules mapped to ``"disk"`` offloaded to ``offload_dir``.
    Inputs then go to the embedding's device; the outputs come back to it.
    """
    if device is not None and device_map is not None:
        raise ValueError("give either device or device_map, not both")
    _check_local(source)
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    dispatch: dict[str, Any] = {}
    if device_map is not None:
        if importlib.util.find_spec("accelerate") is None:
            raise RuntimeError(
                "device_map needs the accelerate package: pip install 'lens-server[multi-gpu]'"
            )
        dispatch = {"device_map": device_map, "offload_folder": offload_dir}
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dt, use_safetensors=True, trust_remote_code=trust_remote_code, **dispatch
    )
    where: tuple[str, ...] = ()
    if device_map is None:
        model.to(dev)  # type: ignore[arg-type]  # transformers' @wraps(Module.to) loses self
    else:
        # transformers leaves no map when everything landed on one device
        mapped = getattr(model, "hf_device_map", None) or {"": next(model.parameters()).device}
        where = tuple(sorted({_place(d) for d in mapped.values()}))
        dev = _execution_device(model.get_input_embeddings())
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(
        source=source,
        model=model,
        tokenizer=tokenizer,
        adapter=adapt(model),
        device=dev,
        dtype=dt,
        placement=where,
    )


def _place(value: int | str | torch.device) -> str:
    """An accelerate device-map value as a name: ``0`` → ``"cuda:0"``; "cpu" and "disk" kept."""
    return "disk" if value == "disk" else str(_as_device(value))


def _as_device(value: int | str | torch.device) -> torch.device:
    return torch.device("cuda", value) if isinstance(value, int) else torch.device(value)


def _execution_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` computes: accelerate's hook says so for a dispatched module
    (its weights may be offloaded); else where its weights are."""
    hook = getattr(module, "_hf_hook", None)
    where = getattr(hook, "execution_device", None)
    if where is not None:
        return _as_device(where)
    return next(module.parameters()).device
