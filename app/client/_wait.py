"""Waiting for a job, without I/O: what the sync and async drivers feed and ask.

A driver opens the job's event stream and feeds each event to :class:`Waiter`;
when the stream breaks it fetches the job document instead, and after a few
broken streams it falls back to polling with backoff. The waiter tracks the
latest document, the deadline and the stream's health, and drives the progress
display.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from app import kinds
from app.client._http import ServerEvent
from app.client.errors import JobCancelled, JobFailed, WaitTimeout

FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
STREAM_READ_TIMEOUT_S = 30.0
"""Longer than the server's keep-alive period, so a silent stream means a broken one."""
MAX_STREAM_FAILURES = 3
POLL_FIRST_S = 0.25
POLL_MAX_S = 2.0
RESULT_WAIT_S = 300.0
"""The longest a waiting result request asks the server to hold it (the server takes up to
an hour), so that a proxy that cuts idle requests seldom sees one."""
PROGRESS_KINDS = frozenset(kind.value for kind in kinds.PROGRESS_KINDS)
"""The kinds whose jobs report progress."""


@dataclass(frozen=True)
class Progress:
    """One progress report of a long job (what ``on_progress`` callbacks receive)."""

    stage: str
    step: int
    total: int
    loss: float | None = None


ProgressCallback = Callable[[Progress], None]


def job_failure(doc: dict[str, Any]) -> JobFailed | None:
    """The exception a final, unsuccessful job document calls for (None if it succeeded)."""
    status = doc["status"]
    if status not in ("failed", "cancelled"):
        return None
    error = doc.get("error") or {}
    cls = JobCancelled if status == "cancelled" else JobFailed
    message = error.get("message") or ("cancelled" if status == "cancelled" else "no message")
    return cls(doc["id"], status, error.get("type"), message)


def follows_events(kind: str, show: bool, callback: ProgressCallback | None) -> bool:
    """Whether a wait for a result follows the job's event stream (it has progress to show
    or report); otherwise the result request itself waits for the job, which is one
    request instead of three."""
    return callback is not None or (show and kind in PROGRESS_KINDS)


class ResultWait:
    """A wait done by result requests that the server holds until the job ends: how long
    the next one may be held, and what a 409 (not succeeded) means."""

    def __init__(self, doc: dict[str, Any], timeout: float | None) -> None:
        self.doc = doc
        self._timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout

    def next_wait_s(self) -> float:
        """Seconds the next request may be held; raises ``WaitTimeout`` once none are left."""
        if self._deadline is None:
            return RESULT_WAIT_S
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimeout(
                f"job {self.doc['id']} still {self.doc['status']} after {self._timeout:g} s"
            )
        return min(remaining, RESULT_WAIT_S)

    def not_succeeded(self, doc: dict[str, Any]) -> None:
        """The job's document after a 409: raises its failure if it has ended."""
        self.doc = doc
        failure = job_failure(doc)
        if failure is not None:
            raise failure


class ProgressReporter:
    """A tqdm bar per stage of a long job, plus the caller's callback; silent until progress."""

    def __init__(self, job_id: str, *, show: bool, callback: ProgressCallback | None) -> None:
        self._job_id = job_id
        self._show = show
        self._callback = callback
        self._last: Progress | None = None
        self._bar: Any = None

    def document(self, doc: dict[str, Any]) -> None:
        if doc.get("progress"):
            self.progress(doc["progress"])

    def progress(self, data: dict[str, Any]) -> None:
        report = Progress(data["stage"], int(data["step"]), int(data["total"]), data.get("loss"))
        if report == self._last:
            return
        previous, self._last = self._last, report
        if self._callback is not None:
            self._callback(report)
        if self._show:
            self._draw(report, new_stage=previous is None or previous.stage != report.stage)

    def _draw(self, report: Progress, *, new_stage: bool) -> None:
        from tqdm.auto import tqdm

        if new_stage or self._bar is None:
            self.close()
            self._bar = tqdm(
                total=report.total,
                desc=f"{self._job_id[:8]} {report.stage}",
                unit="step",
                leave=True,
            )
        if report.loss is not None:
            self._bar.set_postfix(loss=f"{report.loss:.4g}", refresh=False)
        # update() redraws at most every mininterval (a fit reports hundreds of steps a second)
        self._bar.update(report.step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Waiter:
    """State of one wait: latest document, deadline, stream health, poll backoff."""

    def __init__(
        self, doc: dict[str, Any], reporter: ProgressReporter, timeout: float | None
    ) -> None:
        self.doc = doc
        self._reporter = reporter
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._timeout = timeout
        self._stream_failures = 0
        self._poll_s = POLL_FIRST_S

    def __enter__(self) -> Waiter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._reporter.close()

    @property
    def done(self) -> bool:
        return self.doc["status"] in FINAL_STATUSES

    @property
    def streaming(self) -> bool:
        """Whether to (re)open the event stream rather than poll."""
        return self._stream_failures < MAX_STREAM_FAILURES

    def on_document(self, doc: dict[str, Any]) -> bool:
        self.doc = doc
        self._reporter.document(doc)
        return self.done

    def on_event(self, event: ServerEvent) -> bool:
        """Feed one server-sent event; True once the job has ended."""
        if event.event == "status":
            return self.on_document(event.json())
        if event.event == "progress":
            self._reporter.progress(event.json())
            self._stream_failures = 0
        return self.done

    def stream_failed(self) -> None:
        self._stream_failures += 1

    def read_timeout(self) -> float:
        remaining = self.remaining()
        return STREAM_READ_TIMEOUT_S if remaining is None else min(remaining, STREAM_READ_TIMEOUT_S)

    def poll_delay(self) -> float:
        delay, self._poll_s = self._poll_s, min(self._poll_s * 2, POLL_MAX_S)
        remaining = self.remaining()
        return delay if remaining is None else min(delay, remaining)

    def remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def check_deadline(self) -> None:
        if self._deadline is not None and time.monotonic() >= self._deadline:
            raise WaitTimeout(
                f"job {self.doc['id']} still {self.doc['status']} after {self._timeout:g} s"
            )
