"""Short jobs served by a running fit between two of its steps.

A chg fit of a 1B model runs for many minutes; a score or trace job of the same model
queued behind it would wait for all of it. Instead the fit's worker, at each step's
progress report, takes the model's queued score and trace jobs (without gradients) and
runs them in shared passes on the same resident weights, then goes on with the fit.

Why it leaves the fit's result as it was: the gates act only inside the fit's own
forward passes (hooks installed and removed around each, or a written-out pass), so
between two steps the model is the plain model and the short jobs run ungated, under
``torch.inference_mode``, with no gradient; the fit draws its inits and batches from its
own seeded generator, which they never touch; and a pause happens after a step's
update, not inside one.

Each pause is bounded: it takes passes of at most ``max_batch_tokens`` while jobs are
queued and until ``ModelSpec.fit_pause_ms`` have passed (so it lasts that, plus one pass
at most). The fit's summary reports the pauses (``pauses``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.kinds import PROGRESS_KINDS

log = logging.getLogger(__name__)

FIT_KINDS = PROGRESS_KINDS
"""The kinds that pause: they report progress after every step."""


@dataclass
class PauseLog:
    """The pauses of one fit."""

    count: int = 0
    jobs: int = 0
    seconds: float = 0.0
    longest_s: float = 0.0

    def record(self, jobs: int, seconds: float) -> None:
        self.count += 1
        self.jobs += jobs
        self.seconds += seconds
        self.longest_s = max(self.longest_s, seconds)

    def summary(self) -> dict[str, int | float]:
        """For the fit's summary: how often it paused, the jobs it served, and for how long."""
        return {
            "count": self.count,
            "jobs": self.jobs,
            "seconds": round(self.seconds, 4),
            "longest_s": round(self.longest_s, 4),
        }


class FitPauses:
    """The fit's step hook: ``serve`` runs one shared pass of queued short jobs and returns
    how many it ran (0: none queued); a pause calls it until none are left or
    ``max_s`` have passed."""

    def __init__(self, serve: Callable[[], int], max_s: float) -> None:
        self._serve, self._max_s = serve, max_s
        self.log = PauseLog()

    def __call__(self) -> None:
        began = time.perf_counter()
        served = 0
        try:
            while ran := self._serve():
                served += ran
                if time.perf_counter() - began >= self._max_s:
                    break
        except Exception:  # the short jobs settle their own errors; the fit goes on
            log.exception("a pause of the fit failed; going on with the fit")
        if served:
            self.log.record(served, time.perf_counter() - began)
