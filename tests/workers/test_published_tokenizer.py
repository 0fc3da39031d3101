"""The tokenizer a worker publishes counts, in the API (``tokenizers`` alone, no torch),
exactly what the worker counts, for every family's tokenizer class and the demo's
word-level one: inline texts and a data set's rows, ASCII or not, odd whitespace, long."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from pydantic import TypeAdapter
from transformers import (
    AutoTokenizer,
    ByT5Tokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from app import keys, tokens
from app.core import jobsize
from app.core.config import Limits
from app.schemas import JobRequest
from workers.lens.demo import ensure_demo_model
from workers.lens.testing import BOS, EOS, FAMILIES, build_tokenizer, tiny_config
from workers.limits import check_tokens
from workers.process import publish_tokenizer

TEXTS = [
    "The capital of France is Paris.",
    "漢字かなカナ한국어, café, naïve — 🙂",
    "  two spaces\tand a tab, then\n\na blank line  ",
    "red cat blue dog | red cat " * 300,
    " ",
]
DATASET = "0123456789abcdef" * 2
"""A well-formed data set id (the store reads no other)."""
ROWS = [{"prompt": t, "target": " Paris"} for t in TEXTS[:3]] + [{"prompt": "a", "target": "é"}]


def _tokenizer(source: str, tmp_path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer a worker loads for ``source`` (a family, or ``demo``), as
    ``workers.lens.loading`` loads it (the family's config picks its class)."""
    if source == "demo":
        path = ensure_demo_model()
    else:
        path = tmp_path / source
        tiny_config(source).save_pretrained(path)
        build_tokenizer().save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


@pytest.mark.parametrize("source", [*FAMILIES, "demo"])
def test_the_api_counts_what_the_worker_counts(
    redis_conn: redis.Redis, tmp_path: Path, source: str
) -> None:
    tokenizer = _tokenizer(source, tmp_path)
    sha256 = publish_tokenizer(redis_conn, tokenizer)
    assert sha256 is not None and redis_conn.exists(keys.tokenizer_key(sha256))
    (tmp_path / f"{DATASET}.json").write_text(json.dumps(ROWS))
    job = TypeAdapter(JobRequest).validate_python(
        {"kind": "chg", "model": "m", "texts": TEXTS, "targets": ["x"] * len(TEXTS)}
    )
    from_data = TypeAdapter(JobRequest).validate_python(
        {"kind": "chg", "model": "m", "dataset": DATASET}
    )
    encode = tokens.published_encoder(redis_conn, sha256)
    assert encode is not None
    for j in (job, from_data):
        worker = check_tokens(j, tokenizer, Limits(), tmp_path)
        assert jobsize.count_tokens(j, encode, Limits(), tmp_path) == worker
        assert set(worker) == (
            {"texts", "targets"} if j is job else {"dataset.prompt", "dataset.target"}
        )


def test_the_same_tokenizer_is_published_once_under_one_hash(
    redis_conn: redis.Redis, tmp_path: Path
) -> None:
    first = publish_tokenizer(redis_conn, _tokenizer("llama", tmp_path))
    again = publish_tokenizer(redis_conn, _tokenizer("gpt2", tmp_path))
    assert first == again
    assert redis_conn.keys(keys.tokenizer_key("*")) == [keys.tokenizer_key(first or "").encode()]


def test_a_tokenizer_the_api_would_count_otherwise_is_not_published(
    redis_conn: redis.Redis,
) -> None:
    """A slow one (Python only), and a fast one whose Python side changes the counts
    (``split_special_tokens`` is applied by transformers, and not serialised)."""
    slow = ByT5Tokenizer()
    assert not slow.is_fast
    backend = build_tokenizer().backend_tokenizer
    splits = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, split_special_tokens=True
    )
    assert publish_tokenizer(redis_conn, slow) is None
    assert publish_tokenizer(redis_conn, splits) is None
    assert redis_conn.keys(keys.tokenizer_key("*")) == []
