"""Upload a prompt/target data set once; jobs name it by its id."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Annotated, Literal, cast

import redis
from fastapi import APIRouter, HTTPException, Query, Request, status
from starlette.concurrency import run_in_threadpool

from app.api.deps import OwnerDep, RedisDep, SettingsDep
from app.api.errors import field_error
from app.core.config import Settings
from app.core.jobsize import DatasetSize
from app.jobstore import PREFIX
from app.maintenance import dataset_key
from app.schemas import DatasetInfo
from workers.lens.datasets import parse_dataset
from workers.lens.errors import InvalidParameter

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

_CONTENT_TYPES = {
    "application/x-ndjson": "jsonl",
    "application/jsonl": "jsonl",
    "application/json": "jsonl",
    "text/tab-separated-values": "tsv",
}


def dataset_record(conn: redis.Redis, dataset_id: str) -> tuple[str, DatasetSize] | None:
    """The data set's owner and size, while it has not expired."""
    raw = cast("list[bytes | None]", conn.hmget(dataset_key(dataset_id), "owner", *_SIZE_FIELDS))
    owner, *sizes = raw
    if not owner:
        return None
    return owner.decode(), DatasetSize(*(int(v or 0) for v in sizes))


_SIZE_FIELDS = ("rows", "longest_chars", "prompt_bytes", "target_bytes")

# The quota check and the new data set's record, in one step (two uploads of one key at
# once cannot both take its last place). KEYS[1] = the owner's data sets (id → bytes),
# KEYS[2] = the new record; ARGV[1] = id, ARGV[2] = bytes, ARGV[3] = most data sets,
# ARGV[4] = most bytes, ARGV[5] = record key prefix, ARGV[6] = TTL (s), ARGV[7..] = the
# record's field/value pairs. Entries of expired data sets are dropped on the way.
# Returns {1 (stored) | 0 (too many) | -1 (too many bytes), count, bytes} as they were.
_STORE = """
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


def owner_datasets(owner: str) -> str:
    return f"{PREFIX}:datasets:{owner}"


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetInfo,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/x-ndjson": {"schema": {"type": "string"}},
                "text/tab-separated-values": {"schema": {"type": "string"}},
            },
        }
    },
)
async def upload_dataset(
    request: Request,
    owner: OwnerDep,
    settings: SettingsDep,
    conn: RedisDep,
    format: Annotated[
        Literal["jsonl", "tsv"] | None,
        Query(
            description="jsonl (prompt/target objects) or tsv (prompt and target columns); "
            "default from Content-Type"
        ),
    ] = None,
) -> DatasetInfo:
    """The body is the raw file: JSON lines with ``prompt`` and ``target``, or TSV. A data
    set expires ``result_ttl_s`` after its upload or its latest use by a job."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip()
    fmt = format or _CONTENT_TYPES.get(content_type)
    if fmt is None:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            field_error("format", "give ?format=jsonl or ?format=tsv (or a matching Content-Type)"),
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > settings.limits.max_dataset_bytes:
            raise HTTPException(
                status.HTTP_413_CONTENT_TOO_LARGE,
                f"data sets are limited to {settings.limits.max_dataset_bytes} bytes",
            )
    # Parsing tens of megabytes takes a while: not on the event loop, which serves everyone.
    return await run_in_threadpool(_store, bytes(body), fmt, owner, settings, conn)


def _store(
    content: bytes, fmt: str, owner: str, settings: Settings, conn: redis.Redis
) -> DatasetInfo:
    """Parse, check against the limits and the owner's quota, then write the file and its
    record (the record first, so the quota counts it; removed again if the write fails)."""
    limits = settings.limits
    try:
        rows = parse_dataset(content, fmt)
    except InvalidParameter as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, field_error(exc.field, exc.message)
        ) from exc
    size = DatasetSize(
        rows=len(rows),
        longest_chars=max(max(len(r["prompt"]), len(r["target"])) for r in rows),
        prompt_bytes=max(len(r["prompt"].encode()) for r in rows),
        target_bytes=max(len(r["target"].encode()) for r in rows),
    )
    if size.rows > limits.max_texts:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"the data set has {size.rows} rows, over the limit max_texts = {limits.max_texts}",
        )
    if size.longest_chars > limits.max_text_chars:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"a prompt or target of {size.longest_chars} characters exceeds the limit "
            f"max_text_chars = {limits.max_text_chars}",
        )
    data = json.dumps(rows, separators=(",", ":")).encode()
    dataset_id = secrets.token_hex(16)
    record = {"owner": owner} | {f: getattr(size, f) for f in _SIZE_FIELDS}
    stored, count, total = cast(
        "list[int]",
        conn.register_script(_STORE)(
            keys=[owner_datasets(owner), dataset_key(dataset_id)],
            args=[
                dataset_id,
                len(data),
                limits.max_datasets_per_key,
                limits.max_dataset_bytes_per_key,
                dataset_key(""),
                settings.result_ttl_s,
                *(x for pair in record.items() for x in pair),
            ],
        ),
    )
    if stored != 1:
        what = (
            f"{count} data sets, the limit max_datasets_per_key"
            if stored == 0
            else f"{total} bytes of data sets, and this one takes {len(data)}; the limit "
            "max_dataset_bytes_per_key"
        )
        limit = limits.max_datasets_per_key if stored == 0 else limits.max_dataset_bytes_per_key
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"you keep {what} is {limit}: they expire {settings.result_ttl_s} s after their "
            "upload or latest use",
        )
    try:
        _write(settings.dataset_dir, dataset_id, data)
    except BaseException:
        conn.delete(dataset_key(dataset_id))
        conn.hdel(owner_datasets(owner), dataset_id)
        raise
    return DatasetInfo(id=dataset_id, rows=size.rows, columns=["prompt", "target"])


def _write(directory: Path, dataset_id: str, data: bytes) -> None:
    """Atomically: a hidden temporary file, renamed (the sweeper removes one left behind)."""
    directory.mkdir(parents=True, exist_ok=True)
    temp = directory / f".{dataset_id}.tmp"
    try:
        temp.write_bytes(data)
        os.replace(temp, directory / f"{dataset_id}.json")
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
