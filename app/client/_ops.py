"""What the sync and async clients do, written once: each operation is a generator that
yields the I/O it needs and is sent the outcome.

An operation yields an :data:`Effect` (one HTTP exchange, a sleep, or following a
job's event stream) and is sent what it produced, or has its exception thrown in at
the ``yield``; what it returns is the operation's result. The blocking client performs
the effects with ``httpx.Client`` and ``time.sleep``, the asyncio client awaits them
with ``httpx.AsyncClient`` and ``asyncio.sleep``: the transports are all that differ.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx

from app.client import _http, _kinds, _wait
from app.client._http import Call, ClientConfig, DatasetSource
from app.client._kinds import JobSpec, JobView
from app.client._wait import ProgressCallback, ProgressReporter, Waiter, job_failure
from app.client.errors import Conflict
from app.client.results import ChgResult, Result, expect_kind, load_result

T = TypeVar("T")
R = TypeVar("R", bound=Result)


@dataclass(frozen=True)
class Exchange:
    """Send one request; the outcome is the response, or for a raw call its body (a
    buffer, or the file ``into``); a transport error is thrown in."""

    call: Call
    into: Path | None = None


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Follow:
    """Feed the job's event stream to ``waiter`` until the job ends or the stream breaks
    (which the transport tells the waiter)."""

    job_id: str
    waiter: Waiter


Effect = Exchange | Sleep | Follow
Op = Generator[Effect, Any, T]


class _ModelHandle(Protocol):
    """What an operation reads of a model handle (sync or async)."""

    client: Any
    name: str


def request(config: ClientConfig, call: Call, into: Path | None = None) -> Op[Any]:
    """Send ``call``, retrying as the policy says; a raw call's body is read into one
    buffer, or written to the file ``into``, as it arrives."""
    attempt = 0
    while True:
        sent: httpx.Response | httpx.TransportError | bytearray | Path
        try:
            sent = yield Exchange(call, into)
        except httpx.TransportError as exc:
            sent = exc
        if isinstance(sent, bytearray | Path):
            return sent
        delay = config.retry.delay(call, attempt, sent)
        if delay is None:
            return _http.finish(call, sent, config.url)
        yield Sleep(delay)
        attempt += 1


def refresh(job: JobView) -> Op[dict[str, Any]]:
    """Fetch the job document again."""
    job.document = yield from request(job.client.config, _http.job_call(job.id))
    return job.document


def status(job: JobView) -> Op[str]:
    """The job's current status: queued, running, succeeded, failed or cancelled."""
    return (yield from refresh(job))["status"]


def wait(
    job: JobView,
    timeout: float | None = None,
    *,
    progress: bool | None = None,
    on_progress: ProgressCallback | None = None,
) -> Op[str]:
    """Wait until the job ends and return its final status (raises ``WaitTimeout``).

    Follows the job's event stream; falls back to polling if the stream keeps breaking.
    """
    show = job.client.config.progress if progress is None else progress
    reporter = ProgressReporter(job.id, show=show, callback=on_progress)
    with Waiter(job.document, reporter, timeout) as waiter:
        waiter.on_document((yield from refresh(job)))
        while not waiter.done:
            waiter.check_deadline()
            if waiter.streaming:
                yield Follow(job.id, waiter)
            else:
                yield Sleep(waiter.poll_delay())
            if not waiter.done:
                waiter.on_document((yield from refresh(job)))
        job.document = waiter.doc
    return job.document["status"]


def result(
    job: JobView,
    timeout: float | None = None,
    *,
    progress: bool | None = None,
    on_progress: ProgressCallback | None = None,
) -> Op[Result]:
    """Wait for the job, then download and load its result (raises ``JobFailed``)."""
    data = yield from _fetch_result(job, None, timeout, progress, on_progress)
    return load_result(data, tensors=job.client.config.tensors)


def download(job: JobView, path: str | os.PathLike[str], timeout: float | None = None) -> Op[Path]:
    """Wait for the job, then save its result file at ``path`` (atomically, streamed
    to disk: the result is never held in memory whole)."""
    saved: Path = yield from _fetch_result(job, Path(path), timeout, False, None)
    return saved


def _fetch_result(
    job: JobView,
    into: Path | None,
    timeout: float | None,
    progress: bool | None,
    on_progress: ProgressCallback | None,
) -> Op[Any]:
    config = job.client.config
    show = config.progress if progress is None else progress
    if job.document["status"] not in _wait.FINAL_STATUSES:
        if not _wait.follows_events(job.kind, show, on_progress):
            return (yield from _held_result(job, into, timeout))
        yield from wait(job, timeout, progress=progress, on_progress=on_progress)
    failure = job_failure(job.document)
    if failure is not None:
        raise failure
    return (yield from request(config, _http.result_call(job.id), into))


def _held_result(job: JobView, into: Path | None, timeout: float | None) -> Op[Any]:
    """The result from requests that the server holds until the job ends."""
    waiting = _wait.ResultWait(job.document, timeout)
    while True:
        held = _http.result_call(job.id, waiting.next_wait_s())
        try:
            return (yield from request(job.client.config, held, into))
        except Conflict:
            waiting.not_succeeded((yield from refresh(job)))


def cancel(job: JobView) -> Op[str]:
    """Cancel the job: a queued one never runs, a running one stops at its next step.

    Returns the status after the request; a job that already ended keeps its status.
    """
    try:
        job.document = yield from request(job.client.config, _http.cancel_call(job.id))
    except Conflict:
        return (yield from status(job))
    return job.document["status"]


def info(model: _ModelHandle) -> Op[dict[str, Any]]:
    """Shape, workers and queue of this model (``NotFound`` if it is not served)."""
    info: dict[str, Any] = yield from request(model.client.config, _http.model_call(model.name))
    return info


def analyse(model: _ModelHandle, spec: JobSpec, returns: type[R]) -> Op[R]:
    """Submit the job ``spec`` describes, wait as it says, and load its result."""
    call = _http.submit_call(spec.kind, model.name, spec.params)
    job = JobView(model.client, (yield from request(model.client.config, call)))
    done = yield from result(
        job, spec.wait.timeout, progress=spec.wait.progress, on_progress=spec.wait.on_progress
    )
    return expect_kind(done, returns)


def fit_dataset(
    model: _ModelHandle, dataset: DatasetSource, *args: Any, **kwargs: Any
) -> Op[ChgResult]:
    known = _kinds.dataset_id(dataset)
    if known is None:
        uploaded = yield from request(model.client.config, _http.dataset_call(dataset))
        known = uploaded["id"]
    return (yield from analyse(model, _kinds.chg_dataset(known, *args, **kwargs), ChgResult))


fit_dataset.__doc__ = _kinds.chg_dataset.__doc__
