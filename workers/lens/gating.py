"""Head gates: scale each head's slice of the attention output projection's input."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from workers.lens.adapters import ModelAdapter
from workers.lens.errors import InvalidParameter


@contextmanager
def head_gates(adapter: ModelAdapter, gates: torch.Tensor) -> Iterator[None]:
    """Multiply each head's output (before W_O) by its gate while the context is open.

    ``gates`` is ``[layers, heads]`` (one gate set for the whole batch) or
    ``[batch, layers, heads]`` (one set per batch row, e.g. several masks
    evaluated in one pass by repeating the batch). Heads are query heads: with
    grouped-query attention each query head has its own gate. The W_O input
    [batch, seq, heads * head_dim] is split into heads, which is where a head's
    contribution is still separable (after W_O the heads are summed); a head is one
    gate whatever its width, which may differ per layer (Gemma 4). Gradients
    flow into ``gates``; they are moved to the activations' device and dtype.
    """
    expected = (adapter.num_layers, adapter.num_heads)
    if gates.dim() not in (2, 3) or tuple(gates.shape[-2:]) != expected:
        raise InvalidParameter(
            "head_mask",
            f"gates must be [layers, heads] = {list(expected)} or [batch, layers, heads], "
            f"got {list(gates.shape)}",
        )
    handles = []
    try:
        for layer, parts in enumerate(adapter.blocks):
            hook = _gate_hook(gates[..., layer, :], adapter.head_dims[layer])
            handles.append(parts.o_proj.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _gate_hook(
    layer_gates: torch.Tensor, head_dim: int
) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]:
    """A pre-hook scaling [..., heads * head_dim] by ``layer_gates`` [heads] or [batch, heads]."""

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        heads = layer_gates.shape[-1]
        g = layer_gates.to(device=x.device, dtype=x.dtype)
        if g.dim() == 1:
            g = g.view(*([1] * (x.dim() - 1)), heads, 1)
        elif g.shape[0] != x.shape[0]:
            raise InvalidParameter(
                "head_mask", f"{g.shape[0]} gate sets for a batch of {x.shape[0]} rows"
            )
        else:
            g = g.view(g.shape[0], *([1] * (x.dim() - 2)), heads, 1)
        gated = (x.unflatten(-1, (heads, head_dim)) * g).flatten(-2)
        return (gated, *args[1:])

    return hook
