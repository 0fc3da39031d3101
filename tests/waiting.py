"""The one way a test waits for something to happen: poll a predicate up to a deadline.

A fixed sleep is too short on a busy machine and too long on an idle one; a wall-clock
bound fails when the box is loaded. A test that must wait for a state another process
reaches polls for that state with ``wait_until``, whose deadline is generous and whose
failure names what never happened.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx

T = TypeVar("T")

INTERVAL_S = 0.05
"""How often a predicate is asked: short next to any wait worth writing."""


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str | Callable[[], str],
    interval: float = INTERVAL_S,
) -> T:
    """Ask ``predicate`` until it returns something truthy, and return that. Past
    ``timeout`` seconds the test fails saying ``what`` did not happen (a callable ``what``
    is asked then, so it can show the last state seen)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"not within {timeout:g} s: {said}")
        time.sleep(interval)


async def await_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str | Callable[[], str],
    interval: float = INTERVAL_S,
) -> T:
    """``wait_until`` inside an event loop: it sleeps without blocking the loop, so the
    tasks it waits for run meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"not within {timeout:g} s: {said}")
        await asyncio.sleep(interval)


FINAL = ("succeeded", "failed", "cancelled")


def ended(doc: dict[str, Any]) -> bool:
    return doc["status"] in FINAL


def poll_job(
    http: httpx.Client,
    job_id: str,
    until: Callable[[dict[str, Any]], bool] = ended,
    timeout: float = 60,
) -> dict[str, Any]:
    """The job's document (``GET /v1/jobs/{id}``) once ``until`` holds for it; by default
    once the job has ended."""
    seen: dict[str, Any] = {}

    def check() -> dict[str, Any] | None:
        seen["doc"] = doc = http.get(f"/v1/jobs/{job_id}").json()
        return doc if until(doc) else None

    return wait_until(check, timeout, lambda: f"job {job_id}; last document: {seen['doc']}")
