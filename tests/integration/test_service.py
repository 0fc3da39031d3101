"""The service path end to end: real Redis, real worker processes, real HTTP."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch
from safetensors import safe_open
from safetensors.torch import load
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.stack import Stack
from tests.conftest import DEMO, JSONL, service_settings

TEXTS = ["red cat blue dog | red cat blue", "one two | one"]


def submit(http: httpx.Client, **body: Any) -> dict[str, Any]:
    r = http.post("/v1/jobs", json={"model": DEMO, **body})
    assert r.status_code == 202, r.text
    return r.json()


def wait(http: httpx.Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    """Follow the job's event stream until it ends; returns the final job document."""
    with http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=timeout) as r:
        assert r.status_code == 200
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event == "status":
                doc = json.loads(line.removeprefix("data: "))
                if doc["status"] in ("succeeded", "failed", "cancelled"):
                    return doc
    raise AssertionError(f"event stream of {job_id} ended early")


def result(http: httpx.Client, job_id: str) -> dict[str, torch.Tensor]:
    r = http.get(f"/v1/jobs/{job_id}/result")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    return load(r.content)


@pytest.fixture(scope="module")
def reference(demo_model_dir: Path):
    """The demo model loaded in-process the plain transformers way."""
    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir).eval()
    return tok, model


def test_score_round_trip_matches_in_process_forward(http: httpx.Client, reference) -> None:
    doc = submit(http, kind="score", texts=TEXTS, temperature=2.0)
    assert doc["status"] == "queued" and doc["kind"] == "score"
    final = wait(http, doc["id"])
    assert final["status"] == "succeeded", final
    assert final["started_at"] and final["finished_at"]
    tensors = result(http, doc["id"])

    tok, model = reference
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits / 2.0
    mask = enc["attention_mask"].bool()
    got = tensors["logits"]
    assert got.shape == logits.shape
    torch.testing.assert_close(got[mask], logits[mask], atol=1e-5, rtol=1e-5)
    last = enc["attention_mask"].sum(1) - 1
    torch.testing.assert_close(
        tensors["final_token_logits"], logits[torch.arange(len(TEXTS)), last], atol=1e-5, rtol=1e-5
    )
    assert torch.equal(tensors["input_ids"], enc["input_ids"])
    assert final["tensors"]["logits"]["shape"] == list(logits.shape)


def test_result_file_is_self_describing(http: httpx.Client, service: Stack, tmp_path: Path) -> None:
    doc = submit(http, kind="score", texts="one two | one", final_token_only=True)
    assert wait(http, doc["id"])["status"] == "succeeded"
    path = tmp_path / "r.safetensors"
    path.write_bytes(http.get(f"/v1/jobs/{doc['id']}/result").content)
    stored = service.settings.blob_dir / doc["id"][:2] / f"{doc['id']}.safetensors"
    assert stored.is_relative_to(service.settings.data_dir / "results")
    assert path.read_bytes() == stored.read_bytes(), "served from results_dir"
    with safe_open(path, framework="np") as f:
        meta = f.metadata()
        names = set(f.keys())
    assert "logits" not in names and "final_token_logits" in names
    assert meta["kind"] == "score" and meta["job_id"] == doc["id"] and meta["model"] == DEMO
    assert json.loads(meta["params"])["final_token_only"] is True
    assert isinstance(json.loads(meta["summary"]), dict)


def test_trace_round_trip(http: httpx.Client, reference) -> None:
    doc = submit(http, kind="trace", texts=TEXTS, layers=[0], sites=["block_output", "logits"])
    assert wait(http, doc["id"])["status"] == "succeeded"
    tensors = result(http, doc["id"])
    tok, model = reference
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(
        tensors["block_output.0"][mask], out.hidden_states[1][mask], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        tensors["final_logits"][mask], out.logits[mask], atol=1e-5, rtol=1e-5
    )
    assert "logits.0" in tensors and "block_output.1" not in tensors


def test_two_jobs_load_the_model_once(http: httpx.Client, service: Stack) -> None:
    for _ in range(2):
        assert wait(http, submit(http, kind="score", texts="one")["id"])["status"] == "succeeded"
    import redis

    from app import presence

    conn = redis.Redis.from_url(service.settings.redis_url)
    workers = presence.live_workers(conn)
    assert workers and all(w["loads"] == {DEMO: 1} for w in workers.values())
    assert all(w["worker_threads"] == 1 for w in workers.values()), "the worker_threads setting"
    assert all(w["omp_wait_policy"] == "PASSIVE" for w in workers.values()), "lens worker sets it"
    models = http.get(f"/v1/models/{DEMO}").json()
    assert models["worker_threads"] == {name: 1 for name in workers}
    nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + service.settings.worker_nice)
    assert service.settings.worker_nice > 0 and all(w["nice"] == nice for w in workers.values())
    keep = service.settings.worker_keep_freed_mib if platform.libc_ver()[0] == "glibc" else 0
    assert all(w["keeps_freed_mib"] == keep for w in workers.values()), "worker_keep_freed_mib"


def test_unknown_model_is_404(http: httpx.Client) -> None:
    r = http.post("/v1/jobs", json={"kind": "score", "model": "nope", "texts": "a"})
    assert r.status_code == 404
    assert "nope" in r.json()["detail"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"kind": "score", "texts": "a", "temperature": 0}, "temperature"),
        ({"kind": "score", "texts": []}, "texts"),
        ({"kind": "score", "texts": "a", "colour": "red"}, "colour"),
        ({"kind": "trace", "texts": "a", "sites": ["nowhere"]}, "sites"),
        ({"kind": "trace", "texts": "a", "layers": [99]}, "layers"),
        ({"kind": "ablate", "texts": ["a"], "targets": ["b"], "head_mask": [[1.0]]}, "head_mask"),
        ({"kind": "wobble", "texts": "a"}, "kind"),
    ],
)
def test_bad_parameters_are_422_naming_the_field(
    http: httpx.Client, body: dict[str, Any], field: str
) -> None:
    r = http.post("/v1/jobs", json={"model": DEMO, **body})
    assert r.status_code == 422, r.text
    assert field in json.dumps(r.json()["detail"])


def test_submissions_in_flight_count_back_to_zero(http: httpx.Client, service: Stack) -> None:
    """Refused submissions (checked before or after the count goes up) and queued ones
    alike leave no count behind: a leftover would hold up every batchable job."""
    from app import keys

    bodies = [
        {"kind": "score", "texts": "one two"},
        {"kind": "score", "texts": "a", "layers": [0]},  # 422 before the handler
        {"kind": "trace", "texts": "a", "layers": [99]},  # 422 in the handler
        {"kind": "score", "texts": ["a"] * 1000},  # over max_texts: 413 in the handler
    ]
    for body in bodies:
        http.post("/v1/jobs", json={"model": DEMO, **body})
    conn = redis.Redis.from_url(service.settings.redis_url)
    for kind in ("score", "trace"):
        assert int(conn.get(keys.submitting_key(DEMO, kind)) or 0) == 0, kind


def test_unknown_job_is_404(http: httpx.Client) -> None:
    for path in ("", "/result", "/events"):
        assert http.get(f"/v1/jobs/{'0' * 32}{path}").status_code == 404
    assert http.delete(f"/v1/jobs/{'0' * 32}").status_code == 404


def test_job_list_newest_first_and_filtered(http: httpx.Client) -> None:
    a = submit(http, kind="score", texts="one")
    b = submit(http, kind="score", texts="two")
    wait(http, b["id"])
    ids = [j["id"] for j in http.get("/v1/jobs").json()["jobs"]]
    assert ids.index(b["id"]) < ids.index(a["id"])
    done = http.get("/v1/jobs", params={"status": "succeeded"}).json()["jobs"]
    assert b["id"] in [j["id"] for j in done]
    assert all(j["status"] == "succeeded" for j in done)


def test_dataset_upload(http: httpx.Client) -> None:
    rows = [{"prompt": "one two | one", "target": " two"}, {"prompt": "red | ", "target": "red"}]
    body = "\n".join(json.dumps(r) for r in rows)
    r = http.post("/v1/datasets", content=body, headers=JSONL)
    assert r.status_code == 201, r.text
    assert r.json()["rows"] == 2
    bad = http.post("/v1/datasets", content='{"prompt": "x"}', headers=JSONL)
    assert bad.status_code == 422


def test_restarting_the_api_loses_nothing(http: httpx.Client, service: Stack) -> None:
    doc = submit(http, kind="score", texts="one two")
    assert wait(http, doc["id"])["status"] == "succeeded"
    before = http.get("/v1/jobs").json()["jobs"]
    service.stop_api()
    service.start_api()
    service.wait_ready()
    assert http.get("/v1/jobs").json()["jobs"] == before
    assert http.get(f"/v1/jobs/{doc['id']}/result").status_code == 200


def test_queued_job_result_is_409_and_cancelled_job_never_runs(
    tmp_path: Path, demo_model_dir: Path
) -> None:
    """A model with no worker yet keeps jobs queued; cancel one, then start a worker."""
    stack = Stack(service_settings(tmp_path, {DEMO: demo_model_dir, "later": demo_model_dir}))
    try:
        stack.start(workers=1, serves=[DEMO])
        stack.wait_ready(models=[DEMO])
        with httpx.Client(base_url=stack.url, timeout=60) as http:
            cancelled = submit(http, kind="score", texts="one", model="later")
            kept = submit(http, kind="score", texts="two", model="later")
            assert kept["queue_position"] == 1
            assert http.get(f"/v1/jobs/{cancelled['id']}/result").status_code == 409
            r = http.delete(f"/v1/jobs/{cancelled['id']}")
            assert r.status_code == 202 and r.json()["status"] == "cancelled"
            assert http.get(f"/v1/jobs/{kept['id']}").json()["queue_position"] == 0
            stack.spawn_worker("late-worker", ["later"])
            assert wait(http, kept["id"])["status"] == "succeeded"
            doc = http.get(f"/v1/jobs/{cancelled['id']}").json()  # queued ahead: passed over
            assert doc["status"] == "cancelled" and doc["started_at"] is None
            assert http.delete(f"/v1/jobs/{cancelled['id']}").status_code == 409
    finally:
        stack.stop()


def test_the_event_streams_final_document_is_the_jobs_document(http: httpx.Client) -> None:
    """Status events carry the record, so the stream builds its documents without reading
    Redis: they must be the documents GET returns."""
    doc = submit(http, kind="score", texts=TEXTS)
    streamed = wait(http, doc["id"])
    assert streamed["status"] == "succeeded" and streamed["tensors"]
    assert streamed == http.get(f"/v1/jobs/{doc['id']}").json()


def test_a_waiting_result_request_gets_the_result_the_event_stream_announces(
    http: httpx.Client,
) -> None:
    """Submit, then one request that waits for the job (no event stream): the same file
    as waiting on the stream and downloading after."""
    waited_for = submit(http, kind="score", texts=TEXTS)
    r = http.get(f"/v1/jobs/{waited_for['id']}/result", params={"wait": 60})
    assert r.status_code == 200, r.text
    followed = submit(http, kind="score", texts=TEXTS)
    assert wait(http, followed["id"])["status"] == "succeeded"
    got, expected = load(r.content), result(http, followed["id"])
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[name], expected[name]) for name in got)
