"""Build the FastAPI application."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI, Request, Response, status
from fastapi.responses import JSONResponse

from app import __version__
from app.api import errors
from app.api.routes import datasets, health, jobs, models
from app.blobstore import BlobStore
from app.core.config import Settings, get_settings
from app.jobstore import JobStore

CLIENT_HEADER = "X-Lens-Client"
log = logging.getLogger(__name__)


def compatible(client_version: str) -> bool:
    """Clients of the same release series (major, or minor while 0.x) speak this API."""

    def series(v: str) -> tuple[str, ...]:
        parts = v.split(".")
        return tuple(parts[:2]) if parts[0] == "0" else tuple(parts[:1])

    return series(client_version) == series(__version__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        conn = redis.Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=2,
            socket_timeout=30,
            health_check_interval=10,
        )
        app.state.settings = settings
        app.state.redis = conn
        app.state.store = JobStore(conn)
        app.state.blobs = BlobStore(settings.blob_dir)
        yield
        conn.close()

    app = FastAPI(
        title="lens-server",
        version=__version__,
        summary="Interpretability analyses (CHG, tracing, scoring, attribution), models resident.",
        lifespan=lifespan,
    )
    errors.install(app)

    @app.middleware("http")
    async def guard(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        client = request.headers.get(CLIENT_HEADER)
        if client and not compatible(client):
            return JSONResponse(
                {
                    "detail": f"client version {client} cannot talk to server version "
                    f"{__version__}; install a client of the {__version__} series"
                },
                status_code=status.HTTP_426_UPGRADE_REQUIRED,
            )
        length = request.headers.get("content-length")
        limit = settings.limits.max_request_bytes
        if (
            length
            and length.isdigit()
            and int(length) > limit
            and not request.url.path.startswith("/v1/datasets")
        ):
            return JSONResponse(
                {"detail": f"request body of {length} bytes exceeds the limit of {limit}"},
                status_code=status.HTTP_413_CONTENT_TOO_LARGE,
            )
        return await call_next(request)

    for module in (jobs, models, datasets, health):
        app.include_router(module.router)
    return app
