"""Observability of the running service: /metrics moves with real jobs, and every log line
written while a job runs (worker) or is requested (API) carries its id."""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.stack import Stack
from tests.conftest import DEMO
from tests.waiting import wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(http: httpx.Client) -> Samples:
    r = http.get("/metrics")
    assert r.status_code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def run(http: httpx.Client, **body: Any) -> str:
    r = http.post("/v1/jobs", json={"model": DEMO, **body})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    wait_until(
        lambda: http.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded",
        60,
        f"job {job_id} succeeded",
    )
    return job_id


def test_metrics_follow_real_jobs(http: httpx.Client) -> None:
    before = scrape(http)
    run(http, kind="score", texts="red cat | red")
    run(http, kind="score", texts=["one two | one", "red"])
    run(http, kind="trace", texts="red cat", layers=[0], sites=["block_output"])
    after = scrape(http)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert delta("lens_jobs_submitted_total", kind="score") == 2
    assert delta("lens_jobs_finished_total", kind="score", status="succeeded") == 2
    assert delta("lens_jobs_finished_total", kind="trace", status="succeeded") == 1
    assert delta("lens_job_duration_seconds_count", kind="score") == 2
    assert delta("lens_job_duration_seconds_bucket", kind="trace", le="+Inf") == 1
    assert 0 < delta("lens_job_duration_seconds_sum", kind="score") < 60
    assert after[("lens_redis_up", ())] == 1
    assert after[("lens_workers", ())] == 1
    assert after[("lens_model_resident", (("model", DEMO),))] == 1
    assert after[("lens_queue_depth", (("model", DEMO),))] == 0
    assert after[("lens_jobs_running", (("model", DEMO),))] == 0
    load = [v for (name, labels), v in after.items() if name == "lens_model_load_seconds"]
    assert len(load) == 1 and 0 < load[0] < 120
    assert not any(name.startswith("lens_gpu_") for name, _ in after), "no CUDA here"


def test_every_line_of_a_job_carries_its_id(http: httpx.Client, service: Stack) -> None:
    job_id = run(http, kind="chg", texts=["red cat | red"], targets=[" cat"], num_masks=1,
                 num_updates=3, num_reg_updates=1, batch_size=1)  # fmt: skip
    logs = service.settings.data_dir / "logs"
    wait_until(
        lambda: f"job {job_id}: succeeded" in (logs / "worker-0.log").read_text(),
        10,
        "the worker logged the job's end",
    )
    worker = [line for line in (logs / "worker-0.log").read_text().splitlines() if "ts=" in line]
    mine = [line for line in worker if job_id in line]
    assert len(mine) >= 2 and all(f" job={job_id} " in line for line in mine)
    start = next(i for i, line in enumerate(worker) if job_id in line)
    end = max(i for i, line in enumerate(worker) if job_id in line)
    assert all(f" job={job_id} " in line for line in worker[start : end + 1])
    api = [line for line in (logs / "api.log").read_text().splitlines() if job_id in line]
    assert any("POST /v1/jobs 202" in line for line in api)
    assert api and all(f" job={job_id} " in line for line in api)
