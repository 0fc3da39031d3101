"""One place that maps failures to HTTP answers: a 500 is a bug, everything else is named."""

from __future__ import annotations

import logging
import math
from typing import Any

import redis
from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

log = logging.getLogger(__name__)

REDIS_RETRY_AFTER_S = 5


def field_error(field: str, message: str) -> list[dict[str, object]]:
    """A 422 detail in FastAPI's own shape, so clients parse one format."""
    return [{"loc": ["body", *field.split(".")], "msg": message, "type": "value_error"}]


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's own 422, with the values JSON cannot carry written as strings: Python's
        JSON parser takes NaN and Infinity in a body, and the default answer, which
        echoes the input, then failed to render (a 500)."""
        return JSONResponse(
            {"detail": _json_safe(jsonable_encoder(exc.errors()))},
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        )

    @app.exception_handler(redis.RedisError)
    async def redis_down(_: Request, exc: Exception) -> JSONResponse:
        """Redis down, restarting (loading its data) or refusing writes: the service is
        unavailable, not broken; clients retry after a few seconds."""
        log.warning("redis unavailable: %s: %s", type(exc).__name__, exc)
        return JSONResponse(
            {
                "detail": "the job queue (Redis) is unavailable; the server reconnects by itself, "
                f"try again in a few seconds ({type(exc).__name__})"
            },
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": str(REDIS_RETRY_AFTER_S)},
        )


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # 'nan', 'inf', '-inf'
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value
