"""Tenancy in the API itself (in-process app, real Redis, no worker): keys, owners, 404s."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import typer
from fastapi.testclient import TestClient
from rq.serializers import JSONSerializer

from app import queue
from app.api.deps import owner_of_key
from app.blobstore import BlobStore
from app.cli.main import _check_exposure, load_settings
from app.core.config import Settings
from app.core.redis_server import RedisServer
from tests.conftest import api_client

ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-fedcba9876543210"
SCORE = {"kind": "score", "model": "m", "texts": ["one two"]}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def client(
    redis_server: RedisServer, redis_conn: redis.Redis, tmp_path: Path
) -> Iterator[TestClient]:
    with api_client(redis_server, tmp_path, [ALICE, BOB]) as c:
        yield c


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/" + "0" * 32),
        ("GET", "/v1/models"),
        ("POST", "/v1/datasets?format=jsonl"),
    ],
)
def test_v1_needs_a_valid_key(client: TestClient, method: str, path: str) -> None:
    for headers in ({}, auth("wrong"), auth(ALICE + "x"), {"Authorization": f"Basic {ALICE}"}):
        r = client.request(method, path, headers=headers, json=SCORE)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        assert ALICE not in r.text


def test_health_and_metrics_need_no_key(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_jobs_are_visible_only_to_their_submitter(client: TestClient) -> None:
    r = client.post("/v1/jobs", json=SCORE, headers=auth(ALICE))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    for path in ("", "/result", "/events"):
        r = client.get(f"/v1/jobs/{job_id}{path}", headers=auth(BOB))
        assert r.status_code == 404 and "not found" in r.json()["detail"]
    assert client.delete(f"/v1/jobs/{job_id}", headers=auth(BOB)).status_code == 404
    assert client.get("/v1/jobs", headers=auth(BOB)).json()["jobs"] == []
    assert [j["id"] for j in client.get("/v1/jobs", headers=auth(ALICE)).json()["jobs"]] == [job_id]
    assert client.get(f"/v1/jobs/{job_id}", headers=auth(ALICE)).json()["status"] == "queued"
    assert client.get(f"/v1/jobs/{job_id}/result", headers=auth(ALICE)).status_code == 409
    r = client.delete(f"/v1/jobs/{job_id}", headers=auth(ALICE))
    assert r.status_code == 202 and r.json()["status"] == "cancelled"


def test_others_data_sets_and_source_jobs_are_404(client: TestClient) -> None:
    rows = json.dumps({"prompt": "one two |", "target": " one"})
    r = client.post("/v1/datasets?format=jsonl", content=rows, headers=auth(ALICE))
    assert r.status_code == 201, r.text
    dataset = r.json()["id"]
    chg = {"kind": "chg", "model": "m", "dataset": dataset, "num_updates": 1}
    r = client.post("/v1/jobs", json=chg, headers=auth(BOB))
    assert r.status_code == 404 and dataset in r.json()["detail"]
    assert client.post("/v1/jobs", json=chg, headers=auth(ALICE)).status_code == 202
    alices = client.post("/v1/jobs", json=SCORE, headers=auth(ALICE)).json()["id"]
    ablate = {
        "kind": "ablate",
        "model": "m",
        "texts": ["a"],
        "targets": ["b"],
        "from_job": alices,
        "keep": "facilitating",
    }
    r = client.post("/v1/jobs", json=ablate, headers=auth(BOB))
    assert r.status_code == 404 and "from_job" in r.json()["detail"]


def test_redis_holds_owner_ids_never_keys(client: TestClient, redis_conn: redis.Redis) -> None:
    job_id = client.post("/v1/jobs", json=SCORE, headers=auth(ALICE)).json()["id"]
    owner = owner_of_key(ALICE)
    assert owner != ALICE and ALICE not in owner
    assert redis_conn.hget(f"lens:job:{job_id}", "owner") == owner.encode()
    dump = everything(redis_conn)
    assert owner.encode() in dump
    assert ALICE.encode() not in dump and BOB.encode() not in dump


def everything(conn: redis.Redis) -> bytes:
    """Every key and value in the database, concatenated (RQ's payloads are compressed, so
    this also checks that none holds a key in clear)."""
    parts: list[bytes] = []
    for key in conn.keys("*"):
        kind = conn.type(key)
        parts.append(key)
        if kind == b"hash":
            parts += [b for pair in conn.hgetall(key).items() for b in pair]
        elif kind == b"string":
            parts.append(conn.get(key) or b"")
        elif kind == b"list":
            parts += conn.lrange(key, 0, -1)
        elif kind == b"set":
            parts += conn.smembers(key)
        elif kind == b"zset":
            parts += conn.zrange(key, 0, -1)
    return b"\n".join(parts)


def test_keys_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# lab keys\n{ALICE}\n\n  {BOB}  \n")
    monkeypatch.delenv("LENS_API_KEYS", raising=False)
    monkeypatch.delenv("LENS_CONFIG", raising=False)
    assert load_settings(api_keys=keys).key_values() == [ALICE, BOB]
    monkeypatch.setenv("LENS_API_KEYS", "k1, k2")
    monkeypatch.setenv("LENS_API_KEYS_FILE", str(keys))
    assert Settings().key_values() == ["k1", "k2", ALICE, BOB]
    assert ALICE not in repr(Settings())


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_without_keys_localhost_is_allowed(host: str) -> None:
    _check_exposure(Settings(host=host), allow_unauthenticated=False)


def test_without_keys_other_interfaces_are_refused() -> None:
    with pytest.raises(typer.BadParameter, match="localhost only"):
        _check_exposure(Settings(host="0.0.0.0"), allow_unauthenticated=False)
    _check_exposure(Settings(host="0.0.0.0"), allow_unauthenticated=True)
    _check_exposure(Settings(host="0.0.0.0", api_keys=[ALICE]), allow_unauthenticated=False)


def test_job_ids_are_unguessable_and_paths_never_come_from_input(client: TestClient) -> None:
    ids = {client.post("/v1/jobs", json=SCORE, headers=auth(ALICE)).json()["id"] for _ in range(20)}
    assert len(ids) == 20 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    for probe in ("..%2F..%2Fetc%2Fpasswd", "%2e%2e", "0" * 31 + "g", "0" * 33):
        assert client.get(f"/v1/jobs/{probe}/result", headers=auth(ALICE)).status_code == 404
    with pytest.raises(ValueError, match="not a job id"):
        BlobStore(Path("/srv")).path("../../etc/passwd")


def test_nothing_is_ever_unpickled() -> None:
    """Queues speak JSON, results are safetensors, weights load as safetensors only."""
    root = Path(__file__).resolve().parents[3]
    sources = [*root.glob("app/**/*.py"), *root.glob("workers/**/*.py")]
    banned = ("import pickle", "from pickle", "cloudpickle", "import dill", "torch.load(")
    offenders = [
        f"{path.relative_to(root)}: {word}"
        for path in sources
        for word in banned
        if word in path.read_text()
    ]
    assert offenders == []
    assert queue.model_queue(redis.Redis(), "m").serializer is JSONSerializer
    assert "use_safetensors=True" in (root / "workers" / "lens" / "loading.py").read_text()
