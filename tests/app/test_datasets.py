"""The data set store: parsing uploads (JSONL, TSV) with errors that name the line, and
the files and Redis records the API, the workers and the sweeper share."""

from __future__ import annotations

import json

import pytest
import redis

from app import datasets, keys
from app.datasets import DatasetError, DatasetSize, DatasetStore, Quota, parse_dataset


def _jsonl(*rows: object) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()


def test_jsonl_rows() -> None:
    content = _jsonl({"prompt": "a\nb", "target": " c", "id": 7}, "", {"text": "d", "target": " e"})
    assert parse_dataset(content, "train.jsonl") == [
        {"prompt": "a\nb", "target": " c"},
        {"prompt": "d", "target": " e"},
    ]
    assert parse_dataset(b"\xef\xbb\xbf" + content, "ndjson")[0]["prompt"] == "a\nb"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (_jsonl({"prompt": "a", "target": "b"}, "{oops"), "line 2: invalid JSON"),
        (_jsonl({"prompt": "a"}), "line 1: needs 'prompt'"),
        (_jsonl({"prompt": "a", "target": ""}), "line 1: empty target"),
        (_jsonl({"prompt": 3, "target": "b"}), "line 1: prompt and target must be strings"),
        (_jsonl([1, 2]), "line 1: expected a JSON object"),
        (b"\n\n", "holds no rows"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_jsonl_errors_name_the_line(content: bytes, message: str) -> None:
    with pytest.raises(DatasetError) as err:
        parse_dataset(content, "jsonl")
    assert err.value.field == "dataset"
    assert message in err.value.message


def test_tsv_with_header_and_escapes() -> None:
    content = b"id\ttarget\tprompt\n1\t cat\tred\\ncat | red\n2\t back\\\\slash\ttab\\there\n"
    assert parse_dataset(content, "data.TSV") == [
        {"prompt": "red\ncat | red", "target": " cat"},
        {"prompt": "tab\there", "target": " back\\slash"},
    ]


def test_tsv_two_columns_without_header() -> None:
    assert parse_dataset(b"red cat\t dog\nblue\t fox\n", "tab") == [
        {"prompt": "red cat", "target": " dog"},
        {"prompt": "blue", "target": " fox"},
    ]


def test_tsv_errors_name_the_line() -> None:
    with pytest.raises(DatasetError, match="line 3: expected 2 tab-separated columns, got 3"):
        parse_dataset(b"prompt\ttarget\na\tb\na\tb\tc\n", "tsv")
    with pytest.raises(DatasetError, match="line 2: empty target"):
        parse_dataset(b"a\tb\nc\t\n", "tsv")
    with pytest.raises(DatasetError) as err:
        parse_dataset(b"a\tb\n", "data.csv")
    assert err.value.field == "format"


ROWS = [{"prompt": "red cat | red", "target": " cat"}, {"prompt": "a\nb", "target": " éé"}]


def test_store_writes_reads_and_refuses_foreign_ids(tmp_path) -> None:
    store = DatasetStore(tmp_path / "datasets")
    dataset_id = "ab" * 16
    assert store.rows(dataset_id) is None
    assert store.write(dataset_id, ROWS) == len(datasets.encode_rows(ROWS))
    assert store.rows(dataset_id) == ROWS
    assert store.prompts_and_targets(dataset_id) == (["red cat | red", "a\nb"], [" cat", " éé"])
    assert store.temp_files() == []
    (tmp_path / "outside.json").write_text(json.dumps(ROWS))
    assert store.rows("../outside") is None


def test_measure_counts_characters_and_bytes() -> None:
    assert datasets.measure(ROWS) == DatasetSize(
        rows=2, longest_chars=13, prompt_bytes=13, target_bytes=5
    )


def test_register_keeps_the_quota_and_the_sweeper_finds_expired_files(
    redis_conn: redis.Redis, tmp_path
) -> None:
    store = DatasetStore(tmp_path)
    size = datasets.measure(ROWS)
    quota = Quota(max_sets=1, max_bytes=10_000, ttl_s=60)
    first, second = "a" * 32, "b" * 32
    assert datasets.register(redis_conn, "o", first, size, 100, quota) == (1, 0, 0)
    assert datasets.register(redis_conn, "o", second, size, 100, quota) == (0, 1, 100)
    assert datasets.register(redis_conn, "p", second, size, 20_000, quota) == (-1, 0, 0)
    assert datasets.record(redis_conn, first) == ("o", size)
    store.write(first, ROWS)
    store.write(second, ROWS)
    assert store.expired(redis_conn) == [store.path(second)]
    datasets.unregister(redis_conn, "o", first)
    assert datasets.record(redis_conn, first) is None
    assert datasets.register(redis_conn, "o", second, size, 100, quota)[0] == 1
    datasets.touch(redis_conn, second, 5)
    assert 0 < redis_conn.ttl(keys.dataset_key(second)) <= 5
