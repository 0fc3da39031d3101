"""Operator limits the API enforces at submission, each named in its 4xx (real Redis)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from app.core.config import Limits, Settings
from app.core.redis_server import RedisServer
from tests.conftest import api_client

LIMITS = Limits(
    max_texts=3,
    max_text_chars=40,
    max_masks=4,
    max_mask_batch=8,
    max_updates=20,
    max_request_bytes=2048,
    max_dataset_bytes=4096,
    max_active_jobs_per_key=2,
)
KEYS = ["key-a-0123456789", "key-b-0123456789"]


def auth(i: int) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[i]}"}


@pytest.fixture
def client(
    redis_server: RedisServer, redis_conn: redis.Redis, tmp_path: Path
) -> Iterator[TestClient]:
    with api_client(redis_server, tmp_path, KEYS, headers=auth(0), limits=LIMITS) as c:
        yield c


def chg(**params: Any) -> dict[str, Any]:
    return {
        "kind": "chg",
        "model": "m",
        "texts": ["a b"],
        "targets": [" c"],
        "num_masks": 1,
        "batch_size": 1,
        "num_updates": 1,
        "num_reg_updates": 1,
        **params,
    }


def detail(r: Any) -> str:
    return json.dumps(r.json()["detail"], ensure_ascii=False)


@pytest.mark.parametrize(
    ("body", "code", "names"),
    [
        ({"kind": "score", "texts": ["a"] * 4}, 413, ["texts", "max_texts = 3"]),
        ({"kind": "score", "texts": "a" * 41}, 413, ["texts", "max_text_chars = 40"]),
        (chg(texts=["a"] * 4, targets=["b"] * 4), 413, ["max_texts"]),
        (chg(num_masks=5), 422, ["num_masks", "max_masks = 4"]),
        (chg(num_masks=3, batch_size=3), 422, ["batch_size", "3 × 3 = 9", "max_mask_batch = 8"]),
        (chg(num_updates=15, num_reg_updates=6), 422, ["num_updates", "max_updates = 20"]),
        (
            chg(texts=None, targets=None, pattern="aba", num_samples=4),
            422,
            ["num_samples", "max_texts"],
        ),
        (
            {
                "kind": "cchg",
                "retain_texts": ["a"],
                "retain_targets": ["b"],
                "forget_texts": ["c"],
                "forget_targets": ["d"],
                "num_masks": 2,
                "batch_size": 5,
            },
            422,
            ["max_mask_batch"],
        ),
        (
            {
                "kind": "attribute",
                "document": "x" * 41,
                "sentences": ["x"],
                "summary": "y",
                "facilitating_mask": [[1.0]],
            },
            413,
            ["document", "max_text_chars"],
        ),
    ],
)
def test_limits_are_named_in_the_error(
    client: TestClient, body: dict[str, Any], code: int, names: list[str]
) -> None:
    r = client.post("/v1/jobs", json={"model": "m", **body})
    assert r.status_code == code, r.text
    for name in names:
        assert name in detail(r)


def test_within_the_limits_is_accepted(client: TestClient) -> None:
    r = client.post("/v1/jobs", json=chg(num_masks=4, batch_size=2, num_updates=10))
    assert r.status_code == 202, r.text


def test_request_body_size_declared_or_streamed(client: TestClient) -> None:
    big = json.dumps({"kind": "score", "model": "m", "texts": ["a"], "pad": "x" * 3000})
    r = client.post("/v1/jobs", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_request_bytes = 2048" in detail(r)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 500):
            yield big[i : i + 500].encode()

    r = client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_request_bytes" in detail(r)


def test_data_set_size_and_rows(client: TestClient) -> None:
    row = json.dumps({"prompt": "a b", "target": " c"})
    r = client.post("/v1/datasets?format=jsonl", content="\n".join([row] * 200))
    assert r.status_code == 413 and "max_dataset_bytes = 4096" in detail(r)
    r = client.post("/v1/datasets?format=jsonl", content="\n".join([row] * 4))
    assert r.status_code == 413 and "4 rows" in detail(r) and "max_texts = 3" in detail(r)
    long = json.dumps({"prompt": "a" * 41, "target": " c"})
    r = client.post("/v1/datasets?format=jsonl", content=long)
    assert r.status_code == 413 and "41 characters" in detail(r)
    assert "max_text_chars = 40" in detail(r)
    r = client.post("/v1/datasets?format=jsonl", content="\n".join([row] * 3))
    assert r.status_code == 201, r.text
    r = client.post("/v1/jobs", json=chg(texts=None, targets=None, dataset=r.json()["id"]))
    assert r.status_code == 202, r.text


def test_per_key_quota_is_429_with_retry_after(client: TestClient) -> None:
    score = {"kind": "score", "model": "m", "texts": "a"}
    first = client.post("/v1/jobs", json=score).json()["id"]
    assert client.post("/v1/jobs", json=score).status_code == 202
    r = client.post("/v1/jobs", json=score)
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) > 0
    assert "max_active_jobs_per_key is 2" in detail(r)
    assert client.post("/v1/jobs", json=score, headers=auth(1)).status_code == 202
    assert client.delete(f"/v1/jobs/{first}").status_code == 202
    assert client.post("/v1/jobs", json=score).status_code == 202


def test_a_config_file_sets_models_and_limits_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "lens.toml"
    config.write_text(
        "heartbeat_s = 2.0\n"
        '[models.big]\nsource = "/m/big"\ndevice = "cuda:1"\ndtype = "bfloat16"\n'
        'max_batch_tokens = 4096\nworkers = ["gpu1"]\n'
        '[models.small]\nsource = "/m/small"\ntrust_remote_code = true\n'
        "[limits]\nmax_texts = 10\nmax_result_bytes = 1000\n"
    )
    for name in [k for k in os.environ if k.startswith("LENS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LENS_CONFIG", str(config))
    monkeypatch.setenv("LENS_HEARTBEAT_S", "3")
    settings = Settings()
    big = settings.models["big"]
    assert (big.device, big.dtype, big.max_batch_tokens) == ("cuda:1", "bfloat16", 4096)
    assert not big.trust_remote_code and settings.models["small"].trust_remote_code
    assert settings.models_of("gpu1") == ["big", "small"] and settings.models_of("gpu0") == [
        "small"
    ]
    assert (settings.limits.max_texts, settings.limits.max_result_bytes) == (10, 1000)
    assert settings.heartbeat_s == 3.0
    env = settings.environment()
    assert json.loads(env["LENS_MODELS"])["big"]["workers"] == ["gpu1"]
    monkeypatch.delenv("LENS_CONFIG")
    monkeypatch.delenv("LENS_HEARTBEAT_S")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings() == settings, "what a child process rebuilds from the environment"
