"""A gated forward pass written out for Llama-style decoders, for the gate fits.

A gate fit spends nearly all its time in forward and backward passes of the frozen
model under many gate sets. For decoders built like Llama (pre-norm blocks of rotary
self-attention then an MLP, with no other parts: Llama, Mistral, Qwen 2 and 3, …),
writing the pass out skips work that hooks on the stock forward cannot:

- before the first gate nothing differs between gate sets, so the embedding, the first
  norm and the first attention run once on the unrepeated rows; the gate sets part
  ways only at the first W_O;
- after the last attention only the picked (target) positions are ever read, so the
  last block computes queries, attention, W_O and its MLP at those positions only
  (keys and values still at every position), and the final norm and LM head likewise.

The blocks' own modules (projections, norms, MLP, rotary embedding) do the maths; only
the wiring is written here. ``workers.lens.gated_forward`` checks once per model that
this pass gives a plain pass's logits before it uses it, and :func:`applies` refuses
models whose parts are not exactly these.
"""

from __future__ import annotations

from functools import partial
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from workers.lens.adapters import BlockKind, BlockParts, ModelAdapter
from workers.lens.checkpointing import checkpoint_call
from workers.lens.loading import LoadedModel

_BLOCK_PARTS = frozenset({"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"})
_ATTENTION_PARTS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
_QK_NORMS = frozenset({"q_norm", "k_norm"})
_UNSUPPORTED_SETTINGS = ("clip_qkv", "attn_logit_softcapping")
"""Config entries that change attention inside the module where a check on a few random
tokens may not notice (OLMo clamps q, k and v only past a bound)."""


def applies(lm: LoadedModel) -> bool:
    """Whether ``lm`` is built as this pass assumes (looked at once per model, when its
    logits are checked; :func:`covers` then says which inputs it may take)."""
    if lm.spread:  # its blocks' inputs would need moving between devices
        return False
    config = lm.model.config
    if any(getattr(config, name, None) is not None for name in _UNSUPPORTED_SETTINGS):
        return False
    return _rotary(lm.adapter) is not None and all(
        _is_llama_block(parts.block, parts.attention, parts.o_proj, parts.mlp, parts.kind)
        for parts in lm.adapter.blocks
    )


def covers(lm: LoadedModel, seq: int) -> bool:
    """Whether sequences of ``seq`` tokens may take this pass. Sliding-window attention
    only differs from full attention past the window, which the check once per model
    would not see; longer sequences take the hooked pass."""
    window = getattr(lm.model.config, "sliding_window", None)
    return not (isinstance(window, int) and seq > window)


def gated_logits(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    gates: torch.Tensor,
    kept: int,
    pick: torch.Tensor,
    *,
    checkpointed: bool = False,
) -> torch.Tensor:
    """Logits [sets * rows, picks, vocab], as ``workers.lens.gated_forward.gated_logits``
    defines them: under each gate set of ``gates`` [sets, layers, heads], at positions
    ``pick`` [rows, picks] counted within the last ``kept`` of ``input_ids`` [rows, seq];
    ``checkpointed``: each block's activations are recomputed in the backward pass."""
    adapter = lm.adapter
    sets, (rows, seq) = gates.shape[0], input_ids.shape
    rotary = _rotary(adapter)
    assert rotary is not None, "applies() was checked first"
    at = seq - kept + pick
    hidden = adapter.input_embeddings(input_ids)
    cos, sin = rotary(hidden, torch.arange(seq, device=hidden.device)[None])
    for layer, parts in enumerate(adapter.blocks):
        shared = layer == 0  # rows not yet repeated per gate set
        last = layer == len(adapter.blocks) - 1
        where = None if not last else at if shared else at.repeat(sets, 1)
        run = partial(_block, parts, cos=cos, sin=sin, where=where, shared=shared, rows=rows)
        g = gates[:, layer]
        hidden = checkpoint_call(run, hidden, g) if checkpointed else run(hidden, g)
    return adapter.logit_transform(adapter.lm_head(adapter.final_norm(hidden)))


def _block(
    parts: BlockParts,
    hidden: torch.Tensor,
    gates: torch.Tensor,
    *,
    cos: torch.Tensor,
    sin: torch.Tensor,
    where: torch.Tensor | None,
    shared: bool,
    rows: int,
) -> torch.Tensor:
    """One block under ``gates`` [sets, heads]: ``hidden`` [rows, seq, dim] before the
    first gate (``shared``), [sets * rows, seq, dim] after; only at ``where`` in the last."""
    block, attention = parts.block, parts.attention
    heads = _attend(attention, cast(nn.Module, block.input_layernorm)(hidden), cos, sin, where)
    if where is not None:
        hidden = _gather(hidden, where)
    g = gates.to(heads.dtype)
    if shared:
        gated = heads[None] * g[:, None, None, :, None]
        hidden = (hidden + parts.o_proj(gated.flatten(-2))).flatten(0, 1)
    else:
        gated = heads.unflatten(0, (gates.shape[0], rows)) * g[:, None, None, :, None]
        hidden = hidden + parts.o_proj(gated.flatten(-2).flatten(0, 1))
    return hidden + parts.mlp(cast(nn.Module, block.post_attention_layernorm)(hidden))


def _attend(
    attention: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    where: torch.Tensor | None,
) -> torch.Tensor:
    """Causal self-attention of ``x`` [rows, seq, dim] → per-head outputs [rows, q, heads,
    head_dim], at every position or, given ``where`` [rows, q], at those positions only."""
    rows, seq, _ = x.shape
    head_dim = attention.head_dim
    k = cast(nn.Module, attention.k_proj)(x).view(rows, seq, -1, head_dim)
    v = cast(nn.Module, attention.v_proj)(x).view(rows, seq, -1, head_dim).transpose(1, 2)
    queried = x if where is None else _gather(x, where)
    q = cast(nn.Module, attention.q_proj)(queried).view(rows, queried.shape[1], -1, head_dim)
    if hasattr(attention, "q_norm"):
        q, k = cast(nn.Module, attention.q_norm)(q), cast(nn.Module, attention.k_norm)(k)
    k = _rotate(k.transpose(1, 2), cos[:, None], sin[:, None])
    if where is None:
        q = _rotate(q.transpose(1, 2), cos[:, None], sin[:, None])
        mask = None
    else:
        q = _rotate(q.transpose(1, 2), cos[0][where][:, None], sin[0][where][:, None])
        mask = where[:, None, :, None] >= torch.arange(seq, device=x.device)
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=mask is None,
        scale=cast(float, attention.scaling),
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.transpose(1, 2)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` [..., head_dim], halves rotated (the Llama convention)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _gather(x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``x`` [rows, seq, dim] at ``where`` [rows, q] → [rows, q, dim]."""
    return x.gather(1, where[..., None].expand(-1, -1, x.shape[-1]))


def _rotary(adapter: ModelAdapter) -> nn.Module | None:
    rotary = getattr(adapter.model.base_model, "rotary_emb", None)
    return rotary if isinstance(rotary, nn.Module) else None


def _is_llama_block(
    block: nn.Module, attention: nn.Module, o_proj: nn.Module, mlp: nn.Module, kind: BlockKind
) -> bool:
    parts = {name for name, _ in block.named_children()}
    attention_parts = {name for name, _ in attention.named_children()}
    return (
        kind is BlockKind.SEQUENTIAL
        and parts == _BLOCK_PARTS
        and getattr(block, "self_attn", None) is attention
        and getattr(block, "mlp", None) is mlp
        and getattr(attention, "o_proj", None) is o_proj
        and attention_parts in (_ATTENTION_PARTS, _ATTENTION_PARTS | _QK_NORMS)
        and isinstance(getattr(attention, "head_dim", None), int)
        and isinstance(getattr(attention, "scaling", None), float)
    )
