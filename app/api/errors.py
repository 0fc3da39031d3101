"""One place that maps failures to HTTP answers: a 500 is a bug, everything else is named."""

from __future__ import annotations

import logging

import redis
from fastapi import FastAPI, Request, status
from fastapi.responses import JSONResponse

log = logging.getLogger(__name__)


def field_error(field: str, message: str) -> list[dict[str, object]]:
    """A 422 detail in FastAPI's own shape, so clients parse one format."""
    return [{"loc": ["body", *field.split(".")], "msg": message, "type": "value_error"}]


def install(app: FastAPI) -> None:
    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def redis_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("redis unavailable: %s", exc)
        return JSONResponse(
            {"detail": "the job queue (Redis) is unavailable; try again shortly"},
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": "5"},
        )
