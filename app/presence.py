"""The workers' presence in Redis: their heartbeats, the models they serve and the
tokenizers they publish for the API's token counts."""

from __future__ import annotations

import json
from typing import Any, cast

import redis

from app.keys import MODELS, WORKERS, tokenizer_key, worker_key

WORKERS_FORGET_MS = 24 * 3600 * 1000
"""A worker silent this long leaves the index (a dead one is already told by its key)."""


# KEYS[1] = the worker's key, KEYS[2] = the index; ARGV[1] = name, ARGV[2] = info,
# ARGV[3] = TTL (ms), ARGV[4] = how long a silent worker stays indexed (ms).
_BEAT = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], ms + tonumber(ARGV[3]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ms - tonumber(ARGV[4]))
return 1
"""


def heartbeat(connection: redis.Redis, worker: str, info: dict[str, Any], ttl_s: float) -> None:
    """Refresh a worker's presence; it vanishes ``ttl_s`` after the last beat."""
    args: list[str | int] = [worker, json.dumps(info), int(ttl_s * 1000), WORKERS_FORGET_MS]
    connection.register_script(_BEAT)(keys=[worker_key(worker), WORKERS], args=args)


def remove_worker(connection: redis.Redis, worker: str) -> None:
    pipe = connection.pipeline(transaction=False)
    pipe.delete(worker_key(worker))
    pipe.zrem(WORKERS, worker)
    pipe.execute()


def live_workers(connection: redis.Redis) -> dict[str, dict[str, Any]]:
    """Workers whose heartbeat has not expired, with what they reported: the index's
    names, then their keys (one round trip each, whatever the keyspace holds)."""
    names = [n.decode() for n in cast("list[bytes]", connection.zrange(WORKERS, 0, -1))]
    if not names:
        return {}
    values = cast("list[bytes | None]", connection.mget([worker_key(n) for n in names]))
    return {n: json.loads(v) for n, v in zip(names, values, strict=True) if v is not None}


def publish_model_info(connection: redis.Redis, name: str, info: dict[str, Any]) -> None:
    connection.hset(MODELS, name, json.dumps(info))


def model_infos(connection: redis.Redis) -> dict[str, dict[str, Any]]:
    infos = cast("dict[bytes, bytes]", connection.hgetall(MODELS))
    return {k.decode(): json.loads(v) for k, v in infos.items()}


def publish_tokenizer(connection: redis.Redis, sha256: str, blob: bytes) -> None:
    """Store a tokenizer (``app.tokens.pack``) once: megabytes for a large vocabulary, so
    not again when a worker loads the model again, or another worker loads it."""
    if not connection.exists(tokenizer_key(sha256)):
        connection.set(tokenizer_key(sha256), blob)


def published_tokenizer(connection: redis.Redis, sha256: str) -> bytes | None:
    return cast("bytes | None", connection.get(tokenizer_key(sha256)))
