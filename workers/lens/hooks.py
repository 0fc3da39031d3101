"""Hook helpers: context managers that record (and optionally change) what flows through a model.

A public toolkit for in-process users of the core (docs/hooks.md); the service's own
passes do not use it.

Each helper registers its PyTorch hooks on entry and removes every handle on
exit, also when the body raises, so a shared resident model is never left
hooked. What a hook saw is kept, in call order, in the :class:`Recording` the
context yields; recorded tensors are detached copies, so later in-place
updates by autograd or by the model cannot change them.

Module backward hooks are attached to the autograd graph during the forward
pass: run the forward inside the context. A graph built inside keeps a
reference to them, so they also go quiet on exit: a later backward through that
graph is neither recorded nor changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import torch
from torch import nn

from workers.lens.errors import InvalidParameter

T = TypeVar("T")
Grads = tuple[torch.Tensor | None, ...]
Side = Literal["input", "output"]


class Recording(Generic[T]):
    """What a hook saw: one entry per call, in call order, filled while its context is open."""

    def __init__(self) -> None:
        self.calls: list[T] = []

    def __len__(self) -> int:
        return len(self.calls)

    def __iter__(self) -> Iterator[T]:
        return iter(self.calls)

    @property
    def last(self) -> T:
        """The latest call's record; an error when the hook never fired."""
        if not self.calls:
            raise LookupError("the hook has not fired")
        return self.calls[-1]


@dataclass(frozen=True)
class ModuleGrads:
    """Gradients of one backward pass at a module's boundary.

    ``side="output"``: one entry per tensor the module returned (the gradient of
    the loss w.r.t. that output). ``side="input"``: one entry per positional
    tensor argument (keyword arguments are invisible to module backward hooks).
    Entries are ``None`` where no gradient flows.
    """

    side: Side
    grads: Grads


@dataclass(frozen=True)
class ForwardCall:
    """One forward call as the module was about to receive it (before any edit)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    edited: bool


@dataclass(frozen=True)
class NodeGrads:
    """One backward step through an autograd node.

    ``grad_outputs`` arrive at the node (gradients w.r.t. the forward outputs
    of the operation); ``grad_inputs`` leave it (gradients w.r.t. the
    operation's inputs), ``None`` for a hook that runs before the node.
    """

    grad_outputs: Grads
    grad_inputs: Grads | None


def _copy(grads: tuple[Any, ...] | None) -> Grads:
    return tuple(g.detach().clone() if isinstance(g, torch.Tensor) else None for g in grads or ())


@contextmanager
def module_grads(module: nn.Module, *, side: Side = "output") -> Iterator[Recording[ModuleGrads]]:
    """Record the gradients at a module's output or positional-input side on every backward.

    Uses a full backward hook, which fires once the gradients w.r.t. the
    module's inputs are computed; on the ``output`` side it also fires when no
    input needs a gradient but the module's own computation does (a frozen
    block whose head gates are being fitted), with ``None`` on the input side.
    """
    if side not in ("input", "output"):
        raise InvalidParameter("side", f"must be 'input' or 'output', got {side!r}")
    recording: Recording[ModuleGrads] = Recording()
    active = [True]

    def hook(_module: nn.Module, grad_input: Grads, grad_output: Grads) -> None:
        if active[0]:
            grads = grad_input if side == "input" else grad_output
            recording.calls.append(ModuleGrads(side=side, grads=_copy(grads)))

    handle = module.register_full_backward_hook(hook)
    try:
        yield recording
    finally:
        active[0] = False
        handle.remove()


KwargsEdit = Callable[[dict[str, Any]], dict[str, Any] | None]


@contextmanager
def forward_kwargs(
    module: nn.Module, edit: KwargsEdit | None = None
) -> Iterator[Recording[ForwardCall]]:
    """Record a module's forward arguments and optionally replace its keyword arguments.

    ``edit`` gets the keyword arguments the module is about to receive (the
    attention mask, position ids, position embeddings… in transformers blocks)
    and returns the keyword arguments to use instead, or ``None`` to keep them.
    Positional arguments are recorded but passed on unchanged.
    """
    recording: Recording[ForwardCall] = Recording()

    def hook(
        _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        new_kwargs = edit(dict(kwargs)) if edit is not None else None
        recording.calls.append(
            ForwardCall(args=args, kwargs=dict(kwargs), edited=new_kwargs is not None)
        )
        return None if new_kwargs is None else (args, new_kwargs)

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield recording
    finally:
        handle.remove()


GradEdit = Callable[[torch.Tensor], torch.Tensor | None]


@contextmanager
def tensor_grad(
    tensor: torch.Tensor, modify: GradEdit | None = None
) -> Iterator[Recording[torch.Tensor]]:
    """Record the gradient w.r.t. one activation tensor, optionally replacing it.

    ``modify`` gets the incoming gradient (same shape as ``tensor``) and returns
    the gradient to propagate further instead, or ``None`` to keep it. The
    recording holds the gradient as it arrived, before ``modify``.
    """
    if not tensor.requires_grad:
        raise InvalidParameter("tensor", "does not require grad: no gradient will reach it")
    recording: Recording[torch.Tensor] = Recording()

    def hook(grad: torch.Tensor) -> torch.Tensor | None:
        recording.calls.append(grad.detach().clone())
        return modify(grad) if modify is not None else None

    handle = tensor.register_hook(hook)
    try:
        yield recording
    finally:
        handle.remove()


NodeEdit = Callable[[Grads], Grads | None]


@contextmanager
def node_grads(
    target: torch.Tensor | torch.autograd.graph.Node,
    *,
    when: Literal["before", "after"] = "after",
    modify: NodeEdit | None = None,
) -> Iterator[Recording[NodeGrads]]:
    """Hook an autograd graph node (a tensor's ``grad_fn``, or any node reached from it).

    ``when="after"``: the hook runs once the node has computed the gradients for
    its inputs; ``modify`` may replace those (``grad_inputs``). ``when="before"``:
    it runs before the node, sees only the arriving ``grad_outputs`` and
    ``modify`` may replace them. ``modify`` returns a tuple of the same length,
    or ``None`` to keep what it got.
    """
    node = target.grad_fn if isinstance(target, torch.Tensor) else target
    if node is None:
        raise InvalidParameter("tensor", "has no grad_fn (a leaf or a tensor outside the graph)")
    if when not in ("before", "after"):
        raise InvalidParameter("when", f"must be 'before' or 'after', got {when!r}")
    recording: Recording[NodeGrads] = Recording()

    def after(grad_inputs: Grads, grad_outputs: Grads) -> Grads | None:
        recording.calls.append(NodeGrads(_copy(grad_outputs), _copy(grad_inputs)))
        return modify(grad_inputs) if modify is not None else None

    def before(grad_outputs: Grads) -> Grads | None:
        recording.calls.append(NodeGrads(_copy(grad_outputs), None))
        return modify(grad_outputs) if modify is not None else None

    handle = node.register_hook(after) if when == "after" else node.register_prehook(before)
    try:
        yield recording
    finally:
        handle.remove()


@contextmanager
def module_grads_entering(
    module: nn.Module, modify: NodeEdit | None = None
) -> Iterator[Recording[ModuleGrads]]:
    """Record the gradient arriving at a module's outputs before its backward runs.

    Unlike :func:`module_grads`, this fires before any gradient is propagated
    through the module, so ``modify`` (returning a tuple like the one it got, or
    ``None``) changes what the module's backward, and everything upstream, sees.
    """
    recording: Recording[ModuleGrads] = Recording()
    active = [True]

    def hook(_module: nn.Module, grad_output: Grads) -> Grads | None:
        if not active[0]:
            return None
        recording.calls.append(ModuleGrads(side="output", grads=_copy(grad_output)))
        return modify(grad_output) if modify is not None else None

    handle = module.register_full_backward_pre_hook(hook)
    try:
        yield recording
    finally:
        active[0] = False
        handle.remove()
