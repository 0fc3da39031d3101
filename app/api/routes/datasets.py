"""Upload a prompt/target data set once; jobs name it by its id."""

from __future__ import annotations

from typing import Annotated, Literal

import redis
from fastapi import APIRouter, HTTPException, Query, Request, status
from starlette.concurrency import run_in_threadpool

from app import datasets
from app.api.deps import OwnerDep, RedisDep, SettingsDep
from app.api.errors import field_error
from app.core.config import Settings
from app.keys import new_job_id
from app.schemas import DatasetInfo

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

_CONTENT_TYPES = {
    "application/x-ndjson": "jsonl",
    "application/jsonl": "jsonl",
    "application/json": "jsonl",
    "text/tab-separated-values": "tsv",
}


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
        rows = datasets.parse_dataset(content, fmt)
    except datasets.DatasetError as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, field_error(exc.field, exc.message)
        ) from exc
    size = datasets.measure(rows)
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
    nbytes = len(datasets.encode_rows(rows))
    dataset_id = new_job_id()
    quota = datasets.Quota(
        limits.max_datasets_per_key, limits.max_dataset_bytes_per_key, settings.result_ttl_s
    )
    stored, count, total = datasets.register(conn, owner, dataset_id, size, nbytes, quota)
    if stored != 1:
        what = (
            f"{count} data sets, the limit max_datasets_per_key"
            if stored == 0
            else f"{total} bytes of data sets, and this one takes {nbytes}; the limit "
            "max_dataset_bytes_per_key"
        )
        limit = limits.max_datasets_per_key if stored == 0 else limits.max_dataset_bytes_per_key
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"you keep {what} is {limit}: they expire {settings.result_ttl_s} s after their "
            "upload or latest use",
        )
    try:
        datasets.DatasetStore(settings.dataset_dir).write(dataset_id, rows)
    except BaseException:
        datasets.unregister(conn, owner, dataset_id)
        raise
    return DatasetInfo(id=dataset_id, rows=size.rows, columns=["prompt", "target"])
