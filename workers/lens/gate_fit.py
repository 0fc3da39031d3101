"""Machinery shared by the gate fits (chg, cchg) and ablations.

Several gate sets are scored in one forward pass (see ``workers.lens.gated_forward``).
Nothing here reads a device value back to the host, so a fit queues its updates without
waiting on the device; only the progress reports read the loss (and, for a model that
computes in fp16, the loss scale: see :class:`GateUpdates`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.lens.errors import InvalidParameter
from workers.lens.gated_forward import gated_logits
from workers.lens.loading import LoadedModel
from workers.lens.prompt_targets import IGNORE, TargetBatch
from workers.lens.results import Progress, ProgressCallback

GATE_LOGIT_CLAMP = 4.0
"""The regulariser sees gate logits clamped to ±4, so saturated gates stop being pushed."""

MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class TargetScores:
    """Per gate set and example [sets, batch]: mean target-token log-prob, whether the
    argmax is right at every target position (bool), and the share of target positions
    where it is right (the authors' per-token accuracy)."""

    logprob: torch.Tensor
    correct: torch.Tensor
    token_accuracy: torch.Tensor


def score_targets(
    lm: LoadedModel, batch: TargetBatch, gates: torch.Tensor, checkpoint_above: int | None = None
) -> TargetScores:
    """Score ``batch``'s targets under each gate set of ``gates`` [sets, layers, heads].

    Gradients flow into ``gates`` through the log-probs; a batch whose rows (padded) hold
    ``checkpoint_above`` tokens or more keeps only each block's input for the backward
    pass, which recomputes the rest (gradient checkpointing: same gradients, less
    memory). The last token is never fed (it predicts nothing), and no attention mask is
    passed: with right padding, causal attention already keeps every real position from
    seeing the pads after it, and without a mask the attention kernels take their faster
    causal path.
    """
    sets, rows = gates.shape[0], len(batch)
    first = min(batch.target_starts) - 1
    checkpointed = (
        checkpoint_above is not None
        and batch.input_ids.shape[1] >= checkpoint_above
        and torch.is_grad_enabled()
    )
    inputs = batch.input_ids[:, :-1]
    window = batch.labels[:, first + 1 :]
    picks = max(n - s for n, s in zip(batch.lengths, batch.target_starts, strict=True))
    # Each row's target positions first, in order (a stable sort keeps it on the device).
    pick = (window == IGNORE).to(torch.uint8).argsort(dim=1, stable=True)[:, :picks]
    logits = gated_logits(
        lm, inputs, gates, window.shape[1], pick, checkpointed=checkpointed
    ).float()
    labels = window.gather(1, pick).repeat(sets, 1)
    valid = labels != IGNORE
    token_logp = -F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="none"
    ).view_as(labels)
    logprob = token_logp.sum(dim=1) / valid.sum(dim=1)
    right = logits.detach().argmax(dim=-1) == labels
    correct = (right | ~valid).all(dim=1)
    token_accuracy = (right & valid).sum(dim=1) / valid.sum(dim=1)
    return TargetScores(
        logprob=logprob.view(sets, rows),
        correct=correct.view(sets, rows),
        token_accuracy=token_accuracy.view(sets, rows),
    )


def evaluate_gates(
    lm: LoadedModel,
    batch: TargetBatch,
    gates: torch.Tensor,
    batch_size: int,
    progress: ProgressCallback,
    stage: str,
) -> TargetScores:
    """Log-probs and accuracy of every example under each fixed gate set, in chunks.

    ``gates`` [sets, layers, heads]; returns [sets, examples] tensors on the host.
    """
    chunks = range(0, len(batch), batch_size)
    parts = []
    with torch.inference_mode():
        for step, start in enumerate(chunks, start=1):
            part = batch.rows(range(start, min(start + batch_size, len(batch))))
            parts.append(score_targets(lm, part, gates))
            progress(Progress(stage=stage, step=step, total=len(chunks)))
    return TargetScores(
        logprob=torch.cat([p.logprob for p in parts], dim=1).cpu(),
        correct=torch.cat([p.correct for p in parts], dim=1).cpu(),
        token_accuracy=torch.cat([p.token_accuracy for p in parts], dim=1).cpu(),
    )


class GateUpdates:
    """Adam on gate logits [sets, layers, heads], one update at a time.

    The task loss is differentiated with respect to the gates themselves (so a fit can
    watch each head's loss gradient, see :meth:`step`), the chain rule through the sigmoid
    applied by hand, and the regulariser with respect to the logits; then each set's
    gradient norm is clipped on its own and the learning rate follows :func:`linear_lr`.

    A model that computes in fp16 (GPUs without bf16) gets a dynamic loss scale, as
    autocast training does: small gate gradients would underflow in fp16's backward
    pass. An update whose scaled gradients overflow is skipped and the scale halved.
    """

    def __init__(
        self,
        logits: torch.Tensor,
        lr: float,
        lr_end: float | None,
        total: int,
        *,
        compute_dtype: torch.dtype,
    ) -> None:
        self.logits = logits.requires_grad_(True)
        self._lr, self._lr_end, self._total = lr, lr_end, total
        self._optimizer = torch.optim.Adam([self.logits], lr=lr)
        self._scaler = torch.amp.GradScaler(
            logits.device.type, enabled=compute_dtype == torch.float16
        )
        self._gates: torch.Tensor | None = None

    def gates(self) -> torch.Tensor:
        """This update's gates, a leaf that collects the task loss's gradient."""
        self._gates = self.logits.detach().sigmoid().requires_grad_(True)
        return self._gates

    def backward(self, task_loss: torch.Tensor) -> None:
        """Accumulate the gradient of ``task_loss`` (a scalar of :meth:`gates`)."""
        self._scaler.scale(task_loss).backward()

    def step(self, update: int, regulariser: torch.Tensor) -> torch.Tensor:
        """Apply 0-based ``update`` with ``regulariser`` (a scalar of the logits) added to
        the task loss; returns d(task loss)/d(gate) [sets, layers, heads] (zeros where a
        scaled gradient overflowed and the update was skipped)."""
        gates = self._gates
        if gates is None or gates.grad is None:
            raise RuntimeError("step() needs gates() and backward() first")
        for group in self._optimizer.param_groups:
            group["lr"] = linear_lr(self._lr, self._lr_end, update, self._total)
        self._scaler.scale(regulariser).backward()
        if self.logits.grad is None:  # a regulariser of weight 0 everywhere
            self.logits.grad = torch.zeros_like(self.logits)
        g = gates.detach()
        self.logits.grad.add_(gates.grad * g * (1 - g))
        self._scaler.unscale_(self._optimizer)
        clip_per_set(self.logits.grad)
        self._scaler.step(self._optimizer)
        task_grad = torch.nan_to_num(
            gates.grad / self._scaler.get_scale(), nan=0.0, posinf=0.0, neginf=0.0
        )
        self._scaler.update()
        self._optimizer.zero_grad(set_to_none=True)
        self._gates = None
        return task_grad


def make_generator(seed: int | None) -> torch.Generator:
    """A host generator for gate inits and batch order: seeded, or from fresh entropy."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def uniform_gate_logits(sets: int, lm: LoadedModel, generator: torch.Generator) -> torch.Tensor:
    """[sets, layers, heads] logits of gates drawn uniformly in (0, 1)."""
    shape = (sets, lm.adapter.num_layers, lm.adapter.num_heads)
    return torch.logit(torch.rand(shape, generator=generator), eps=1e-6)


@dataclass(frozen=True)
class BatchPlan:
    """Row indices of every mini-batch of a fit, drawn up front: a list per micro-batch on
    the host (for lengths) and one [micro-batches, size] tensor on the device."""

    host: list[list[int]]
    device: torch.Tensor

    def batch(self, data: TargetBatch, step: int) -> TargetBatch:
        return data.rows(self.host[step], self.device[step])


def plan_batches(
    n: int, batch_size: int, count: int, generator: torch.Generator, device: torch.device
) -> BatchPlan:
    """``count`` mini-batches of ``min(batch_size, n)`` rows, walking shuffled epochs."""
    size = min(batch_size, n)
    order: list[int] = []
    while len(order) < count * size:
        order.extend(torch.randperm(n, generator=generator).tolist())
    host = [order[i * size : (i + 1) * size] for i in range(count)]
    return BatchPlan(host=host, device=torch.tensor(host, dtype=torch.long, device=device))


def linear_lr(lr: float, lr_end: float | None, update: int, total: int) -> float:
    """The rate of 0-based ``update``: constant, or moving linearly from lr toward lr_end."""
    if lr_end is None:
        return lr
    return lr + (lr_end - lr) * update / total


def clip_per_set(grad: torch.Tensor, max_norm: float = MAX_GRAD_NORM) -> None:
    """Clip each gate set's gradient norm on its own, so sets stay independent fits."""
    norms = grad.flatten(1).norm(dim=1)
    grad.mul_((max_norm / (norms + 1e-6)).clamp(max=1.0).view(-1, *([1] * (grad.dim() - 1))))


def clamped_logit_mean(logits: torch.Tensor) -> torch.Tensor:
    """[sets] mean gate logit, clamped to ±``GATE_LOGIT_CLAMP``."""
    return logits.clamp(-GATE_LOGIT_CLAMP, GATE_LOGIT_CLAMP).mean(dim=(1, 2))


class LaggedProgress:
    """Reports each update's loss; on CUDA one update late, once the next one is queued,
    so that reading the loss back never leaves the device idle. A ``Cancelled`` raised by
    the callback therefore stops a fit within one update."""

    def __init__(self, progress: ProgressCallback, stage: str, total: int, device: torch.device):
        self._progress = progress
        self._stage = stage
        self._total = total
        self._lag = device.type == "cuda"
        self._pending: tuple[int, torch.Tensor] | None = None

    def update(self, step: int, loss: torch.Tensor) -> None:
        previous, self._pending = self._pending, (step, loss.detach())
        if previous is not None:
            self._report(*previous)
        if not self._lag:
            self.finish()

    def finish(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._report(*pending)

    def _report(self, step: int, loss: torch.Tensor) -> None:
        self._progress(Progress(stage=self._stage, step=step, total=self._total, loss=float(loss)))


def check_counts(**values: tuple[int, int]) -> None:
    """Each named count must be ≥ its minimum: ``name=(value, minimum)`` pairs."""
    for name, (value, minimum) in values.items():
        if value < minimum:
            raise InvalidParameter(name, f"must be at least {minimum}, got {value}")
