"""One forward pass of a frozen model under several head-gate sets, doing no needless work.

The batch is repeated once per gate set. Exact shortcuts cut the work of a pass:

- the first block's attention comes before any gate (gates scale the input of W_O), so it
  runs on one copy of the rows and its output is repeated per gate set just before W_O;
- only the positions that predict a target matter after the last block, so the last
  block's MLP runs on the window of positions that holds them (its output elsewhere is
  never read), and the LM head only on each row's own target positions (which matters
  for large vocabularies).

They rely on how a family's modules are called, so each is checked once per loaded model
against a plain pass and used only where it gives the same logits. Llama-style decoders
take a pass written out in ``workers.lens.llama_gated_pass`` instead, which goes further
(the last block works at the picked positions only), under the same check.

The LM head always computes in fp32 (:func:`fp32_lm_head`): the logits of the scored
positions are what every fit, ablation and evaluation reads, and in bf16 a logit near 20
is rounded to a multiple of 0.125, about 0.06 nats per token, the size of the effects an
ablation reports.
"""

from __future__ import annotations

import inspect
from collections.abc import Hashable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import cache
from typing import Any, cast
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from torch import nn

from workers.lens import llama_gated_pass
from workers.lens.adapters import ModelAdapter
from workers.lens.checkpointing import checkpointed_blocks
from workers.lens.gating import head_gates
from workers.lens.loading import LoadedModel


@dataclass(frozen=True)
class Shortcuts:
    """Which exact shortcuts a loaded model supports."""

    share_first_attention: bool
    trim_last_mlp: bool
    pick_head_positions: bool
    written_out: bool = False
    """The pass of ``workers.lens.llama_gated_pass`` (which needs none of the others)."""


_CHECKED: WeakKeyDictionary[nn.Module, Shortcuts] = WeakKeyDictionary()
_PROBE_SHAPE = (2, 6)
_PROBE_KEPT = 2


def gated_logits(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    gates: torch.Tensor,
    kept: int,
    pick: torch.Tensor,
    *,
    checkpointed: bool = False,
) -> torch.Tensor:
    """Logits [sets * rows, picks, vocab] under each gate set of ``gates`` [sets, layers,
    heads] of ``input_ids`` [rows, seq] (right-padded, no attention mask needed), at the
    positions ``pick`` [rows, picks] counted within the last ``kept`` positions. Row
    ``s * rows + i`` is example ``i`` under gate set ``s``. ``checkpointed``: each block
    keeps only its input for the backward pass, which recomputes the rest
    (``workers.lens.checkpointing``); the logits and gradients are the same."""
    return _forward(lm, input_ids, gates, kept, pick, shortcuts(lm), checkpointed)


def shortcuts(lm: LoadedModel) -> Shortcuts:
    """The shortcuts that give ``lm`` the same logits as a plain pass (checked once)."""
    found = _CHECKED.get(lm.model)
    if found is None:
        found = _probe(lm)
        _CHECKED[lm.model] = found
    return found


def _forward(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    gates: torch.Tensor,
    kept: int,
    pick: torch.Tensor,
    use: Shortcuts,
    checkpointed: bool = False,
) -> torch.Tensor:
    if use.written_out and llama_gated_pass.covers(lm, input_ids.shape[1]):
        with _autocast(lm.device), fp32_lm_head(lm.adapter):
            return llama_gated_pass.gated_logits(
                lm, input_ids, gates, kept, pick, checkpointed=checkpointed
            )
    sets, rows = gates.shape[0], input_ids.shape[0]
    extra = {"logits_to_keep": kept} if _keeps_logits(cast(Hashable, type(lm.model))) else {}
    picked = pick.repeat(sets, 1)
    row_gates = gates.repeat_interleave(rows, dim=0)

    @contextmanager
    def pass_hooks() -> Iterator[None]:
        """The hooks of this pass; the backward pass recomputes a checkpointed block under
        them again, as it runs once this pass has removed them."""
        with ExitStack() as stack:
            stack.enter_context(head_gates(lm.adapter, row_gates))
            if use.trim_last_mlp and kept < input_ids.shape[1]:
                stack.enter_context(_last_mlp_only_on(lm.adapter, kept))
            if use.share_first_attention and sets > 1:
                stack.enter_context(_first_attention_once(lm.adapter, rows, sets))
            yield

    with ExitStack() as stack:
        stack.enter_context(pass_hooks())
        if use.pick_head_positions:
            stack.enter_context(_head_only_at(lm.adapter, picked, kept))
        stack.enter_context(
            checkpointed_blocks(lm.adapter, enabled=checkpointed, recompute=pass_hooks)
        )
        stack.enter_context(_autocast(lm.device))
        stack.enter_context(fp32_lm_head(lm.adapter))
        logits = lm.model(input_ids=input_ids.repeat(sets, 1), use_cache=False, **extra).logits
    if use.pick_head_positions:
        return logits
    return _gather_positions(logits[:, -kept:], picked)


def _gather_positions(x: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """``x`` [rows, seq, dim] at ``pick`` [rows, picks] → [rows, picks, dim]."""
    return x.gather(1, pick[..., None].expand(-1, -1, x.shape[-1]))


def _probe(lm: LoadedModel) -> Shortcuts:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(lm.adapter.vocab_size, _PROBE_SHAPE, generator=gen).to(lm.device)
    shape = (2, lm.adapter.num_layers, lm.adapter.num_heads)
    gates = torch.rand(shape, generator=gen).to(lm.device)
    pick = torch.tensor([[1, 1], [0, 1]], device=lm.device)
    none = Shortcuts(False, False, False)
    with torch.inference_mode():
        plain = _forward(lm, ids, gates, _PROBE_KEPT, pick, none).float()

        def exact(use: Shortcuts) -> bool:
            try:
                fast = _forward(lm, ids, gates, _PROBE_KEPT, pick, use).float()
            except Exception:  # any failure only means this family cannot take the shortcut
                return False
            scale = plain.abs().max().item()
            tol = 1e-4 if lm.dtype == torch.float32 else 2e-2
            return fast.shape == plain.shape and bool(((fast - plain).abs() <= tol * scale).all())

        return Shortcuts(
            written_out=llama_gated_pass.applies(lm)
            and llama_gated_pass.covers(lm, _PROBE_SHAPE[1])  # else the probe would not run it
            and exact(replace(none, written_out=True)),
            share_first_attention=exact(replace(none, share_first_attention=True)),
            trim_last_mlp=exact(replace(none, trim_last_mlp=True)),
            pick_head_positions=exact(replace(none, pick_head_positions=True)),
        )


@cache
def _keeps_logits(model_type: type[nn.Module]) -> bool:
    return "logits_to_keep" in inspect.signature(model_type.forward).parameters


def _autocast(device: torch.device) -> AbstractContextManager[object]:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def fp32_lm_head(adapter: ModelAdapter) -> Iterator[None]:
    """Compute the LM head in fp32, outside any autocast, while the context is open.

    The hidden states reaching it (only the scored positions, where a pass picks them) and
    its weight are upcast for the product, so the logits carry fp32 precision whatever the
    model's dtype; gradients still flow to the hidden states. A head that is not a plain
    linear layer is left as it is, its output upcast.
    """
    head = adapter.lm_head
    own = head.__dict__.get("forward")
    original = head.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not isinstance(head, nn.Linear):
            return original(x).float()
        with torch.autocast(x.device.type, enabled=False):
            bias = None if head.bias is None else head.bias.float()
            return F.linear(x.float(), head.weight.float(), bias)

    head.forward = forward
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def _batch_rows(value: Any, total: int, keep: int) -> Any:
    """``value`` cut to its first ``keep`` rows when it is a batch-first tensor of ``total``."""
    if isinstance(value, tuple):
        return tuple(_batch_rows(v, total, keep) for v in value)
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == total:
        return value[:keep]
    return value


@contextmanager
def _first_attention_once(adapter: ModelAdapter, unique: int, sets: int) -> Iterator[None]:
    """Run the first attention on the first ``unique`` rows, then repeat its W_O input."""
    first = adapter.blocks[0]
    total = unique * sets

    def cut(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        kept = {k: _batch_rows(v, total, unique) for k, v in kwargs.items()}
        return _batch_rows(args, total, unique), kept

    def repeat(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        return (x.repeat(sets, *([1] * (x.dim() - 1))), *args[1:])

    with _hooks(
        first.attention.register_forward_pre_hook(cut, with_kwargs=True),
        first.o_proj.register_forward_pre_hook(repeat, prepend=True),
    ):
        yield


@contextmanager
def _last_mlp_only_on(adapter: ModelAdapter, kept: int) -> Iterator[None]:
    """Run the last MLP on the last ``kept`` positions; its output elsewhere is zeros.

    Every [batch, seq, …] input is cut (some families pass the residual in too).
    """
    full: list[int] = []

    def cut(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        full.append(hidden.shape[1])

        def last(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == full[-1]:
                return v[:, -kept:].contiguous()
            return v

        return tuple(map(last, args)), {k: last(v) for k, v in kwargs.items()}

    def pad(_m: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
        skipped = full.pop() - kept
        if isinstance(output, tuple):
            return (F.pad(output[0], (0, 0, skipped, 0)), *output[1:])
        return F.pad(output, (0, 0, skipped, 0))

    mlp = adapter.blocks[-1].mlp
    with _hooks(
        mlp.register_forward_pre_hook(cut, with_kwargs=True), mlp.register_forward_hook(pad)
    ):
        yield


@contextmanager
def _head_only_at(adapter: ModelAdapter, pick: torch.Tensor, kept: int) -> Iterator[None]:
    """Feed the LM head only the hidden states at ``pick`` (within the last ``kept``)."""

    def cut(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        return (_gather_positions(hidden[:, hidden.shape[1] - kept :], pick), *args[1:])

    with _hooks(adapter.lm_head.register_forward_pre_hook(cut)):
        yield


@contextmanager
def _hooks(*handles: torch.utils.hooks.RemovableHandle) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
