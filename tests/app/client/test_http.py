"""The client's HTTP behaviour against scripted answers: errors, retries, waiting, versions."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import numpy as np
import pytest
import safetensors.numpy

from app import __version__
from app.client import (
    AsyncLensClient,
    Conflict,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    LensClient,
    LensError,
    NotFound,
    PayloadTooLarge,
    Progress,
    QuotaExceeded,
    RetryPolicy,
    ScoreResult,
    ServerError,
    ServiceUnavailable,
    Unauthorized,
    VersionMismatch,
    WaitTimeout,
)
from app.client._http import SSEParser

FAST = RetryPolicy(attempts=4, backoff_s=0.001)
JOB = "a" * 32


def doc(status, **extra):
    return {
        "id": JOB,
        "kind": "score",
        "model": "demo",
        "status": status,
        "created_at": "2025-01-01T00:00:00Z",
        **extra,
    }


def sse(*events):
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events)


def score_file():
    logits = np.arange(12, dtype=np.float32).reshape(1, 2, 6) / 5
    tensors = {
        "logits": logits,
        "input_ids": np.array([[1, 2]]),
        "attention_mask": np.array([[1, 1]]),
    }
    meta = {"kind": "score", "job_id": JOB, "model": "demo", "params": "{}", "summary": "{}"}
    return safetensors.numpy.save(tensors, metadata=meta)


class Script:
    """Answers requests by (method, path); a list of answers is served in turn (last repeats)."""

    def __init__(self, routes):
        self.routes = {k: v if isinstance(v, list) else [v] for k, v in routes.items()}
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answers = self.routes.get((request.method, request.url.path))
        if answers is None:
            return httpx.Response(404, json={"detail": f"no route {request.url.path}"})
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def count(self, method, path):
        return sum(1 for r in self.requests if (r.method, r.url.path) == (method, path))


def client(script, **options):
    options.setdefault("progress", False)
    return LensClient(
        "http://lens.test",
        api_key="sekret",
        retry=FAST,
        transport=httpx.MockTransport(script),
        tensors="numpy",
        **options,
    )


def test_every_request_names_the_client_version_and_key():
    script = Script({("GET", "/v1/models"): httpx.Response(200, json={"models": []})})
    assert client(script).models() == []
    sent = script.requests[0]
    assert sent.headers["X-Lens-Client"] == __version__
    assert sent.headers["Authorization"] == "Bearer sekret"


@pytest.mark.parametrize(
    ("status", "body", "error", "text"),
    [
        (404, {"detail": "job 'x' not found"}, NotFound, "job 'x' not found"),
        (401, {"detail": "invalid API key"}, Unauthorized, "LENS_API_KEY"),
        (403, {"detail": "forbidden"}, Unauthorized, "forbidden"),
        (409, {"detail": "job x is running"}, Conflict, "running"),
        (413, {"detail": "too big"}, PayloadTooLarge, "too big"),
        (
            422,
            {
                "detail": [
                    {
                        "loc": ["body", "chg", "num_masks"],
                        "msg": "must be ≥ 1",
                        "type": "value_error",
                    }
                ]
            },
            InvalidRequest,
            "chg.num_masks: must be ≥ 1",
        ),
        (429, {"detail": "3 of your jobs are running"}, QuotaExceeded, "3 of your jobs"),
        (500, b"Internal Server Error", ServerError, "Internal Server Error"),
        (
            426,
            {"detail": "client version 9.0 cannot talk to server version 0.1.0"},
            VersionMismatch,
            f"this client is lens-server {__version__}",
        ),
        (
            400,
            {"detail": "client version 9.0 is too new for this server"},
            VersionMismatch,
            "too new",
        ),
    ],
)
def test_error_answers_become_named_exceptions(status, body, error, text):
    answer = (
        httpx.Response(status, content=body)
        if isinstance(body, bytes)
        else httpx.Response(status, json=body)
    )
    script = Script({("GET", f"/v1/jobs/{JOB}"): answer})
    with pytest.raises(error) as caught:
        client(script).job(JOB)
    assert caught.value.status == status
    assert text in str(caught.value)


def test_a_non_json_answer_says_so():
    html = httpx.Response(200, text="<html>hi</html>", headers={"content-type": "text/html"})
    with pytest.raises(LensError, match="text/html, not JSON; is this URL a lens-server"):
        client(Script({("GET", "/v1/models"): html})).models()


def test_503_is_retried_with_backoff_then_succeeds():
    busy = httpx.Response(503, json={"detail": "queue unavailable"})
    script = Script({("POST", "/v1/jobs"): [busy, busy, httpx.Response(202, json=doc("queued"))]})
    job = client(script).submit("score", "demo", texts="hi")
    assert job.id == JOB and script.count("POST", "/v1/jobs") == 3


def test_retries_are_bounded():
    script = Script({("GET", "/v1/models"): httpx.Response(503, json={"detail": "queue down"})})
    with pytest.raises(ServiceUnavailable, match="queue down"):
        client(script).models()
    assert script.count("GET", "/v1/models") == FAST.attempts


def test_connection_refused_is_retried_then_reported():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lens = LensClient(f"http://127.0.0.1:{port}", retry=RetryPolicy(attempts=3, backoff_s=0.001))
    with pytest.raises(
        ServiceUnavailable, match=f"cannot reach lens-server at http://127.0.0.1:{port}"
    ):
        lens.models()


def test_a_submit_whose_answer_was_lost_is_not_repeated():
    script = Script({("POST", "/v1/jobs"): httpx.ReadError("connection reset")})
    with pytest.raises(ServiceUnavailable):
        client(script).submit("score", "demo", texts="hi")
    assert script.count("POST", "/v1/jobs") == 1


def test_sse_parser_follows_the_event_stream_format():
    parser = SSEParser()
    lines = [": keep-alive", "", "event: progress", 'data: {"a":', "data: 1}", "", "data: x", ""]
    events = [e for line in lines if (e := parser.feed(line)) is not None]
    assert [(e.event, e.data) for e in events] == [("progress", '{"a":\n1}'), ("message", "x")]


def progress_stream():
    return httpx.Response(
        200,
        headers={"content-type": "text/event-stream"},
        text=sse(
            ("status", doc("running")),
            ("progress", {"stage": "none", "step": 1, "total": 2, "loss": 2.5}),
            ("progress", {"stage": "none", "step": 2, "total": 2, "loss": 1.5}),
            ("status", doc("succeeded")),
        ),
    )


def test_blocking_call_follows_events_and_loads_the_result():
    script = Script(
        {
            ("POST", "/v1/jobs"): httpx.Response(202, json=doc("queued")),
            ("GET", f"/v1/jobs/{JOB}"): httpx.Response(200, json=doc("queued")),
            ("GET", f"/v1/jobs/{JOB}/events"): progress_stream(),
            ("GET", f"/v1/jobs/{JOB}/result"): httpx.Response(200, content=score_file()),
        }
    )
    seen: list[Progress] = []
    scores = (
        client(script).model("demo").score(["a b", "c"], temperature=2.0, on_progress=seen.append)
    )
    assert isinstance(scores, ScoreResult) and scores.logits.shape == (1, 2, 6)
    body = json.loads(script.requests[0].content)
    assert body == {"kind": "score", "model": "demo", "texts": ["a b", "c"], "temperature": 2.0}
    assert seen == [Progress("none", 1, 2, 2.5), Progress("none", 2, 2, 1.5)]
    assert script.count("GET", f"/v1/jobs/{JOB}") == 1  # no polling while the stream works


def test_a_broken_stream_falls_back_to_polling():
    script = Script(
        {
            ("POST", "/v1/jobs"): httpx.Response(202, json=doc("queued")),
            ("GET", f"/v1/jobs/{JOB}"): [httpx.Response(200, json=doc("running"))] * 5
            + [httpx.Response(200, json=doc("succeeded"))],
            ("GET", f"/v1/jobs/{JOB}/events"): httpx.ReadError("proxy cut the stream"),
        }
    )
    job = client(script).submit("score", "demo", texts="x")
    assert job.wait(timeout=10) == "succeeded"
    assert script.count("GET", f"/v1/jobs/{JOB}/events") == 3
    assert script.count("GET", f"/v1/jobs/{JOB}") == 6


def test_wait_gives_up_at_its_timeout():
    script = Script(
        {
            ("GET", f"/v1/jobs/{JOB}"): httpx.Response(200, json=doc("running")),
            ("GET", f"/v1/jobs/{JOB}/events"): httpx.Response(500, text="boom"),
        }
    )
    job = client(script).job(JOB)
    with pytest.raises(WaitTimeout, match=r"still running after 0\.3 s"):
        job.wait(timeout=0.3)


@pytest.mark.parametrize(
    ("final", "error"),
    [
        (
            doc("failed", error={"type": "InvalidParameter", "message": "layers: 7 out of range"}),
            JobFailed,
        ),
        (doc("cancelled"), JobCancelled),
    ],
)
def test_unsuccessful_jobs_raise_with_the_jobs_error(final, error):
    script = Script({("GET", f"/v1/jobs/{JOB}"): httpx.Response(200, json=final)})
    with pytest.raises(error) as caught:
        client(script).job(JOB).result()
    assert caught.value.job_id == JOB
    if error is JobFailed:
        assert caught.value.error_type == "InvalidParameter"
        assert "layers: 7 out of range" in str(caught.value)


def test_arrays_jobs_and_results_become_json():
    script = Script(
        {
            ("POST", "/v1/jobs"): httpx.Response(202, json=doc("queued")),
            ("GET", f"/v1/jobs/{JOB}"): httpx.Response(200, json=doc("queued")),
        }
    )
    lens = client(script)
    chg_job = lens.job(JOB)
    lens.model("demo").submit(
        "ablate",
        texts=["a"],
        targets=["b"],
        head_mask=np.eye(2, dtype=np.float32),
        from_job=chg_job,
    )
    body = json.loads(script.requests[-1].content)
    assert body["head_mask"] == [[1.0, 0.0], [0.0, 1.0]] and body["from_job"] == JOB


def test_cancelling_an_ended_job_reports_its_status():
    script = Script(
        {
            ("DELETE", f"/v1/jobs/{JOB}"): httpx.Response(
                409, json={"detail": "already succeeded"}
            ),
            ("GET", f"/v1/jobs/{JOB}"): httpx.Response(200, json=doc("succeeded")),
        }
    )
    assert client(script).job(JOB).cancel() == "succeeded"


def test_async_client_has_the_same_behaviour():
    script = Script(
        {
            ("POST", "/v1/jobs"): httpx.Response(202, json=doc("queued")),
            ("GET", f"/v1/jobs/{JOB}"): httpx.Response(200, json=doc("queued")),
            ("GET", f"/v1/jobs/{JOB}/events"): progress_stream(),
            ("GET", f"/v1/jobs/{JOB}/result"): httpx.Response(200, content=score_file()),
            ("GET", "/v1/jobs/" + "b" * 32): httpx.Response(404, json={"detail": "not found"}),
        }
    )
    seen: list[Progress] = []

    async def main():
        async with AsyncLensClient(
            "http://lens.test",
            retry=FAST,
            progress=False,
            tensors="numpy",
            transport=httpx.MockTransport(script),
        ) as lens:
            scores = await lens.model("demo").score("a b", on_progress=seen.append)
            with pytest.raises(NotFound):
                await lens.job("b" * 32)
            return scores

    scores = asyncio.run(main())
    assert isinstance(scores, ScoreResult) and scores.final_token_logits().shape == (1, 6)
    assert [p.step for p in seen] == [1, 2]


RESULT = f"/v1/jobs/{JOB}/result"


def test_a_result_with_no_progress_to_show_is_one_held_request():
    """A score job reports no progress: after the submission, one result request that the
    server holds until the job ends; no event stream, no job document."""
    script = Script(
        {
            ("POST", "/v1/jobs"): httpx.Response(202, json=doc("queued")),
            ("GET", RESULT): httpx.Response(200, content=score_file()),
        }
    )
    scores = client(script, progress=True, timeout=20).model("demo").score("a b")
    assert isinstance(scores, ScoreResult) and scores.logits.shape == (1, 2, 6)
    assert [(r.method, r.url.path) for r in script.requests] == [
        ("POST", "/v1/jobs"),
        ("GET", RESULT),
    ]
    held = script.requests[1]
    assert held.url.params["wait"] == "300.000"
    assert held.extensions["timeout"]["read"] == 20 + 300  # the client's own, plus the hold


def test_a_held_result_of_a_job_that_failed_raises_its_error():
    script = Script(
        {
            ("GET", f"/v1/jobs/{JOB}"): [
                httpx.Response(200, json=doc("running")),
                httpx.Response(
                    200, json=doc("failed", error={"type": "OutOfMemory", "message": "too big"})
                ),
            ],
            ("GET", RESULT): httpx.Response(409, json={"detail": "job is failed"}),
        }
    )
    with pytest.raises(JobFailed, match="too big") as caught:
        client(script).job(JOB).result()
    assert caught.value.error_type == "OutOfMemory"


def test_held_results_ask_again_until_the_callers_timeout(tmp_path):
    """A 409 while the job still runs (the server's hold ran out) means ask again, for no
    longer than the caller's timeout in all."""
    script = Script(
        {
            ("GET", f"/v1/jobs/{JOB}"): httpx.Response(200, json=doc("running")),
            ("GET", RESULT): httpx.Response(409, json={"detail": "still running"}),
        }
    )
    job = client(script).job(JOB)
    with pytest.raises(WaitTimeout, match=r"still running after 0\.3 s"):
        job.download(tmp_path / "r.safetensors", timeout=0.3)
    holds = [float(r.url.params["wait"]) for r in script.requests if r.url.path == RESULT]
    assert len(holds) >= 2 and all(0 <= h <= 0.3 for h in holds)
    assert holds == sorted(holds, reverse=True)


def test_a_job_with_progress_to_show_is_followed_on_its_event_stream():
    script = Script(
        {
            ("POST", "/v1/jobs"): httpx.Response(202, json={**doc("queued"), "kind": "chg"}),
            ("GET", f"/v1/jobs/{JOB}"): httpx.Response(200, json={**doc("queued"), "kind": "chg"}),
            ("GET", f"/v1/jobs/{JOB}/events"): progress_stream(),
            ("GET", RESULT): httpx.Response(200, content=score_file()),
        }
    )
    job = client(script, progress=True).submit("chg", "demo", texts="x", targets="y")
    job.result()
    assert script.count("GET", f"/v1/jobs/{JOB}/events") == 1
    assert "wait" not in script.requests[-1].url.params


def test_the_async_client_holds_result_requests_too():
    script = Script(
        {
            ("POST", "/v1/jobs"): httpx.Response(202, json=doc("queued")),
            ("GET", RESULT): [
                httpx.Response(409, json={"detail": "still running"}),
                httpx.Response(200, content=score_file()),
            ],
            ("GET", f"/v1/jobs/{JOB}"): httpx.Response(200, json=doc("running")),
        }
    )

    async def main():
        async with AsyncLensClient(
            "http://lens.test", retry=FAST, tensors="numpy", transport=httpx.MockTransport(script)
        ) as lens:
            return await lens.model("demo").score("a b")

    assert isinstance(asyncio.run(main()), ScoreResult)
    assert [(r.method, r.url.path) for r in script.requests] == [
        ("POST", "/v1/jobs"),
        ("GET", RESULT),
        ("GET", f"/v1/jobs/{JOB}"),
        ("GET", RESULT),
    ]
    assert all("wait" in r.url.params for r in script.requests if r.url.path == RESULT)
