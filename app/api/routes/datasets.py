"""Upload a prompt/target data set once; jobs name it by its id."""

from __future__ import annotations

import json
import os
import secrets
from typing import Annotated, Literal, cast

import redis
from fastapi import APIRouter, HTTPException, Query, Request, status

from app.api.deps import OwnerDep, RedisDep, SettingsDep
from app.api.errors import field_error
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


def dataset_record(conn: redis.Redis, dataset_id: str) -> tuple[str, int] | None:
    """The data set's owner and row count, while it has not expired."""
    owner, rows = cast("list[bytes | None]", conn.hmget(dataset_key(dataset_id), "owner", "rows"))
    return (owner.decode(), int(rows or 0)) if owner else None


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
    try:
        rows = parse_dataset(bytes(body), fmt)
    except InvalidParameter as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, field_error(exc.field, exc.message)
        ) from exc
    dataset_id = secrets.token_hex(16)
    settings.dataset_dir.mkdir(parents=True, exist_ok=True)
    path = settings.dataset_dir / f"{dataset_id}.json"
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps(rows))
    os.replace(temp, path)
    pipe = conn.pipeline()
    pipe.hset(dataset_key(dataset_id), mapping={"owner": owner, "rows": len(rows)})
    pipe.expire(dataset_key(dataset_id), settings.result_ttl_s)
    pipe.execute()
    return DatasetInfo(id=dataset_id, rows=len(rows), columns=["prompt", "target"])
