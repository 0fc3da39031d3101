"""Token counts at submission (in-process API, real Redis, no worker): with the tokenizer a
worker published for the model, the API counts each text's tokens as the worker will,
refuses a job over a token limit (413, by name) and stores an exact estimate of the
result; without one it guesses, as before."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import redis
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from app import keys, presence, tokens
from app.core.config import Limits
from app.core.redis_server import RedisServer
from tests.conftest import JSONL, api_client

WORDS = ["<s>", "<unk>", "red", "cat", "blue", "dog"]
SHAPE = {"name": "m", "source": "/nowhere", "layers": 2, "heads": 4, "head_dim": 8}
SHAPE |= {"hidden_size": 32, "intermediate_size": 64, "vocab_size": 50}
CJK = "漢字かな カナ 한국어 café naïve"
"""Five words (six tokens with <s>), 42 bytes: the guess (one token per 4 bytes) is 12."""


def word_tokenizer() -> Tokenizer:
    """Words split on whitespace, unknown ones <unk>, and <s> first: as the demo's."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok


def publish(conn: redis.Redis, tokenizer: Tokenizer | None = None) -> None:
    """The model's info as a worker publishes it, with its tokenizer if given."""
    info: dict[str, Any] = dict(SHAPE)
    if tokenizer is not None:
        sha256, blob = tokens.pack(tokenizer.to_str())
        presence.publish_tokenizer(conn, sha256, blob)
        info["tokenizer_sha256"] = sha256
    presence.publish_model_info(conn, "m", info)


def test_the_estimate_is_exact_with_the_published_tokenizer(
    redis_server: RedisServer, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    job = {"kind": "score", "model": "m", "texts": ["red cat", CJK]}
    publish(redis_conn)
    with api_client(redis_server, tmp_path, keys=[]) as client:
        guessed = client.post("/v1/jobs", json=job).json()["estimate"]
        publish(redis_conn, word_tokenizer())
        counted = client.post("/v1/jobs", json=job).json()
        stored = client.get(f"/v1/jobs/{counted['id']}").json()["estimate"]
    # 2 texts padded to 6 tokens, vocabulary 50: logits 2 × 6 × 50 × 4 bytes, final-token
    # logits 2 × 50 × 4, input ids and attention mask 2 × 6 × 8 each
    assert counted["estimate"]["result_bytes"] == 2400 + 400 + 96 + 96
    assert counted["estimate"]["tokens"] == "counted"
    assert stored == counted["estimate"]
    assert guessed["tokens"] == "guessed" and guessed["result_bytes"] != 2992


def test_token_limits_are_refused_at_submission_by_name(
    redis_server: RedisServer, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    publish(redis_conn, word_tokenizer())
    long = "red cat " * 4 + "dog"  # 9 words, 10 tokens
    seven = "red cat blue dog red cat"
    limits = Limits(max_tokens_per_text=8, max_tokens_per_job=20)
    with api_client(redis_server, tmp_path, keys=[], limits=limits) as client:
        rows = "\n".join(json.dumps({"prompt": p, "target": " dog"}) for p in ("red", long))
        dataset = client.post("/v1/datasets", content=rows, headers=JSONL).json()["id"]
        refused = {
            "texts: a text of 10 tokens exceeds the limit max_tokens_per_text = 8": {
                "kind": "score", "texts": ["red", long],
            },
            "texts: 21 tokens in all exceed the limit max_tokens_per_job = 20": {
                "kind": "score", "texts": [seven] * 3,
            },
            "dataset.prompt: a text of 10 tokens exceeds the limit max_tokens_per_text": {
                "kind": "chg", "dataset": dataset,
            },
            "gradients.target: a text of 10 tokens exceeds": {
                "kind": "trace", "texts": "red", "gradients": {"target": long},
            },
        }  # fmt: skip
        for message, body in refused.items():
            r = client.post("/v1/jobs", json={"model": "m", **body})
            assert r.status_code == 413, r.text
            assert r.json()["detail"].startswith(message), r.text
        fits = client.post("/v1/jobs", json={"model": "m", "kind": "score", "texts": [seven] * 2})
        assert fits.status_code == 202, fits.text
        assert client.get("/v1/jobs").json()["jobs"] == [fits.json() | {"params": {}}]


def test_an_unreadable_or_missing_tokenizer_leaves_the_guess(
    redis_server: RedisServer, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """A tokenizer a newer ``tokenizers`` wrote, say: the API guesses, as without one."""
    presence.publish_tokenizer(redis_conn, "0" * 64, b"not a tokenizer")
    job = {"kind": "score", "model": "m", "texts": CJK}
    with api_client(redis_server, tmp_path, keys=[]) as client:
        for sha256 in ("0" * 64, "1" * 64):
            presence.publish_model_info(redis_conn, "m", SHAPE | {"tokenizer_sha256": sha256})
            r = client.post("/v1/jobs", json=job)
            assert r.status_code == 202, r.text
            assert r.json()["estimate"]["tokens"] == "guessed"


def test_the_cache_keeps_the_most_recently_used(redis_conn: redis.Redis) -> None:
    cache = tokens.TokenizerCache(size=1)
    first, second = word_tokenizer(), word_tokenizer()
    second.add_tokens(["fox"])
    hashes = []
    for tokenizer in (first, second):
        sha256, blob = tokens.pack(tokenizer.to_str())
        presence.publish_tokenizer(redis_conn, sha256, blob)
        assert cache.get(redis_conn, sha256) is not None
        hashes.append(sha256)
    redis_conn.delete(*(keys.tokenizer_key(h) for h in hashes))
    assert cache.get(redis_conn, hashes[1]) is not None  # kept
    assert cache.get(redis_conn, hashes[0]) is None  # dropped, and gone from Redis
