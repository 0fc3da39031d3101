"""RQ jobs that can only ever run lens's own job function.

RQ finds a job's function by the dotted name stored with the job, and imports it. Anyone
who can write to a queue could otherwise have a worker call ``os.system``, or name a
callback that RQ calls after the job (or while cleaning up after a lost one). Here the
name is compared with :data:`app.queue.RUN_JOB` before RQ resolves anything: another
name, a bound instance or any callback makes the job foreign, and it is refused without
being imported or run.
"""

from __future__ import annotations

from typing import Any

from rq.exceptions import DeserializationError
from rq.job import Job

from app.queue import RUN_JOB


class ForeignJob(ValueError):
    """A queued RQ job that is not a call of lens's job function."""


class LensJob(Job):
    """RQ's job, resolving only :data:`RUN_JOB`; callbacks are never imported."""

    def check(self) -> None:
        """Raise :class:`ForeignJob` unless this is a plain call of lens's job function."""
        try:
            name, instance, args, kwargs = self.func_name, self.instance, self.args, self.kwargs
        except DeserializationError:
            raise ForeignJob("its data is not a JSON function call") from None
        callbacks = [
            n
            for n in (
                self._success_callback_name,
                self._failure_callback_name,
                self._stopped_callback_name,
            )
            if n
        ]
        if name != RUN_JOB or instance is not None:
            raise ForeignJob(f"function {name!r} is not {RUN_JOB}")
        if callbacks:
            raise ForeignJob(f"it names callbacks {callbacks}; lens's jobs have none")
        if kwargs or len(args) != 1 or not isinstance(args[0], str):
            raise ForeignJob("its arguments are not one job id")

    @property
    def func(self) -> Any:
        self.check()
        from workers import tasks

        return tasks.run_job

    @property
    def success_callback(self) -> None:
        return None

    @property
    def failure_callback(self) -> None:
        return None

    @property
    def stopped_callback(self) -> None:
        return None
