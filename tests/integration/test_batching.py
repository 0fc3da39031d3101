"""Batching across jobs through the real queue: real Redis, RQ's worker, the job store.

Jobs are queued first and a worker started afterwards (RQ's SimpleWorker in this
process, in burst mode, or a real ``lens worker`` for the HTTP test), so that they
are all waiting when the first one runs. Every job must end as if it had run alone.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker
from safetensors import safe_open
from safetensors.torch import load, load_file

from app import keys, presence, queue
from app.blobstore import BlobStore
from app.core.config import ModelSpec
from app.jobstore import JobStore
from app.schemas import JobStatus, ScoreJob, TraceJob
from app.stack import Stack
from tests.conftest import DEMO, service_settings
from tests.waiting import wait_until
from tests.workers.test_shared_pass import alone
from workers import shared_pass, tasks
from workers.lens.loading import LoadedModel, load_model
from workers.lens.scoring import score
from workers.lens.testing import build_tiny_model
from workers.registry import ModelRegistry

MODEL = "tiny"
SHORT = "a b a"
MEDIUM = "The capital of France is Paris"
LONG = "Once upon a time there was a little model that learned to count."
TOO_LONG = " ".join(["seven"] * 80)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def registry(model_dir: Path) -> ModelRegistry:
    spec = ModelSpec(source=str(model_dir), device="cpu", dtype="float32")
    return ModelRegistry({MODEL: spec})


@pytest.fixture
def rt(
    redis_conn: redis.Redis,
    registry: ModelRegistry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> tasks.Runtime:
    """This process as the worker: its runtime installed for ``run_job``."""
    runtime = tasks.Runtime(
        worker_name="test-worker",
        registry=registry,
        store=JobStore(redis_conn),
        blobs=BlobStore(tmp_path / "blobs"),
        dataset_dir=tmp_path / "datasets",
        result_ttl_s=3600,
    )
    monkeypatch.setattr(tasks, "_runtime", runtime)
    return runtime


def budget(registry: ModelRegistry, tokens: int, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = registry.specs[MODEL].model_copy(update={"max_batch_tokens": tokens})
    monkeypatch.setitem(registry.specs, MODEL, spec)


def submit(rt: tasks.Runtime, job: ScoreJob | TraceJob) -> str:
    """What POST /v1/jobs does once the request is valid: a record, then the RQ job."""
    params = job.model_dump(mode="json", exclude={"kind", "model"})
    doc = rt.store.create(kind=job.kind, model=MODEL, owner="someone", params=params)
    queue.enqueue(rt.store.redis, MODEL, doc.id, timeout_s=600)
    return doc.id


def work(rt: tasks.Runtime) -> None:
    """RQ's in-process worker on the model's queue until the queue is empty."""
    conn = rt.store.redis
    worker = SimpleWorker(
        [queue.model_queue(conn, MODEL)], connection=conn, serializer=JSONSerializer
    )
    worker.work(burst=True, logging_level="WARNING", with_scheduler=False)


def assert_as_alone(rt: tasks.Runtime, job_id: str, job: ScoreJob | TraceJob) -> None:
    """The stored blob and summary are what the job computes alone."""
    doc = rt.store.get(job_id).document
    assert doc.status is JobStatus.SUCCEEDED, doc.error
    path = rt.blobs.path(job_id)
    got = load_file(path)
    expected = alone(rt.registry.get(MODEL), job)
    assert got.keys() == expected.tensors.keys()
    for name, want in expected.tensors.items():
        assert got[name].shape == want.shape and got[name].dtype == want.dtype, name
        if want.dtype == torch.float32:
            torch.testing.assert_close(got[name], want, atol=1e-5, rtol=1e-4, msg=name)
        elif want.is_floating_point():
            torch.testing.assert_close(got[name], want, msg=name)
        else:
            assert torch.equal(got[name], want), name
    with safe_open(path, framework="pt") as f:
        summary = json.loads(f.metadata()["summary"])
    assert summary == doc.summary
    assert summary.keys() == expected.summary.keys()
    if isinstance(job, ScoreJob):
        assert [t["next_token_id"] for t in summary["texts"]] == [
            t["next_token_id"] for t in expected.summary["texts"]
        ]
    else:
        assert summary == json.loads(json.dumps(expected.summary))


def test_queued_score_jobs_share_one_pass_and_each_gets_its_own_result(
    rt: tasks.Runtime,
) -> None:
    jobs = [
        ScoreJob(model=MODEL, texts=SHORT),
        ScoreJob(model=MODEL, texts=[LONG, SHORT], temperature=2.5),
        ScoreJob(model=MODEL, texts=MEDIUM, final_token_only=True, temperature=0.5),
        ScoreJob(model=MODEL, texts=[SHORT, MEDIUM], top_k=5),
        ScoreJob(model=MODEL, texts=[SHORT, TOO_LONG]),
    ]
    ids = [submit(rt, job) for job in jobs]
    trace_id = submit(rt, TraceJob(model=MODEL, texts=SHORT, layers=[0]))  # another kind
    late = ScoreJob(model=MODEL, texts=LONG, temperature=4.0)  # queued behind the trace
    late_id = submit(rt, late)
    work(rt)

    for job_id, job in zip(ids, jobs, strict=True):
        if job_id != ids[4]:
            assert_as_alone(rt, job_id, job)
    failed = rt.store.get(ids[4]).document
    assert failed.status is JobStatus.FAILED
    assert failed.error.type == "InvalidParameter" and "texts" in failed.error.message
    assert_as_alone(rt, late_id, late)
    assert rt.store.get(trace_id).document.status is JobStatus.SUCCEEDED
    # the first score job took the other four valid ones, including the one behind the trace
    assert rt.batching.largest == 5 and rt.batching.batched_jobs == 5
    conn = rt.store.redis
    assert queue.queue_depth(conn, MODEL) == 0
    assert not any(conn.exists(Job.key_for(i)) for i in ids if i != ids[4])
    assert rt.store.redis.hlen("lens:running") == 0


def wait_ms(registry: ModelRegistry, ms: float, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = registry.specs[MODEL].model_copy(update={"batch_wait_ms": ms})
    monkeypatch.setitem(registry.specs, MODEL, spec)


@pytest.fixture
def waiting(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Set once a pass asks whether submissions are still in flight: it asks only while
    it waits for a burst."""
    asked = threading.Event()
    ask = queue.submissions_in_flight

    def asking(*args: Any) -> int:
        asked.set()
        return ask(*args)

    monkeypatch.setattr(queue, "submissions_in_flight", asking)
    return asked


def test_jobs_still_being_submitted_join_the_pass_that_is_starting(
    rt: tasks.Runtime,
    registry: ModelRegistry,
    monkeypatch: pytest.MonkeyPatch,
    waiting: threading.Event,
) -> None:
    """The first job is running (held at its start by a submission in flight) before the
    others are queued: only the wait for in-flight submissions can put them in its pass."""
    wait_ms(registry, 60_000, monkeypatch)
    first = submit(rt, ScoreJob(model=MODEL, texts=SHORT))
    later = [ScoreJob(model=MODEL, texts=MEDIUM), ScoreJob(model=MODEL, texts=[LONG, SHORT])]
    later_ids: list[str] = []
    failed: list[AssertionError] = []

    def api_busy_with_a_burst() -> None:
        in_flight = keys.submitting_key(MODEL, "score")
        rt.store.redis.incr(in_flight)
        try:
            assert waiting.wait(60), "the pass did not wait for the submission in flight"
            later_ids.extend(submit(rt, job) for job in later)
        except AssertionError as e:
            failed.append(e)
        finally:
            rt.store.redis.decr(in_flight)
        try:
            wait_until(
                lambda: rt.store.get(first).document.status is JobStatus.SUCCEEDED,
                30,
                "the pass stopped waiting once the burst was queued",
            )
        except AssertionError as e:
            failed.append(e)

    burst = threading.Thread(target=api_busy_with_a_burst)
    burst.start()
    work(rt)
    burst.join()
    assert not failed, failed
    assert rt.batching.passes == 1 and rt.batching.largest == 3
    for job_id, job in zip(later_ids, later, strict=True):
        assert_as_alone(rt, job_id, job)


def test_with_nothing_in_flight_a_job_starts_at_once(
    rt: tasks.Runtime,
    registry: ModelRegistry,
    monkeypatch: pytest.MonkeyPatch,
    waiting: threading.Event,
) -> None:
    wait_ms(registry, 10_000, monkeypatch)
    rt.store.redis.set(keys.submitting_key(MODEL, "trace"), 1)  # another kind: no reason
    job_id = submit(rt, ScoreJob(model=MODEL, texts=SHORT))
    work(rt)
    assert not waiting.is_set(), "it waited for submissions of another kind"
    assert rt.store.get(job_id).document.status is JobStatus.SUCCEEDED


def test_queued_trace_jobs_keep_their_layers_sites_positions_and_dtype(
    rt: tasks.Runtime,
) -> None:
    jobs = [
        TraceJob(model=MODEL, texts=[SHORT, LONG]),
        TraceJob(model=MODEL, texts=MEDIUM, layers=[1], sites=["logits", "mlp_output"]),
        TraceJob(model=MODEL, texts=[MEDIUM, SHORT], positions="last", dtype="float16"),
        TraceJob(
            model=MODEL,
            texts=[LONG, SHORT],
            positions=[0, -1],
            sites=["block_output", "logits"],
            dtype="bfloat16",
        ),
        TraceJob(model=MODEL, texts=[SHORT, LONG], positions=[9]),  # past SHORT's end
    ]
    ids = [submit(rt, job) for job in jobs]
    work(rt)
    for job_id, job in zip(ids[:4], jobs[:4], strict=True):
        assert_as_alone(rt, job_id, job)
    failed = rt.store.get(ids[4]).document
    assert failed.status is JobStatus.FAILED and "positions" in failed.error.message
    assert rt.batching.largest == 4


def test_token_budget_splits_the_queue_into_several_passes(
    rt: tasks.Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = rt.registry.get(MODEL)
    long_tokens = len(lm.tokenizer(LONG)["input_ids"])
    budget(rt.registry, 2 * long_tokens, monkeypatch)
    jobs = [ScoreJob(model=MODEL, texts=t) for t in (LONG, SHORT, LONG, MEDIUM, SHORT)]
    ids = [submit(rt, job) for job in jobs]
    work(rt)
    for job_id, job in zip(ids, jobs, strict=True):
        assert_as_alone(rt, job_id, job)
    assert rt.batching.largest == 2 and rt.batching.passes == 3


def test_a_job_cancelled_while_queued_is_not_taken(rt: tasks.Runtime) -> None:
    jobs = [ScoreJob(model=MODEL, texts=t) for t in (SHORT, MEDIUM, LONG)]
    ids = [submit(rt, job) for job in jobs]
    # cancelled in the store, not yet removed from RQ's queue (the API's cancel, half done)
    assert rt.store.transition(ids[1], [JobStatus.QUEUED], JobStatus.CANCELLED)
    work(rt)
    assert rt.store.get(ids[1]).document.status is JobStatus.CANCELLED
    assert rt.store.get(ids[1]).document.started_at is None
    for i in (0, 2):
        assert_as_alone(rt, ids[i], jobs[i])
    assert rt.batching.largest == 2


def test_a_shared_pass_out_of_memory_runs_each_job_on_its_own(
    rt: tasks.Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shared_pass.forward

    def small_memory(lm: LoadedModel, items: list[shared_pass.Prepared]) -> shared_pass.SharedPass:
        if len(items) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(lm, items)

    monkeypatch.setattr(shared_pass, "forward", small_memory)
    jobs = [ScoreJob(model=MODEL, texts=t, temperature=2.0) for t in (SHORT, LONG, MEDIUM)]
    ids = [submit(rt, job) for job in jobs]
    work(rt)
    for job_id, job in zip(ids, jobs, strict=True):
        assert_as_alone(rt, job_id, job)
    assert rt.batching.passes == 3 and rt.batching.largest == 1


def test_jobs_queued_over_http_are_batched_by_a_real_worker(
    tmp_path: Path, demo_model_dir: Path
) -> None:
    """The whole path: HTTP in, one lens worker, heartbeat stats out, results as alone."""
    stack = Stack(service_settings(tmp_path, {DEMO: demo_model_dir}))
    texts = ["one two | one", "red cat blue dog | red cat blue", "a | a", "one | "]
    try:
        stack.start(workers=0)  # no worker yet: the jobs wait in the queue
        stack.wait_api()
        with httpx.Client(base_url=stack.url, timeout=60) as http:
            ids = []
            for i, text in enumerate(texts):
                body = {"kind": "score", "model": DEMO, "texts": text, "temperature": i + 1}
                r = http.post("/v1/jobs", json=body)
                assert r.status_code == 202, r.text
                ids.append(r.json()["id"])
            stack.spawn_worker("late-worker")
            got = [_wait_result(http, job_id) for job_id in ids]
            conn = redis.Redis.from_url(stack.settings.redis_url)
            info = _worker_info(conn, "late-worker")
    finally:
        stack.stop()
    assert info["batching"]["largest"] == len(texts)
    assert info["registry"]["resident"] == [DEMO] and info["registry"]["loads"] == {DEMO: 1}
    lm = load_model(str(demo_model_dir), device="cpu", dtype="float32")
    for i, (text, tensors) in enumerate(zip(texts, got, strict=True)):
        expected = score(lm, [text], temperature=i + 1).tensors
        for name in ("logits", "final_token_logits"):
            torch.testing.assert_close(tensors[name], expected[name], atol=1e-5, rtol=1e-4)
        assert torch.equal(tensors["input_ids"], expected["input_ids"])


def _wait_result(http: httpx.Client, job_id: str, timeout: float = 60) -> dict[str, torch.Tensor]:
    def ended() -> dict[str, Any] | None:
        doc = http.get(f"/v1/jobs/{job_id}").json()
        return None if doc["status"] in ("queued", "running") else doc

    doc = wait_until(ended, timeout, f"job {job_id} ended")
    assert doc["status"] == "succeeded", doc
    return load(http.get(f"/v1/jobs/{job_id}/result").content)


def _worker_info(conn: redis.Redis, worker: str, timeout: float = 10) -> dict[str, Any]:
    """The worker's heartbeat once it reports a batch (it beats every 0.5 s here)."""

    def reported() -> dict[str, Any] | None:
        info = presence.live_workers(conn).get(worker, {})
        return info if info.get("batching", {}).get("passes") else None

    return wait_until(reported, timeout, f"batching stats from {worker}")
