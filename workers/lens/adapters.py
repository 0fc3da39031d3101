"""Find the parts of a decoder-only causal LM that the analyses hook into.

Detection works from module structure and config so that a new family mostly
works without code; a model that cannot be adapted fails here, at load, with an
error naming what was not found.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

from workers.lens.errors import ModelNotAdaptable

_BLOCK_LISTS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")
_ATTENTION = ("self_attn", "attn", "attention", "self_attention")
_O_PROJ = ("o_proj", "dense", "c_proj", "out_proj")
_MLP = ("mlp", "feed_forward", "block_sparse_moe")
_FINAL_NORM = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm")


@dataclass(frozen=True)
class BlockParts:
    """The modules of one transformer block."""

    block: nn.Module
    attention: nn.Module
    o_proj: nn.Module
    mlp: nn.Module


@dataclass(frozen=True)
class ModelAdapter:
    """A loaded model's parts and head geometry, found once at load."""

    model: PreTrainedModel
    family: str
    blocks: tuple[BlockParts, ...]
    final_norm: nn.Module
    lm_head: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    parallel_blocks: bool

    @property
    def num_layers(self) -> int:
        return len(self.blocks)


def _get(root: nn.Module, dotted: str) -> nn.Module | None:
    module: object = root
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module if isinstance(module, nn.Module) else None


def _first_child(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return child
    return None


def _require(found: nn.Module | None, what: str, where: str, tried: tuple[str, ...]) -> nn.Module:
    if found is None:
        raise ModelNotAdaptable(f"cannot find the {what} in {where} (looked for {', '.join(tried)})")
    return found


def adapt(model: PreTrainedModel) -> ModelAdapter:
    """Locate blocks, attention output projections, MLPs, final norm and LM head."""
    cls = type(model).__name__
    block_list = next((b for b in map(lambda p: _get(model, p), _BLOCK_LISTS) if b is not None), None)
    if not isinstance(block_list, nn.ModuleList):
        raise ModelNotAdaptable(f"{cls}: cannot find the list of blocks (looked for {_BLOCK_LISTS})")
    blocks = []
    for i, block in enumerate(block_list):
        where = f"{cls} block {i}"
        attention = _require(_first_child(block, _ATTENTION), "attention module", where, _ATTENTION)
        o_proj = _require(_first_child(attention, _O_PROJ), "attention output projection", where, _O_PROJ)
        mlp = _require(_first_child(block, _MLP), "MLP", where, _MLP)
        blocks.append(BlockParts(block=block, attention=attention, o_proj=o_proj, mlp=mlp))
    final_norm = _require(
        next((n for n in map(lambda p: _get(model, p), _FINAL_NORM) if n is not None), None),
        "final norm",
        cls,
        _FINAL_NORM,
    )
    lm_head = _require(model.get_output_embeddings(), "LM head", cls, ("get_output_embeddings()",))
    config = model.config.get_text_config()
    num_heads = int(_config_value(config, cls, "num_attention_heads", "n_head"))
    hidden = int(_config_value(config, cls, "hidden_size", "n_embd"))
    head_dim = getattr(config, "head_dim", None) or hidden // num_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    return ModelAdapter(
        model=model,
        family=getattr(config, "model_type", cls),
        blocks=tuple(blocks),
        final_norm=final_norm,
        lm_head=lm_head,
        num_heads=num_heads,
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        hidden_size=hidden,
        vocab_size=int(_config_value(config, cls, "vocab_size")),
        parallel_blocks=bool(getattr(config, "use_parallel_residual", False)),
    )


def _config_value(config: object, cls: str, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ModelNotAdaptable(f"{cls}: config has none of {names}")
