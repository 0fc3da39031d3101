"""A short soak: many users at once on the real stack, with two workers.

Redis, the API and two ``lens worker`` processes, as ``lens serve --workers 2`` starts
them with its defaults; several keys, each with clients submitting a mix of one-text
score and trace jobs and small chg fits, each fetching its result with one held
``GET …/result?wait=``. Nothing may fail, nothing may be lost, every result must be its
own job's (``bench.soak``, whose ``python -m bench --soak`` runs the long version).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from app.stack import Stack
from bench.soak import (
    ResultCheck,
    keys_of,
    parse_mix,
    plan,
    shape_of,
    soak_service,
    soak_settings,
)
from workers.threads import host_cores

KEYS = 3
CLIENTS = 9
JOBS = 90


@pytest.mark.slow
def test_a_mixed_burst_of_several_keys_on_two_workers_loses_nothing(
    tmp_path: Path, demo_model_dir: Path
) -> None:
    keys = keys_of(KEYS)
    jobs = plan(JOBS, KEYS, parse_mix("score=60,trace=30,chg=10"), seed=3)
    stack = Stack(soak_settings(tmp_path / "data", demo_model_dir, keys))
    try:
        stack.start(workers=2)
        stack.wait_ready(timeout=180)
        check = ResultCheck(
            AutoTokenizer.from_pretrained(demo_model_dir), shape_of(stack.url, keys[0])
        )
        run = soak_service(stack, keys, jobs, CLIENTS, check)
    finally:
        stack.stop()
    assert run.failures == []
    assert run.lost == []
    assert sorted(o.planned.body["kind"] for o in run.outcomes) == sorted(j.kind for j in jobs)
    assert sum(len(waits) for waits in run.queue_waits.values()) == JOBS
    share = max(1, host_cores() // 2)
    assert run.worker_threads == {"worker-0": share, "worker-1": share}, "each its share"
