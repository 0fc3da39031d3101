"""What the API refuses before anything is queued (in-process app, real Redis): values
JSON cannot carry, and parameters checked against the model's published shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
import redis.asyncio.connection
import redis.connection

from app import presence, tokens
from app.core.redis_server import RedisServer
from tests.app.test_tokens import word_tokenizer
from tests.conftest import api_client


def _post(client, text: str):
    return client.post("/v1/jobs", content=text, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"kind": "chg", "model": "m", "texts": ["a"], "targets": ["b"], "lr": NaN}', "lr"),
        ('{"kind": "chg", "model": "m", "texts": ["a"], "targets": ["b"], "lr": Infinity}', "lr"),
        ('{"kind": "score", "model": "m", "texts": "a", "temperature": -Infinity}', "temperature"),
        ('{"kind": "score", "model": "m", "texts": "a", "temperature": Infinity}', "temperature"),
    ],
)
def test_nan_and_infinity_are_422s_naming_the_field(
    redis_server: RedisServer, redis_conn: redis.Redis, tmp_path: Path, body: str, field: str
) -> None:
    """Python's JSON parser takes them; the answer echoing them once failed to render (500)."""
    with api_client(redis_server, tmp_path, keys=[]) as client:
        r = _post(client, body)
    assert r.status_code == 422, r.text
    [error] = r.json()["detail"]
    assert error["loc"][-1] == field
    assert error["input"] in ("nan", "inf", "-inf")


def test_parameters_are_checked_against_the_models_shape(
    redis_server: RedisServer, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    shape = {"name": "m", "source": "/nowhere", "layers": 2, "heads": 4, "vocab_size": 87}
    presence.publish_model_info(redis_conn, "m", shape)
    with api_client(redis_server, tmp_path, keys=[]) as client:
        too_many = _post(client, '{"kind": "score", "model": "m", "texts": "a", "top_k": 88}')
        all_of_them = _post(client, '{"kind": "score", "model": "m", "texts": "a", "top_k": 87}')
        layer = _post(client, '{"kind": "trace", "model": "m", "texts": "a", "layers": [2]}')
        target = _post(
            client,
            '{"kind": "trace", "model": "m", "texts": "a", "gradients": {"target_ids": [3, 87]}}',
        )
    assert too_many.status_code == 422 and "top_k" in too_many.text and "87" in too_many.text
    assert all_of_them.status_code == 202
    assert layer.status_code == 422 and "layers" in layer.text
    assert target.status_code == 422 and "[87] are not token ids" in target.text
    assert target.json()["detail"][0]["loc"] == ["body", "gradients", "target_ids"]


def test_a_submission_reads_and_queues_in_two_round_trips(
    redis_server: RedisServer,
    redis_conn: redis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Counting it in flight, the model's shape and the quota in one round trip (asyncio);
    the record and the queue in a second (in the thread pool). A job waits on each one
    before it can start. A refused submission's count goes down again. The model's
    tokenizer is read once, by the first submission."""
    sha256, blob = tokens.pack(word_tokenizer().to_str())
    presence.publish_tokenizer(redis_conn, sha256, blob)
    info = {"name": "m", "source": "/nowhere", "vocab_size": 87, "tokenizer_sha256": sha256}
    presence.publish_model_info(redis_conn, "m", info)
    sent: list[str] = []
    for connection in (redis.connection.Connection, redis.asyncio.connection.Connection):
        original = connection.send_packed_command

        def counting(self, command, *args, _original=original, _name=connection.__module__, **kw):
            sent.append(_name.split(".")[1])
            return _original(self, command, *args, **kw)

        monkeypatch.setattr(connection, "send_packed_command", counting)
    with api_client(redis_server, tmp_path, keys=[]) as client:
        job = '{"kind": "score", "model": "m", "texts": "a", "top_k": 87}'
        _post(client, job)  # the first opens its connections and RQ reads Redis's version
        sent.clear()
        accepted = _post(client, job)
        refused = _post(client, '{"kind": "score", "model": "m", "texts": "a", "top_k": 88}')
        assert accepted.status_code == 202 and refused.status_code == 422
    assert sent == ["asyncio", "connection", "asyncio", "asyncio"], sent
