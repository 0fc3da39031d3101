"""One parameter builder per job kind, with the seed ``LensAPI``'s argument names.

The sync and async model handles turn each builder into a method (see
:func:`method_like`), so every signature is written once. ``None`` means "the
server's default", so defaults live only in the server's schema.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from app.client._wait import ProgressCallback

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class WaitOptions:
    """How a blocking call waits: progress bar (None: the client's default), callback, timeout."""

    progress: bool | None = None
    on_progress: ProgressCallback | None = None
    timeout: float | None = None


@dataclass(frozen=True)
class JobSpec:
    kind: str
    params: dict[str, Any]
    wait: WaitOptions


def jsonable(value: Any) -> Any:
    """Tensors and arrays become nested lists; jobs and results become their job id."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    for attr in ("job_id", "id"):
        if isinstance(getattr(value, attr, None), str):
            return getattr(value, attr)
    return value


def params(**values: Any) -> dict[str, Any]:
    """The given (non-None) parameters, JSON-ready."""
    return {k: jsonable(v) for k, v in values.items() if v is not None}


def _listed(texts: str | list[str] | None) -> list[str] | None:
    return [texts] if isinstance(texts, str) else texts


def _shown(progress: bool | None, verbose: bool | None) -> bool | None:
    """``progress``, or the seed's ``verbose`` (the same switch) when only it is given."""
    return verbose if progress is None else progress


def chg(
    texts: str | list[str] | None = None,
    targets: str | list[str] | None = None,
    max_length: int | None = None,
    num_masks: int | None = None,
    num_updates: int | None = None,
    num_reg_updates: int | None = None,
    batch_size: int | None = None,
    l1_weight: float | None = None,
    lr: float | None = None,
    gradient_accum_steps: int | None = None,
    *,
    dataset: str | None = None,
    pattern: str | None = None,
    num_samples: int | None = None,
    lr_end: float | None = None,
    seed: int | None = None,
    threshold: float | None = None,
    consensus: float | None = None,
    target_join: str | None = None,
    record_history: bool | None = None,
    checkpoint_above: int | None = None,
    verbose: bool | None = None,
    progress: bool | None = None,
    on_progress: ProgressCallback | None = None,
    timeout: float | None = None,
) -> JobSpec:
    """Fit Causal Head Gating masks (stages none, positive, negative); blocks until done.

    Give ``texts`` and ``targets``, a ``dataset`` id, or a ``pattern`` ("mixed", the
    paper's set, "aba" or "abb") with ``num_samples``. Targets are joined to their prompt
    as ``target_join`` says (default "space", the seed's convention). The positional
    parameters are the seed ``LensAPI.fit``'s, in its order; ``verbose`` is its name for
    ``progress``. Returns a ``ChgResult``.
    """
    return JobSpec(
        "chg",
        params(
            texts=_listed(texts),
            targets=_listed(targets),
            dataset=dataset,
            pattern=pattern,
            num_samples=num_samples,
            max_length=max_length,
            num_masks=num_masks,
            num_updates=num_updates,
            num_reg_updates=num_reg_updates,
            batch_size=batch_size,
            l1_weight=l1_weight,
            lr=lr,
            lr_end=lr_end,
            gradient_accum_steps=gradient_accum_steps,
            seed=seed,
            threshold=threshold,
            consensus=consensus,
            target_join=target_join,
            record_history=record_history,
            checkpoint_above=checkpoint_above,
        ),
        WaitOptions(_shown(progress, verbose), on_progress, timeout),
    )


def chg_pattern(
    pattern: str = "mixed",
    num_samples: int | None = None,
    num_masks: int | None = None,
    num_updates: int | None = None,
    num_reg_updates: int | None = None,
    batch_size: int | None = None,
    l1_weight: float | None = None,
    lr: float | None = None,
    gradient_accum_steps: int | None = None,
    *,
    lr_end: float | None = None,
    seed: int | None = None,
    threshold: float | None = None,
    consensus: float | None = None,
    record_history: bool | None = None,
    verbose: bool | None = None,
    progress: bool | None = None,
    on_progress: ProgressCallback | None = None,
    timeout: float | None = None,
) -> JobSpec:
    """Fit CHG on the aba/abb rule task, rows built as the CHG authors' (see the README);
    blocks. ``pattern`` is "mixed" (the paper's set: both rules, the model must infer
    which), "aba" or "abb"; the seed defaults to "aba". Returns a ``ChgResult``."""
    return chg(
        pattern=pattern,
        num_samples=num_samples,
        num_masks=num_masks,
        num_updates=num_updates,
        num_reg_updates=num_reg_updates,
        batch_size=batch_size,
        l1_weight=l1_weight,
        lr=lr,
        gradient_accum_steps=gradient_accum_steps,
        lr_end=lr_end,
        seed=seed,
        threshold=threshold,
        consensus=consensus,
        record_history=record_history,
        verbose=verbose,
        progress=progress,
        on_progress=on_progress,
        timeout=timeout,
    )


def chg_dataset(
    dataset: str,
    num_masks: int | None = None,
    num_updates: int | None = None,
    num_reg_updates: int | None = None,
    batch_size: int | None = None,
    l1_weight: float | None = None,
    lr: float | None = None,
    gradient_accum_steps: int | None = None,
    *,
    max_length: int | None = None,
    lr_end: float | None = None,
    seed: int | None = None,
    threshold: float | None = None,
    consensus: float | None = None,
    target_join: str | None = None,
    record_history: bool | None = None,
    checkpoint_above: int | None = None,
    verbose: bool | None = None,
    progress: bool | None = None,
    on_progress: ProgressCallback | None = None,
    timeout: float | None = None,
) -> JobSpec:
    """Fit CHG on an uploaded data set's prompt/target rows; blocks. ``dataset`` is the id
    ``upload_dataset`` returned, or rows, a .jsonl/.tsv path or its bytes, uploaded first.
    (The seed takes a tokenised ``MaskedSequenceDataset``; a server tokenises for the
    model it serves.) Returns a ``ChgResult``."""
    return chg(
        dataset=dataset,
        max_length=max_length,
        num_masks=num_masks,
        num_updates=num_updates,
        num_reg_updates=num_reg_updates,
        batch_size=batch_size,
        l1_weight=l1_weight,
        lr=lr,
        gradient_accum_steps=gradient_accum_steps,
        lr_end=lr_end,
        seed=seed,
        threshold=threshold,
        consensus=consensus,
        target_join=target_join,
        record_history=record_history,
        checkpoint_above=checkpoint_above,
        verbose=verbose,
        progress=progress,
        on_progress=on_progress,
        timeout=timeout,
    )


def dataset_id(source: Any) -> str | None:
    """The id when ``source`` already names an uploaded data set (a string that is no file)."""
    if isinstance(source, str) and not os.path.exists(source):
        return source
    return None


def cchg(
    retain_texts: list[str] | None = None,
    retain_targets: list[str] | None = None,
    forget_texts: list[str] | None = None,
    forget_targets: list[str] | None = None,
    *,
    retain_dataset: str | None = None,
    forget_dataset: str | None = None,
    eval_retain_texts: list[str] | None = None,
    eval_retain_targets: list[str] | None = None,
    eval_forget_texts: list[str] | None = None,
    eval_forget_targets: list[str] | None = None,
    max_length: int | None = None,
    target_join: str | None = None,
    num_masks: int | None = None,
    num_updates: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    lr_end: float | None = None,
    l1_weight: float | None = None,
    diff_clip: float | None = None,
    seed: int | None = None,
    checkpoint_above: int | None = None,
    progress: bool | None = None,
    on_progress: ProgressCallback | None = None,
    timeout: float | None = None,
) -> JobSpec:
    """Fit contrastive gates that keep the retain task and break the forget task; blocks.

    Returns a ``CchgResult``.
    """
    return JobSpec(
        "cchg",
        params(
            retain_texts=retain_texts,
            retain_targets=retain_targets,
            forget_texts=forget_texts,
            forget_targets=forget_targets,
            retain_dataset=retain_dataset,
            forget_dataset=forget_dataset,
            eval_retain_texts=eval_retain_texts,
            eval_retain_targets=eval_retain_targets,
            eval_forget_texts=eval_forget_texts,
            eval_forget_targets=eval_forget_targets,
            max_length=max_length,
            target_join=target_join,
            num_masks=num_masks,
            num_updates=num_updates,
            batch_size=batch_size,
            lr=lr,
            lr_end=lr_end,
            l1_weight=l1_weight,
            diff_clip=diff_clip,
            seed=seed,
            checkpoint_above=checkpoint_above,
        ),
        WaitOptions(progress, on_progress, timeout),
    )


def trace(
    texts: str | list[str],
    *,
    layers: list[int] | None = None,
    sites: list[str] | None = None,
    positions: str | list[int] | None = None,
    dtype: str | None = None,
    gradients: dict[str, Any] | None = None,
    progress: bool | None = None,
    on_progress: ProgressCallback | None = None,
    timeout: float | None = None,
) -> JobSpec:
    """Capture activations at named sites (default: every site and layer); blocks.

    Returns a ``TraceResult``.
    """
    return JobSpec(
        "trace",
        params(
            texts=texts,
            layers=layers,
            sites=sites,
            positions=positions,
            dtype=dtype,
            gradients=gradients,
        ),
        WaitOptions(progress, on_progress, timeout),
    )


def score(
    texts: str | list[str],
    *,
    temperature: float | None = None,
    final_token_only: bool | None = None,
    top_k: int | None = None,
    progress: bool | None = None,
    on_progress: ProgressCallback | None = None,
    timeout: float | None = None,
) -> JobSpec:
    """Next-token logits of every position (divided by ``temperature``); blocks.

    Returns a ``ScoreResult``.
    """
    return JobSpec(
        "score",
        params(
            texts=texts, temperature=temperature, final_token_only=final_token_only, top_k=top_k
        ),
        WaitOptions(progress, on_progress, timeout),
    )


def ablate(
    texts: str | list[str] | None = None,
    targets: str | list[str] | None = None,
    *,
    dataset: str | None = None,
    head_mask: Any = None,
    from_job: Any = None,
    keep: str | None = None,
    threshold: float | None = None,
    consensus: float | None = None,
    max_length: int | None = None,
    target_join: str | None = None,
    progress: bool | None = None,
    on_progress: ProgressCallback | None = None,
    timeout: float | None = None,
) -> JobSpec:
    """NLL and accuracy with a head mask applied, against the unmasked model; blocks.

    ``head_mask`` is [layers, heads] (a list, array or tensor), or ``from_job`` (a
    chg job, its result or its id) with ``keep``. Returns an ``AblateResult``.
    """
    return JobSpec(
        "ablate",
        params(
            texts=_listed(texts),
            targets=_listed(targets),
            dataset=dataset,
            head_mask=head_mask,
            from_job=from_job,
            keep=keep,
            threshold=threshold,
            consensus=consensus,
            max_length=max_length,
            target_join=target_join,
        ),
        WaitOptions(progress, on_progress, timeout),
    )


def attribute(
    document: str,
    sentences: list[str],
    summary: str,
    *,
    facilitating_mask: Any = None,
    from_job: Any = None,
    keep: str | None = None,
    threshold: float | None = None,
    consensus: float | None = None,
    aggregate: str | None = None,
    target_join: str | None = None,
    normalize: str | None = None,
    loss: str | None = None,
    progress: bool | None = None,
    on_progress: ProgressCallback | None = None,
    timeout: float | None = None,
) -> JobSpec:
    """Importance of each sentence of ``document`` for ``summary``, by gradients; blocks.

    Defaults as the seed's ``CausalCircuitAttribution``: mean token loss
    (``loss="mean"``), scores divided by their largest (``normalize="max"``). Returns an
    ``AttributeResult``.
    """
    return JobSpec(
        "attribute",
        params(
            document=document,
            sentences=sentences,
            summary=summary,
            facilitating_mask=facilitating_mask,
            from_job=from_job,
            keep=keep,
            threshold=threshold,
            consensus=consensus,
            aggregate=aggregate,
            target_join=target_join,
            normalize=normalize,
            loss=loss,
        ),
        WaitOptions(progress, on_progress, timeout),
    )


def method_like(method: F, build: Callable[..., JobSpec], name: str, returns: str) -> F:
    """Give a generated method its name, the builder's docstring and signature (plus
    ``self``); ``__wrapped__`` names the builder (the kind registry's parity test reads it)."""
    signature = inspect.signature(build)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    method.__name__ = name
    method.__qualname__ = name
    method.__doc__ = build.__doc__
    method.__wrapped__ = build  # type: ignore[attr-defined]
    method.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[self_param, *signature.parameters.values()], return_annotation=returns
    )
    return method


def op_method(method: F, op: Callable[..., Any], returns: str) -> F:
    """Give a method that runs a shared operation (:mod:`app.client._ops`) the operation's
    name, docstring and signature, with ``self`` for its first parameter; ``returns``
    wraps what the operation returns (``{}`` is its value's type)."""
    signature = inspect.signature(op)
    first, *rest = signature.parameters.values()
    value = str(signature.return_annotation).removeprefix("Op[").removesuffix("]")
    method.__name__ = op.__name__
    method.__qualname__ = op.__name__
    method.__doc__ = op.__doc__
    method.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[first.replace(name="self", annotation=first.empty), *rest],
        return_annotation=returns.format(value),
    )
    return method


class JobView:
    """What the sync and async jobs share: the latest job document and its fields."""

    def __init__(self, client: Any, document: dict[str, Any]) -> None:
        self.client = client
        self.document = document

    @property
    def id(self) -> str:
        return self.document["id"]

    @property
    def kind(self) -> str:
        return self.document["kind"]

    @property
    def error(self) -> dict[str, str] | None:
        return self.document.get("error")

    def __repr__(self) -> str:
        status = self.document["status"]
        return f"{type(self).__name__}({self.id!r}, kind={self.kind!r}, status={status!r})"
