"""A running fit serves the short jobs queued for its model between two of its updates.

Real Redis, a real model, the worker's own ``run_job``: the fit runs in a thread as it
would in a worker, and no other worker exists, so a short job that succeeds while the
fit runs can only have been run by the fit's pauses.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from app.keys import RUNNING
from app.schemas import ChgJob, JobDocument, JobStatus, ScoreJob, TraceJob
from tests.integration.test_batching import LONG, MEDIUM, MODEL, SHORT, assert_as_alone
from tests.waiting import wait_until
from tests.workers.conftest import submit
from tests.workers.test_claim import rq_takes
from workers import shared_pass, tasks
from workers.lens.chg import fit_chg

PROMPTS = [SHORT, MEDIUM, LONG, "a b c d", "one two three", "the cat sat on"]
TARGETS = ["b", "Paris", "count", "e", "four", "the"]
FIT: dict[str, Any] = {
    "num_masks": 2,
    "num_updates": 100,
    "num_reg_updates": 100,
    "batch_size": 4,
    "seed": 7,
}
"""Two hundred updates: the short jobs, submitted after the first, land mid-fit."""
SHORT_JOB_BOUND_S = 2.0
"""The issue's bound on this CPU: one update plus the short job's own run, with room."""


def document(rt: tasks.Runtime, job_id: str) -> JobDocument:
    record = rt.store.get(job_id)
    assert record is not None
    return record.document


def test_a_short_job_submitted_during_a_fit_is_served_between_two_updates(
    runtime: tasks.Runtime,
) -> None:
    rt = runtime
    fit = ChgJob(model=MODEL, texts=PROMPTS, targets=TARGETS, **FIT)
    fit_id = submit(rt, fit)
    rq_takes(rt, fit_id)
    runner = threading.Thread(target=tasks.run_job, args=(fit_id,))
    runner.start()
    try:
        wait_until(
            lambda: document(rt, fit_id).progress is not None,
            120,
            "the fit's first update",
            interval=0.005,
        )
        score = ScoreJob(model=MODEL, texts=MEDIUM)
        trace = TraceJob(model=MODEL, texts=LONG, layers=[1], sites=["block_output"])
        short_ids = [submit(rt, score), submit(rt, trace)]
        wait_until(
            lambda: all(document(rt, i).status.is_final for i in short_ids),
            SHORT_JOB_BOUND_S,
            "the short jobs' end, served in the fit's pauses",
            interval=0.005,
        )
    finally:
        runner.join()
    done = document(rt, fit_id)
    assert done.status is JobStatus.SUCCEEDED, done.error
    for job_id, job in zip(short_ids, [score, trace], strict=True):
        doc = document(rt, job_id)
        assert doc.status is JobStatus.SUCCEEDED, doc.error
        assert doc.finished_at is not None and done.finished_at is not None
        assert doc.finished_at < done.finished_at, "served while the fit was running"
        assert_as_alone(rt, job_id, job)  # ungated: what it computes alone
    pauses = done.summary["pauses"]
    assert pauses["jobs"] == 2 and 1 <= pauses["count"] <= 2
    assert 0 < pauses["longest_s"] <= pauses["seconds"]
    got = load_file(rt.blobs.path(fit_id))
    alone = fit_chg(rt.registry.get(MODEL), PROMPTS, TARGETS, **FIT)
    for name, want in alone.tensors.items():
        assert torch.equal(got[name], want), f"{name} differs from the same fit alone"


def test_with_no_pause_allowed_short_jobs_wait_for_the_fit(
    runtime: tasks.Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = runtime
    spec = rt.registry.specs[MODEL].model_copy(update={"fit_pause_ms": 0.0})
    monkeypatch.setitem(rt.registry.specs, MODEL, spec)
    fit = ChgJob(
        model=MODEL, texts=PROMPTS, targets=TARGETS, num_masks=1, num_updates=3, num_reg_updates=1
    )
    fit_id = submit(rt, fit)
    score_id = submit(rt, ScoreJob(model=MODEL, texts=SHORT))
    rq_takes(rt, fit_id)
    tasks.run_job(fit_id)
    assert document(rt, fit_id).status is JobStatus.SUCCEEDED
    assert "pauses" not in (document(rt, fit_id).summary or {})
    assert document(rt, score_id).status is JobStatus.QUEUED


def test_a_short_job_that_fails_in_a_pause_fails_alone(
    runtime: tasks.Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = runtime
    fit = ChgJob(
        model=MODEL, texts=PROMPTS, targets=TARGETS, num_masks=1, num_updates=3, num_reg_updates=1
    )
    fit_id = submit(rt, fit)
    score_id = submit(rt, ScoreJob(model=MODEL, texts=SHORT))
    rq_takes(rt, fit_id)

    def out_of_memory(*_: Any) -> None:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(shared_pass, "forward", out_of_memory)
    tasks.run_job(fit_id)
    assert document(rt, fit_id).status is JobStatus.SUCCEEDED
    failed = document(rt, score_id)
    assert failed.status is JobStatus.FAILED and failed.error is not None
    assert failed.error.type == "OutOfMemory"
    assert rt.store.redis.hlen(RUNNING) == 0
