"""Tenants who do not play nice, against one real stack (Redis, the API, API keys;
``worker-0`` serves ``demo`` and ``spare``, ``worker-1`` only ``spare``; ``idle`` has no
worker, so its jobs stay queued): oversized and unbounded requests refused at
submission, fairness between keys, floods, a 16 MiB body, a double run fenced, and a
Redis restart in the middle of a job."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from pydantic import SecretStr

from app.core.config import Limits
from app.core.redis_server import start_redis
from app.keys import RUNNING, job_key
from app.stack import Stack
from tests.conftest import DEMO, running_stack, service_settings
from tests.integration.test_failures import fitting
from tests.waiting import ended, poll_job, wait_until

IDLE, SPARE = "idle", "spare"
KEYS = {name: f"{name}-key-0123456789abcdef" for name in "ABCDE"}
LIMITS = Limits(
    max_result_bytes=8 * 1024 * 1024,
    max_job_memory_bytes=256 * 1024 * 1024,
    max_fit_rows=100_000,
    max_streams_per_key=3,
    max_datasets_per_key=2,
    max_active_jobs_per_key=24,
)
PAIRS = {"texts": ["red cat blue dog | red cat blue", "one two | one"], "targets": [" dog", " two"]}
CHG = {"kind": "chg", **PAIRS, "num_masks": 2, "batch_size": 2, "num_reg_updates": 0}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[Stack]:
    models = {DEMO: demo_model_dir, SPARE: demo_model_dir, IDLE: demo_model_dir}
    settings = service_settings(tmp_path_factory.mktemp("hostile"), models).model_copy(
        update={
            "api_keys": [SecretStr(k) for k in KEYS.values()],
            "limits": LIMITS,
            "retry_lost_jobs": True,
            "worker_threads": 1,
        }
    )
    with running_stack(settings, serves=[DEMO, SPARE]) as stack:
        stack.spawn_worker("worker-1", [SPARE])  # loads while the first tests run
        yield stack


def client(stack: Stack, key: str) -> httpx.Client:
    return httpx.Client(
        base_url=stack.url, timeout=60, headers={"Authorization": f"Bearer {KEYS[key]}"}
    )


@pytest.fixture
def a(stack: Stack) -> Iterator[httpx.Client]:
    with client(stack, "A") as c:
        yield c


@pytest.fixture
def b(stack: Stack) -> Iterator[httpx.Client]:
    with client(stack, "B") as c:
        yield c


def submit(http: httpx.Client, model: str = DEMO, **body: Any) -> str:
    r = http.post("/v1/jobs", json={"model": model, **body})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def detail(r: httpx.Response) -> str:
    return json.dumps(r.json()["detail"], ensure_ascii=False)


UNBOUNDED = [
    ({"kind": "chg", **PAIRS, "gradient_accum_steps": 65}, 422, "max_gradient_accum_steps = 64"),
    (
        {"kind": "chg", **PAIRS, "num_updates": 1000, "gradient_accum_steps": 60, "batch_size": 2},
        422,
        "max_fit_rows = 100000",
    ),
    ({"kind": "trace", "texts": "a b", "positions": [0, 0]}, 422, "must not repeat a position"),
    (
        {"kind": "trace", "texts": "a b", "positions": list(range(8193))},
        422,
        "max_tokens_per_text = 8192",
    ),
    ({"kind": "trace", "texts": "a", "layers": [0, 0]}, 422, "must not repeat a layer"),
    ({"kind": "trace", "texts": "a", "sites": ["logits", "logits"]}, 422, "must not repeat"),
    (
        {"kind": "trace", "texts": "a", "gradients": {"target_ids": [1] * 8193}},
        422,
        "max_tokens_per_text = 8192",
    ),
    (
        {"kind": "trace", "texts": "a", "gradients": {"target": "x" * 100_001}},
        413,
        "gradients.target: a text of 100001 characters exceeds the limit max_text_chars",
    ),
    ({"kind": "score", "texts": "a", "top_k": 1025}, 422, "max_top_k = 1024"),
    ({"kind": "chg", **PAIRS, "seed": 2**64}, 422, "seed"),
    (
        {
            "kind": "chg",
            **PAIRS,
            "num_masks": 64,
            "num_updates": 5000,
            "num_reg_updates": 5000,
            "batch_size": 1,
            "record_history": True,
        },
        413,
        "turn record_history off",
    ),
]


@pytest.mark.parametrize(("body", "code", "named"), UNBOUNDED, ids=lambda x: str(x)[:40])
def test_each_unbounded_count_is_refused_at_submission(
    a: httpx.Client, body: dict[str, Any], code: int, named: str
) -> None:
    r = a.post("/v1/jobs", json={"model": DEMO, **body})
    assert r.status_code == code, r.text
    assert named in detail(r)


def test_an_estimate_over_a_limit_is_refused_before_any_compute(
    stack: Stack, a: httpx.Client
) -> None:
    """A trace of every site of 64 texts of ~120 tokens would hold ~40 MB; a fit of 32
    masks × 32 of them at a time would take ~0.9 GB: both over this stack's limits, and
    refused from the model's published shape without reaching the queue."""
    text = " ".join(["red cat blue dog"] * 30)
    before = a.get("/v1/jobs").json()["jobs"]
    r = a.post("/v1/jobs", json={"model": DEMO, "kind": "trace", "texts": [text] * 64})
    assert r.status_code == 413, r.text
    assert "estimated from the model's shape" in detail(r)
    assert "max_result_bytes = 8388608" in detail(r) and "positions='last'" in detail(r)
    fit = {**CHG, "texts": [text] * 32, "targets": [" dog"] * 32, "num_masks": 32}
    r = a.post("/v1/jobs", json={"model": DEMO, **fit, "batch_size": 32})
    assert r.status_code == 413, r.text
    assert "of memory at its peak" in detail(r) and "lower num_masks or batch_size" in detail(r)
    assert a.get("/v1/jobs").json()["jobs"] == before
    conn = redis.Redis.from_url(stack.settings.redis_url)
    assert conn.hlen(RUNNING) == 0


def test_quota_holds_against_a_burst(stack: Stack) -> None:
    """Submissions at once cannot get past max_active_jobs_per_key (each is counted in
    the same step that admits it)."""
    with client(stack, "D") as d:

        def one(_: int) -> httpx.Response:
            return d.post("/v1/jobs", json={"model": IDLE, "kind": "score", "texts": "a"})

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(one, range(36)))
        codes = sorted(r.status_code for r in answers)
        assert codes.count(202) == LIMITS.max_active_jobs_per_key, codes
        assert set(codes) == {202, 429}
        for r in answers:
            if r.status_code == 202:
                assert d.delete(f"/v1/jobs/{r.json()['id']}").status_code == 202


def _started(http: httpx.Client, job_id: str) -> datetime:
    doc = poll_job(http, job_id, lambda d: d["started_at"] is not None, timeout=120)
    return datetime.fromisoformat(doc["started_at"])


def test_a_key_waits_behind_at_most_one_job_of_another(a: httpx.Client, b: httpx.Client) -> None:
    """Key A queues 20 fits, then key B one score job: B's starts after at most one of A's."""
    mine = [submit(a, **CHG, num_updates=30, seed=i) for i in range(20)]
    theirs = submit(b, kind="score", texts="red cat | red")
    b_started = _started(b, theirs)
    a_started = []
    for job_id in mine:
        doc = a.get(f"/v1/jobs/{job_id}").json()
        if doc["started_at"] is not None:
            a_started.append(datetime.fromisoformat(doc["started_at"]))
        a.delete(f"/v1/jobs/{job_id}")
    ahead = sum(t < b_started for t in a_started)
    assert ahead <= 1, f"B's job started after {ahead} of A's 20 jobs"
    assert poll_job(b, theirs, ended)["status"] == "succeeded"
    for job_id in mine:
        poll_job(a, job_id, ended)


def test_a_16_mib_body_of_non_ascii_text_leaves_other_streams_up(
    stack: Stack, a: httpx.Client, b: httpx.Client
) -> None:
    """Its record is stored as compact UTF-8, and its events carry no record: another
    key's event stream follows its own job to the end (a 48 MB event once cut the API's
    one subscription, and every stream with it)."""
    watched = submit(b, IDLE, kind="score", texts="red cat")
    events: list[tuple[str, str]] = []
    streaming = threading.Event()

    def follow() -> None:
        with client(stack, "B") as own, own.stream("GET", f"/v1/jobs/{watched}/events") as r:
            kind = ""
            for line in r.iter_lines():
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    events.append((kind, json.loads(line.removeprefix("data: "))["status"]))
                    streaming.set()

    follower = threading.Thread(target=follow)
    follower.start()
    assert streaming.wait(10)
    text = "漢字かなカナ한국어" * 11_000  # 99,000 characters, 3 bytes each in UTF-8
    body = json.dumps(
        {"model": IDLE, "kind": "score", "texts": [text] * 55}, ensure_ascii=False
    ).encode()
    assert 16_000_000 < len(body) <= LIMITS.max_request_bytes
    r = a.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 202, r.text[:200]
    big = r.json()["id"]
    conn = redis.Redis.from_url(stack.settings.redis_url)
    stored = conn.hstrlen(job_key(big), "params")
    assert stored <= len(body), (stored, len(body))
    assert a.delete(f"/v1/jobs/{big}").status_code == 202  # publishes its end
    listed = a.get("/v1/jobs").json()["jobs"]
    assert [j["params"] for j in listed if j["id"] == big] == [{}]
    assert b.delete(f"/v1/jobs/{watched}").status_code == 202
    follower.join(30)
    assert not follower.is_alive()
    assert events[0] == ("status", "queued") and events[-1] == ("status", "cancelled"), events
    assert "error" not in [kind for kind, _ in events]


def test_streams_and_held_result_requests_are_capped_per_key(
    stack: Stack, a: httpx.Client, b: httpx.Client
) -> None:
    job_id = submit(a, IDLE, kind="score", texts="a")
    other = submit(b, IDLE, kind="score", texts="a")
    with client(stack, "A") as extra, contextlib.ExitStack() as open_streams:
        for _ in range(LIMITS.max_streams_per_key):
            stream = extra.stream("GET", f"/v1/jobs/{job_id}/events")
            assert open_streams.enter_context(stream).status_code == 200
        over = a.get(f"/v1/jobs/{job_id}/events")
        assert over.status_code == 429 and "max_streams_per_key" in detail(over)
        held = a.get(f"/v1/jobs/{job_id}/result", params={"wait": 30})
        assert held.status_code == 429
        with b.stream("GET", f"/v1/jobs/{other}/events") as theirs:
            assert theirs.status_code == 200, "other keys are not affected"

    def answered() -> httpx.Response | None:
        r = a.get(f"/v1/jobs/{job_id}/result", params={"wait": 0.1})
        return None if r.status_code == 429 else r

    r = wait_until(answered, 10, "closed streams give their places back")
    assert r.status_code == 409
    a.delete(f"/v1/jobs/{job_id}")
    b.delete(f"/v1/jobs/{other}")


def test_data_set_floods_are_refused(stack: Stack) -> None:
    row = json.dumps({"prompt": "red cat", "target": " blue"})
    with client(stack, "C") as c, client(stack, "E") as e:
        upload = lambda http, text: http.post("/v1/datasets?format=jsonl", content=text)  # noqa: E731
        rows = upload(c, "\n".join([row] * 1025))
        assert rows.status_code == 413 and "max_texts = 1024" in detail(rows)
        wide = upload(c, json.dumps({"prompt": "x" * 100_001, "target": " y"}))
        assert wide.status_code == 413 and "max_text_chars = 100000" in detail(wide)
        assert [upload(c, row).status_code for _ in range(3)] == [201, 201, 429]
        assert "max_datasets_per_key is 2" in detail(upload(c, row))
        assert upload(e, row).status_code == 201, "another key keeps its own quota"
    assert not list(stack.settings.dataset_dir.glob("*.tmp"))


def _blob(stack: Stack, job_id: str, attempt: int) -> Path:
    suffix = f".{attempt}" if attempt else ""
    return stack.settings.blob_dir / job_id[:2] / f"{job_id}{suffix}.safetensors"


def test_a_run_presumed_lost_cannot_touch_the_rerun(stack: Stack, a: httpx.Client) -> None:
    """retry_lost_jobs, and a worker paused mid-fit: it is presumed dead, the job runs again
    on the other worker and succeeds; the paused worker resumes and changes nothing."""
    wait_until(
        lambda: a.get(f"/v1/models/{SPARE}").json()["resident"] == ["worker-0", "worker-1"],
        120,
        "worker-1 started",
    )
    job_id = submit(a, SPARE, **CHG, num_updates=100, seed=7)
    poll_job(a, job_id, fitting, timeout=60)
    holder = redis.Redis.from_url(stack.settings.redis_url).hget(job_key(job_id), "worker")
    assert holder is not None
    paused = holder.decode()
    os.kill(stack.workers[paused].pid, signal.SIGSTOP)
    try:
        done = poll_job(a, job_id, ended, timeout=90)
    finally:
        os.kill(stack.workers[paused].pid, signal.SIGCONT)
    assert done["status"] == "succeeded" and done["retries"] == 1, done
    result = _blob(stack, job_id, 1)
    digest = hashlib.sha256(result.read_bytes()).hexdigest()
    log = stack.settings.data_dir / "logs" / f"{paused}.log"
    wait_until(lambda: f"job {job_id}: cancelled" in log.read_text(), 30, "the resumed run stopped")
    after = a.get(f"/v1/jobs/{job_id}").json()
    assert after["status"] == "succeeded" and after["finished_at"] == done["finished_at"]
    assert hashlib.sha256(result.read_bytes()).hexdigest() == digest
    assert not _blob(stack, job_id, 0).exists()
    got = a.get(f"/v1/jobs/{job_id}/result")
    assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == digest


def _healthy(http: httpx.Client) -> bool:
    try:
        return http.get("/healthz").status_code == 200
    except httpx.HTTPError:
        return False


def test_a_redis_restart_mid_job_leaves_nothing_running(stack: Stack, a: httpx.Client) -> None:
    assert stack.redis is not None
    job_id = submit(a, **CHG, num_updates=150, seed=1)
    poll_job(a, job_id, fitting, timeout=60)
    port, files, password = stack.redis.port, stack.redis.data_dir, stack.redis.password
    worker_log = stack.settings.data_dir / "logs" / "worker-0.log"
    stack.redis.stop()
    try:
        wait_until(
            lambda: f"job {job_id}: progress: Redis unavailable" in worker_log.read_text(),
            30,
            "the worker's progress reports failed, and it kept its progress meanwhile",
        )
    finally:
        stack.redis = start_redis(files, port, password=password)
    wait_until(lambda: _healthy(a), 20, "the API reconnected")
    doc = poll_job(a, job_id, ended, timeout=90)
    assert doc["status"] == "succeeded" and doc["retries"] == 0, "its run outlived the restart"
    conn = redis.Redis.from_url(stack.settings.redis_url)
    assert conn.hlen(RUNNING) == 0
    jobs = a.get("/v1/jobs").json()["jobs"]
    assert [j["id"] for j in jobs if j["status"] == "running"] == []
