"""The data set store: uploaded prompt/target sets, their file and their Redis record.

A data set is parsed once at upload (JSONL or TSV, below) and kept as one JSON file of
``{"prompt", "target"}`` rows, ``<data dir>/datasets/<id>.json``, beside a Redis record
(owner and size) whose expiry is the set's: the API writes both, jobs (the API's token
counts and the workers) read the file, the sweeper deletes a file whose record is gone.
This module is the one place for those paths and Redis rules; it needs no torch.

JSONL: one JSON object per non-blank line, with a ``prompt`` (or ``text``) string and a
``target`` string; other keys are ignored.

TSV: tab-separated, either a header row naming a ``prompt`` (or ``text``) column and a
``target`` column, or exactly two columns (prompt, target) and no header. Cells may hold
``\\t``, ``\\n``, ``\\r`` and ``\\\\`` escapes, so multi-line prompts fit on one row.

Parse errors name the 1-based line, so a user can fix the file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import redis

from app.keys import dataset_key, is_job_id, owner_datasets


class DatasetError(ValueError):
    """An upload the store refuses; ``field`` names the parameter (``dataset`` or
    ``format``) for the 422."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


Rows = list[dict[str, str]]


@dataclass(frozen=True)
class DatasetSize:
    """What sizes an uploaded data set, as its record keeps it: rows, the longest prompt
    or target in characters, and the longest prompt and target in bytes."""

    rows: int
    longest_chars: int = 0
    prompt_bytes: int = 0
    target_bytes: int = 0


@dataclass(frozen=True)
class DatasetStore:
    """The data set files under ``directory`` (``Settings.dataset_dir``)."""

    directory: Path

    def path(self, dataset_id: str) -> Path:
        return self.directory / f"{dataset_id}.json"

    def rows(self, dataset_id: str) -> Rows | None:
        """The set's rows; None when the id is malformed or its file is gone (expired)."""
        path = self.path(dataset_id)
        if not is_job_id(dataset_id) or not path.is_file():
            return None
        return cast(Rows, json.loads(path.read_text()))

    def prompts_and_targets(self, dataset_id: str) -> tuple[list[str], list[str]] | None:
        rows = self.rows(dataset_id)
        if rows is None:
            return None
        return [r["prompt"] for r in rows], [r["target"] for r in rows]

    def write(self, dataset_id: str, rows: Rows) -> int:
        """Atomically: a hidden temporary file, renamed (the sweeper removes one left
        behind). Returns the bytes written."""
        data = encode_rows(rows)
        self.directory.mkdir(parents=True, exist_ok=True)
        temp = self.directory / f".{dataset_id}.tmp"
        try:
            temp.write_bytes(data)
            os.replace(temp, self.path(dataset_id))
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return len(data)

    def temp_files(self) -> list[Path]:
        """Temporary files of writes, finished or not (the sweeper removes old ones)."""
        return sorted(self.directory.glob("*.tmp")) if self.directory.is_dir() else []

    def expired(self, conn: redis.Redis) -> list[Path]:
        """Files of sets whose record has expired: the sweeper deletes them."""
        if not self.directory.is_dir():
            return []
        return [p for p in self.directory.glob("*.json") if not conn.exists(dataset_key(p.stem))]


def encode_rows(rows: Rows) -> bytes:
    return json.dumps(rows, separators=(",", ":")).encode()


def measure(rows: Rows) -> DatasetSize:
    """What the limits look at: rows, the longest prompt or target in characters, and the
    longest prompt and target in bytes."""
    return DatasetSize(
        rows=len(rows),
        longest_chars=max(max(len(r["prompt"]), len(r["target"])) for r in rows),
        prompt_bytes=max(len(r["prompt"].encode()) for r in rows),
        target_bytes=max(len(r["target"].encode()) for r in rows),
    )


# The record: who owns the set and its size; it expires with the set.
_SIZE_FIELDS = ("rows", "longest_chars", "prompt_bytes", "target_bytes")


def record(conn: redis.Redis, dataset_id: str) -> tuple[str, DatasetSize] | None:
    """The data set's owner and size, while it has not expired."""
    raw = cast("list[bytes | None]", conn.hmget(dataset_key(dataset_id), "owner", *_SIZE_FIELDS))
    owner, *sizes = raw
    if not owner:
        return None
    return owner.decode(), DatasetSize(*(int(v or 0) for v in sizes))


def touch(conn: redis.Redis, dataset_id: str, ttl_s: int) -> None:
    """A job uses the set: it lives ``ttl_s`` from now."""
    conn.expire(dataset_key(dataset_id), ttl_s)


# The quota check and the new data set's record, in one step (two uploads of one key at
# once cannot both take its last place). KEYS[1] = the owner's data sets (id → bytes),
# KEYS[2] = the new record; ARGV[1] = id, ARGV[2] = bytes, ARGV[3] = most data sets,
# ARGV[4] = most bytes, ARGV[5] = record key prefix, ARGV[6] = TTL (s), ARGV[7..] = the
# record's field/value pairs. Entries of expired data sets are dropped on the way.
# Returns {1 (stored) | 0 (too many) | -1 (too many bytes), count, bytes} as they were.
_REGISTER = """
local count, total = 0, 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if redis.call('EXISTS', ARGV[5] .. all[i]) == 1 then
    count = count + 1
    total = total + tonumber(all[i + 1])
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
if count + 1 > tonumber(ARGV[3]) then return {0, count, total} end
if total + tonumber(ARGV[2]) > tonumber(ARGV[4]) then return {-1, count, total} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 7))
redis.call('EXPIRE', KEYS[2], ARGV[6])
return {1, count, total}
"""


@dataclass(frozen=True)
class Quota:
    max_sets: int
    max_bytes: int
    ttl_s: int


def register(
    conn: redis.Redis, owner: str, dataset_id: str, size: DatasetSize, nbytes: int, quota: Quota
) -> tuple[int, int, int]:
    """Record a new set if the owner's quota has room: (1 stored | 0 too many sets | -1 too
    many bytes, the owner's count and bytes before)."""
    fields = {"owner": owner} | {f: getattr(size, f) for f in _SIZE_FIELDS}
    stored, count, total = cast(
        "list[int]",
        conn.register_script(_REGISTER)(
            keys=[owner_datasets(owner), dataset_key(dataset_id)],
            args=[
                dataset_id, nbytes, quota.max_sets, quota.max_bytes, dataset_key(""),
                quota.ttl_s, *(x for pair in fields.items() for x in pair),
            ],
        ),
    )  # fmt: skip
    return stored, count, total


def unregister(conn: redis.Redis, owner: str, dataset_id: str) -> None:
    """Undo :func:`register` (the file could not be written)."""
    conn.delete(dataset_key(dataset_id))
    conn.hdel(owner_datasets(owner), dataset_id)


FIELD = "dataset"
_FORMATS = {"jsonl": "jsonl", "ndjson": "jsonl", "tsv": "tsv", "tab": "tsv"}
_PROMPT_KEYS = ("prompt", "text")
_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}
_ESCAPE = re.compile(r"\\(.)")


def parse_dataset(content: bytes, filename_or_format: str) -> list[dict[str, str]]:
    """Rows ``{"prompt", "target"}`` of a JSONL or TSV file, in file order."""
    fmt = dataset_format(filename_or_format)
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(FIELD, f"not UTF-8 text (byte {exc.start})") from None
    rows = _parse_jsonl(text) if fmt == "jsonl" else _parse_tsv(text)
    if not rows:
        raise DatasetError(FIELD, "holds no rows")
    return rows


def dataset_format(filename_or_format: str) -> str:
    """``jsonl`` or ``tsv`` from a file name's extension or a bare format name."""
    name = filename_or_format.strip().lower()
    fmt = _FORMATS.get(name.rsplit(".", 1)[-1])
    if fmt is None:
        raise DatasetError(
            "format", f"cannot tell the format of {filename_or_format!r}; use .jsonl or .tsv"
        )
    return fmt


def _row(line: int, prompt: object, target: object) -> dict[str, str]:
    if not isinstance(prompt, str) or not isinstance(target, str):
        raise DatasetError(FIELD, f"line {line}: prompt and target must be strings")
    if not target:
        raise DatasetError(FIELD, f"line {line}: empty target")
    return {"prompt": prompt, "target": target}


def _parse_jsonl(text: str) -> list[dict[str, str]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(FIELD, f"line {number}: invalid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise DatasetError(FIELD, f"line {number}: expected a JSON object")
        key = next((k for k in _PROMPT_KEYS if k in obj), None)
        if key is None or "target" not in obj:
            raise DatasetError(FIELD, f"line {number}: needs 'prompt' (or 'text') and 'target'")
        rows.append(_row(number, obj[key], obj["target"]))
    return rows


def _unescape(cell: str) -> str:
    return _ESCAPE.sub(lambda m: _ESCAPES.get(m.group(1), m.group(0)), cell)


def _parse_tsv(text: str) -> list[dict[str, str]]:
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        return []
    header = [c.strip().lower() for c in lines[0][1].split("\t")]
    prompt_col = next((header.index(k) for k in _PROMPT_KEYS if k in header), None)
    if prompt_col is not None and "target" in header:
        columns, body, width = (prompt_col, header.index("target")), lines[1:], len(header)
    else:
        columns, body, width = (0, 1), lines, 2
    rows = []
    for number, line in body:
        cells = line.split("\t")
        if len(cells) != width:
            raise DatasetError(
                FIELD, f"line {number}: expected {width} tab-separated columns, got {len(cells)}"
            )
        rows.append(_row(number, _unescape(cells[columns[0]]), _unescape(cells[columns[1]])))
    return rows
