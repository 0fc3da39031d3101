"""Build the FastAPI application."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
import redis.asyncio
from fastapi import FastAPI, HTTPException, status
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import __version__
from app.api import errors
from app.api.edge import LocalhostGuard, SecurityHeaders, is_loopback
from app.api.routes import dashboard, datasets, health, jobs, metrics, models
from app.blobstore import BlobStore
from app.core.config import Limits, Settings, get_settings
from app.events import EventHub
from app.jobstore import JobStore
from app.keys import JOB_ID_FORM
from app.logs import job_context
from app.maintenance import run_housekeeping
from app.metrics import metrics_registry

CLIENT_HEADER = "X-Lens-Client"
log = logging.getLogger(__name__)
_JOB_PATH = re.compile(rf"^/v1/jobs/({JOB_ID_FORM})(?:/|$)")


def compatible(client_version: str) -> bool:
    """Clients of the same release series (major, or minor while 0.x) speak this API."""

    def series(v: str) -> tuple[str, ...]:
        parts = v.split(".")
        return tuple(parts[:2]) if parts[0] == "0" else tuple(parts[:1])

    return series(client_version) == series(__version__)


class _BodyTooLarge(HTTPException):
    """Raised from ``receive``: an HTTPException, so whatever is reading the body (FastAPI's
    JSON parsing, a streaming route) turns it into the 413 rather than a 400."""

    def __init__(self, limit: int, name: str) -> None:
        super().__init__(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"request body of more than {limit} bytes exceeds the limit {name} = {limit} bytes",
        )


class BodyLimit:
    """413 for a request body over the operator's limit, whether or not it declares its
    length: a chunked body is counted as it arrives and cut off at the limit."""

    def __init__(self, app: ASGIApp, limits: Limits) -> None:
        self.app = app
        self.limits = limits

    def _limit(self, path: str) -> tuple[int, str]:
        if path.startswith("/v1/datasets"):
            return self.limits.max_dataset_bytes, "max_dataset_bytes"
        return self.limits.max_request_bytes, "max_request_bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, name = self._limit(scope["path"])
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"").decode()
        if length.isdigit() and int(length) > limit:
            await _too_large(send, int(length), limit, name)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit, name)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _too_large(send, None, limit, name)


async def _too_large(send: Send, length: int | None, limit: int, name: str) -> None:
    size = f"{length} bytes" if length is not None else f"more than {limit} bytes"
    body = json.dumps(
        {"detail": f"request body of {size} exceeds the limit {name} = {limit} bytes"}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status.HTTP_413_CONTENT_TOO_LARGE,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class VersionGuard:
    """426 for a client of another release series, before anything else happens."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = Headers(scope=scope).get(CLIENT_HEADER) if scope["type"] == "http" else None
        if client and not compatible(client):
            response = JSONResponse(
                {
                    "detail": f"client version {client} cannot talk to server version "
                    f"{__version__}; install a client of the {__version__} series"
                },
                status_code=status.HTTP_426_UPGRADE_REQUIRED,
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class AccessLog:
    """One line per request, attributed to the job it names (never its headers)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        match = _JOB_PATH.match(scope["path"])
        status_code = 500

        async def recording_send(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            with job_context(match.group(1)) if match else contextlib.nullcontext():
                await self.app(scope, receive, recording_send)
        finally:
            state = scope.get("state", {})
            job_id = match.group(1) if match else state.get("job_id")
            with job_context(job_id) if job_id else contextlib.nullcontext():
                log.info(
                    "%s %s %d %.1fms owner=%s",
                    scope["method"],
                    scope["path"],
                    status_code,
                    1000 * (time.perf_counter() - started),
                    state.get("owner") or "-",
                )


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
        store = JobStore(conn)
        blobs = BlobStore(settings.blob_dir)
        app.state.settings = settings
        app.state.redis = conn
        app.state.store = store
        app.state.blobs = blobs
        app.state.metrics = metrics_registry(store, sorted(settings.models))
        app.state.aredis = aconn = redis.asyncio.Redis.from_url(
            settings.redis_url, socket_connect_timeout=2, socket_timeout=30
        )
        app.state.events = events = EventHub(settings.redis_url)
        events.start()
        housekeeping = asyncio.create_task(run_housekeeping(store, blobs, settings))
        yield
        await events.stop()
        await aconn.aclose()
        housekeeping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await housekeeping
        conn.close()

    # /docs and /redoc from assets the fastapi-offline package ships: a lab server may
    # have no internet, and the docs page would otherwise load Swagger UI from a CDN.
    app: FastAPI = FastAPIOffline(
        title="lens-server",
        version=__version__,
        summary="Interpretability analyses (CHG, tracing, scoring, attribution), models resident.",
        lifespan=lifespan,
    )
    errors.install(app)
    # Plain ASGI middleware (not BaseHTTPMiddleware, which copies every chunk of a
    # streamed result through extra streams). Added last runs first: access log outermost,
    # then the security headers (on every answer, refusals included), then the localhost
    # guard (no keys: see app.api.edge).
    app.add_middleware(BodyLimit, limits=settings.limits)
    app.add_middleware(VersionGuard)
    if not settings.key_values():
        app.add_middleware(LocalhostGuard, check_host=is_loopback(settings.host))
    app.add_middleware(SecurityHeaders)
    app.add_middleware(AccessLog)

    for module in (jobs, models, datasets, health, metrics, dashboard):
        app.include_router(module.router)
    return app
