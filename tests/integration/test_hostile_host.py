"""What a hostile neighbour tries, against the real stack: real Redis, real workers, real HTTP.

Other Unix users on the host, web pages a local user opens, and anything on the network
are not trusted (docs/operations.md, threat model). One stack serves a working model
next to one that cannot load, without API keys (localhost mode).
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from pydantic import SecretStr
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Callback

from app import queue
from app.core.redis_server import PASSWORD_FILE
from app.stack import Stack, child_env
from tests.conftest import DEMO, JSONL, service_settings
from tests.waiting import poll_job, wait_until

BROKEN = "broken"
SCORE = {"kind": "score", "model": DEMO, "texts": ["red cat | red"]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp("hostile")
    settings = service_settings(
        data, {DEMO: demo_model_dir, BROKEN: data / "no-such-model"}, worker_threads=1
    )
    stack = Stack(settings)
    try:
        stack.start(workers=1)
        assert set(stack.wait_ready(timeout=180)) == {BROKEN}
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        yield client


def _run(http: httpx.Client, body: dict[str, object]) -> dict[str, object]:
    r = http.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return poll_job(http, r.json()["id"])


def test_a_model_that_cannot_load_is_reported_and_the_other_is_served(
    stack: Stack, http: httpx.Client
) -> None:
    models = {m["name"]: m for m in http.get("/v1/models").json()["models"]}
    assert models[DEMO]["status"] == "ready" and models[DEMO]["error"] is None
    broken = models[BROKEN]
    reason = f"cannot load it from {stack.settings.data_dir / 'no-such-model'}: FileNotFoundError"
    assert broken["status"] == "failed" and broken["error"].startswith(reason), broken
    refused = http.post("/v1/jobs", json={**SCORE, "model": BROKEN})
    assert refused.status_code == 503
    assert refused.json()["detail"].startswith(f"model {BROKEN!r} cannot be served: {reason}")
    assert _run(http, SCORE)["status"] == "succeeded"


def test_redis_lets_nobody_in_without_the_password(stack: Stack) -> None:
    assert stack.redis is not None
    stranger = redis.Redis(host="127.0.0.1", port=stack.redis.port, retry=Retry(NoBackoff(), 0))
    for attempt in (stranger.ping, lambda: stranger.keys("*"), lambda: stranger.set("x", 1)):
        with pytest.raises(redis.AuthenticationError):
            attempt()
    password = (stack.settings.data_dir / "redis" / PASSWORD_FILE).read_text().strip()
    assert redis.Redis(host="127.0.0.1", port=stack.redis.port, password=password).ping()


def test_a_worker_runs_nothing_but_lens_jobs(
    stack: Stack, http: httpx.Client, tmp_path: Path
) -> None:
    """Even with Redis' password, a foreign function name, or a callback, in a model's
    queue is refused and deleted, never imported."""
    conn = redis.Redis.from_url(stack.settings.redis_url)
    canary = tmp_path / "canary"
    rq_queue = queue.model_queue(conn, DEMO)
    foreign = rq_queue.enqueue_call("os.system", args=(f"touch {canary}",))
    hooked = rq_queue.enqueue_call(
        queue.RUN_JOB, args=("0" * 32,), on_success=Callback("os.system")
    )
    log = stack.settings.data_dir / "logs" / "worker-0.log"
    for job, why in ((foreign, "function 'os.system' is not"), (hooked, "names callbacks")):
        line = f"refused RQ job {job.id} from queue {rq_queue.name} (deleted): "
        wait_until(lambda line=line: line in log.read_text(), 30, f"refusal of {job.id}")
        assert why in log.read_text().split(line, 1)[1].splitlines()[0]
        assert not conn.exists(job.key)
    assert _run(http, SCORE)["status"] == "succeeded"  # the worker goes on
    assert not canary.exists()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_data_files_are_the_services_alone(stack: Stack, http: httpx.Client) -> None:
    data = stack.settings.data_dir
    r = http.post("/v1/datasets", content='{"prompt": "a", "target": " b"}', headers=JSONL)
    assert r.status_code == 201, r.text
    done = _run(http, SCORE)
    files = [
        data / "redis" / PASSWORD_FILE,
        data / "datasets" / f"{r.json()['id']}.json",
        stack.settings.blob_dir / done["id"][:2] / f"{done['id']}.safetensors",
        *(data / "logs").glob("*.log"),
        *(p for p in (data / "redis").rglob("*") if p.is_file()),
    ]
    assert any("appendonly" in p.name for p in files)
    assert {p.name: _mode(p) for p in files} == {p.name: 0o600 for p in files}
    assert _mode(data) == 0o700 and _mode(data / "redis") == 0o700


def test_workers_get_no_api_keys(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LENS_API_KEYS", "from-the-shell")
    monkeypatch.setenv("LENS_API_KEYS_FILE", "/keys.txt")
    settings = stack.settings.model_copy(update={"api_keys": [SecretStr("k1")]})
    assert not {"LENS_API_KEYS", "LENS_API_KEYS_FILE"} & set(child_env(settings, keys=False))
    assert child_env(settings)["LENS_API_KEYS"] == "k1"
    worker = stack.workers["worker-0"].pid
    environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    assert not [v for v in environ if v.startswith(b"LENS_API_KEYS")]


@pytest.mark.parametrize(
    ("headers", "content", "code"),
    [
        ({"Host": "evil.example"}, json.dumps(SCORE), 400),  # DNS rebinding
        ({"Origin": "http://evil.example"}, json.dumps(SCORE), 403),
        ({"Content-Type": "text/plain"}, json.dumps(SCORE), 415),  # a cross-site form
        ({"Content-Type": "application/x-www-form-urlencoded"}, "kind=score", 415),
        ({"Content-Type": "multipart/form-data; boundary=x"}, "--x--", 415),
    ],
)
def test_localhost_mode_refuses_other_sites(
    http: httpx.Client, headers: dict[str, str], content: str, code: int
) -> None:
    before = len(http.get("/v1/jobs").json()["jobs"])
    sent = {"Content-Type": "application/json", **headers}
    r = http.post("/v1/jobs", content=content, headers=sent)
    assert r.status_code == code, r.text
    assert len(http.get("/v1/jobs").json()["jobs"]) == before
    assert http.get("/v1/models", headers={"Host": "rebound.example:8000"}).status_code == 400
    assert http.get("/v1/models", headers={"Host": "[::1]:8000"}).status_code == 200
    upload = http.post(
        "/v1/datasets?format=jsonl", content="{}", headers={"Content-Type": "text/plain"}
    )
    assert upload.status_code == 415


def test_security_headers(http: httpx.Client) -> None:
    page = http.get("/")
    csp = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    for r in (page, http.get("/v1/models"), http.get("/docs"), http.post("/v1/jobs", json={})):
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]


def test_docs_need_no_internet(http: httpx.Client) -> None:
    page = http.get("/docs").text
    assets = [a for a in ("swagger-ui-bundle.js", "swagger-ui.css") if a in page]
    assert len(assets) == 2 and "cdn" not in page.lower()
    for asset in assets:
        r = http.get(f"/static-offline-docs/{asset}")
        assert r.status_code == 200 and len(r.content) > 10_000
