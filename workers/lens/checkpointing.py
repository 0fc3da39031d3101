"""Gradient checkpointing per block: keep each block's input, recompute the rest.

A backward pass through a long input keeps every block's activations (queries, keys,
values, the MLP's inner width…) until it runs. Checkpointed, a block keeps only its
input and recomputes its activations when the backward pass reaches it: the memory of
one block's graph instead of all of them, for one more forward pass of each block. Jobs
that differentiate (attribute, chg, cchg) turn it on for inputs of ``checkpoint_above``
tokens or more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from workers.lens.adapters import ModelAdapter

DEFAULT_CHECKPOINT_ABOVE = 512
"""Inputs of this many tokens or more are checkpointed unless a job says otherwise."""

Recompute = Callable[[], AbstractContextManager[object]]
"""A context to recompute a block under: the hooks its forward pass ran with, when the
backward pass comes after they were removed."""


@contextmanager
def checkpointed_blocks(
    adapter: ModelAdapter, *, enabled: bool, recompute: Recompute | None = None
) -> Iterator[None]:
    """Recompute each block's activations in the backward pass instead of keeping them.

    transformers' own ``gradient_checkpointing_enable`` only acts on modules in
    training mode (and leaves an input-embedding hook behind), while resident
    models stay in eval mode; wrapping each block's ``forward`` on the instance
    checkpoints any adapted model and is undone exactly on exit. A backward pass that
    runs after the forward pass's hooks are gone needs them back to recompute the same
    activations: ``recompute`` gives them (leave it out when the backward pass runs
    inside the hooks' context, or they would act twice).
    """
    if not enabled:
        yield
        return
    saved: list[tuple[torch.nn.Module, Callable[..., Any] | None]] = []
    try:
        for parts in adapter.blocks:
            block = parts.block
            saved.append((block, block.__dict__.get("forward")))
            block.forward = partial(checkpoint_call, block.forward, recompute=recompute)
        yield
    finally:
        for block, own in reversed(saved):
            if own is None:
                del block.forward
            else:
                block.forward = own


def checkpoint_call(
    forward: Callable[..., Any], *args: Any, recompute: Recompute | None = None, **kwargs: Any
) -> Any:
    """``forward(*args, **kwargs)``, its activations recomputed in the backward pass (under
    ``recompute``'s context, if given) instead of kept."""

    def contexts() -> tuple[AbstractContextManager[object], AbstractContextManager[object]]:
        return nullcontext(), recompute() if recompute is not None else nullcontext()

    return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)
