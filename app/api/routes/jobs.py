"""Submit, inspect, stream, cancel and download jobs."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Annotated, Any, cast

import redis
import redis.asyncio
from fastapi import APIRouter, Body, HTTPException, Query, Request, status
from fastapi.responses import FileResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from app import datasets, queue, tokens
from app.api import validation
from app.api.deps import (
    AsyncRedisDep,
    BlobsDep,
    EventsDep,
    OwnedJobDep,
    OwnerDep,
    RedisDep,
    SettingsDep,
    StoreDep,
)
from app.api.result_file import ResultFile
from app.core.config import Settings
from app.events import LOST, EventHub, TooManyStreams
from app.jobstore import JobRecord, JobStore, reserve_with, unreserve_with
from app.keys import MODELS, new_job_id
from app.schemas import JobDocument, JobList, JobRequest, JobStatus, ModelInfo

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

SSE_KEEPALIVE_S = 10.0
MAX_RESULT_WAIT_S = 3600
RETRY_AFTER_S = 10
log = logging.getLogger(__name__)


async def _positioned(record: JobRecord, aconn: redis.asyncio.Redis) -> JobDocument:
    doc = record.document
    if doc.status is JobStatus.QUEUED:
        doc.queue_position = await queue.queue_position_async(aconn, doc.model, doc.id)
    return doc


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobDocument)
async def submit_job(
    job: Annotated[JobRequest, Body(description="The job: its kind, model and parameters.")],
    request: Request,
    owner: OwnerDep,
    settings: SettingsDep,
    store: StoreDep,
    conn: RedisDep,
    aconn: AsyncRedisDep,
) -> JobDocument:
    """Validate a job against its model and the operator's limits, then queue it.

    The submission counts as in flight from the moment its body is parsed (``async``, so
    every request of a burst gets there before the thread pool runs the first one), which
    is what lets a worker wait for the rest of a burst (``workers.tasks``). The same
    round trip reads the model's shape and reserves the job's place in the caller's
    quota, atomically; a job refused afterwards gives both back."""
    if job.model not in settings.models:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"model {job.model!r} is not served here; served: {sorted(settings.models)}",
        )
    submission = queue.Submission(job.model, job.kind)
    job_id, cap = new_job_id(), settings.limits.max_active_jobs_per_key
    pipe = aconn.pipeline(transaction=False)
    submission.open_with(pipe)
    pipe.hget(MODELS, job.model)
    reserve_with(pipe, owner, job_id, cap)
    *_, shape, active = await pipe.execute()
    submission.opened()
    created = False
    try:
        if active <= 0:
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS,
                f"{-active} of your jobs are queued or running; the limit "
                f"max_active_jobs_per_key is {cap}: wait for one to finish or cancel one",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        doc = await run_in_threadpool(
            _queue_job, job, job_id, request, owner, settings, store, conn, submission, shape
        )
        created = True
        return doc
    finally:
        await _give_back(aconn, submission, owner, job_id, reserved=active > 0 and not created)


async def _give_back(
    aconn: redis.asyncio.Redis,
    submission: queue.Submission,
    owner: str,
    job_id: str,
    *,
    reserved: bool,
) -> None:
    """In one round trip, end a submission that was not queued and free its quota place."""
    pipe = aconn.pipeline(transaction=False)
    abandoned = submission.abandon_with(pipe)
    if reserved:
        unreserve_with(pipe, owner, job_id)
    if abandoned or reserved:
        await pipe.execute()


def _queue_job(
    job: JobRequest,
    job_id: str,
    request: Request,
    owner: str,
    settings: Settings,
    store: JobStore,
    conn: redis.Redis,
    submission: queue.Submission,
    model_shape: bytes | None,
) -> JobDocument:
    """Checks (limits, the model's shape, sources, data sets, then the token limits and the
    estimated cost), then the job. ``model_shape``: the model's info as its worker
    published it (JSON; None before any worker has). Run in the thread pool: counting a
    large body's tokens takes a while, without the GIL (:mod:`app.tokens`)."""
    limits = settings.limits
    validation.check_limits(job, limits)
    info = ModelInfo.model_validate_json(model_shape) if model_shape is not None else None
    if info is not None:
        if info.error:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                f"model {job.model!r} cannot be served: {info.error}",
            )
        validation.check_shape(job, info)
    validation.check_source_job(job, owner, store)
    sizes = {}
    for field, dataset_id in validation.dataset_fields(job).items():
        found = datasets.record(conn, dataset_id)
        if found is None or found[0] != owner:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, f"{field}: data set {dataset_id!r} not found"
            )
        validation.check_dataset(field, found[1], limits)
        sizes[field] = found[1]
    validation.check_fit_rows(job, sizes, limits)
    estimate = None
    if info is not None:
        encode = tokens.published_encoder(conn, info.tokenizer_sha256)
        estimate = validation.estimate_cost(job, info, limits, sizes, settings.dataset_dir, encode)
    for dataset_id in validation.dataset_fields(job).values():
        datasets.touch(conn, dataset_id, settings.result_ttl_s)
    # One transaction: the record, the end of the submission's in-flight count (just as
    # the job lands, so a worker taking it never waits for its own submission), the
    # queue entry at the key's turn and the job's place in the queue.
    pipe = conn.pipeline()
    pipe.multi()  # explicit, as RQ wants of a pipeline handed to it
    doc = store.create(
        kind=job.kind,
        model=job.model,
        owner=owner,
        params=validation.public_params(job),
        pipeline=pipe,
        job_id=job_id,
        estimate=estimate,
    )
    request.state.job_id = doc.id
    submission.done_with(pipe)
    queue.enqueue(conn, job.model, doc.id, settings.job_timeout_s, pipeline=pipe)
    pipe.lpos(queue.queue_key(job.model), doc.id)
    doc.queue_position = pipe.execute()[-1]
    submission.closed()
    log.info("queued %s on %s", doc.kind, doc.model, extra={"job_id": doc.id})
    return doc


@router.get("", response_model=JobList)
def list_jobs(
    owner: OwnerDep,
    store: StoreDep,
    status_: Annotated[
        JobStatus | None, Query(alias="status", description="Only this status.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JobList:
    """The caller's jobs, newest first: a page of records, then the queued ones' positions,
    a round trip each. Their parameters are left out (GET /v1/jobs/{id} has them): a
    job's may be megabytes."""
    jobs: list[JobDocument] = []
    offset, page = 0, max(limit, 100)
    while len(jobs) < limit:
        ids = store.list_ids(owner, page, offset)
        if not ids:
            break
        for record in filter(None, store.get_many(ids, params=False)):
            if status_ is None or record.document.status is status_:
                jobs.append(record.document)
        offset += page
    jobs = jobs[:limit]
    queued = [doc for doc in jobs if doc.status is JobStatus.QUEUED]
    positions = queue.queue_positions(store.redis, [(doc.model, doc.id) for doc in queued])
    for doc, position in zip(queued, positions, strict=True):
        doc.queue_position = position
    return JobList(jobs=jobs)


@router.get("/{job_id}", response_model=JobDocument)
async def get_job(record: OwnedJobDep, aconn: AsyncRedisDep) -> JobDocument:
    return await _positioned(record, aconn)


_RESULT_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"content": {"application/octet-stream": {}}, "description": "A safetensors file."},
    409: {"description": "The job has not succeeded (yet)."},
}


# HEAD: the size (Content-Length) before a large download. A route of its own, so that
# the two operations get distinct OpenAPI ids.
@router.head("/{job_id}/result", response_class=FileResponse, responses=_RESULT_RESPONSES)
@router.get("/{job_id}/result", response_class=FileResponse, responses=_RESULT_RESPONSES)
async def get_result(
    record: OwnedJobDep,
    request: Request,
    blobs: BlobsDep,
    aconn: AsyncRedisDep,
    hub: EventsDep,
    settings: SettingsDep,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=MAX_RESULT_WAIT_S,
            description="Seconds to wait for the job to end before answering: the result "
            "comes as soon as the job succeeds, in one request (409 if it has not by then).",
        ),
    ] = 0,
) -> Response:
    """The result as one safetensors file, streamed from disk a chunk at a time (``HEAD``:
    its headers alone)."""
    doc = record.document
    if wait and not doc.status.is_final:
        release = _hold(hub, record.owner, settings)
        try:
            ended = await _ended(doc.id, aconn, hub, request, wait)
        finally:
            release()
        if ended is None:  # the client went away: nobody reads the answer
            return Response(status_code=status.HTTP_204_NO_CONTENT)
        doc = ended
    if doc.status is not JobStatus.SUCCEEDED:
        raise HTTPException(status.HTTP_409_CONFLICT, _not_succeeded(doc, wait))
    path = blobs.path(doc.id, doc.retries)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"the result of job {doc.id} has expired"
        ) from None
    name = f"{doc.kind}-{doc.id}.safetensors"
    return ResultFile(path, stat_result=info, media_type="application/octet-stream", filename=name)


def _hold(hub: EventHub, owner: str, settings: Settings) -> Callable[[], None]:
    """A place among the caller's open streams and held result requests, or 429."""
    cap = settings.limits.max_streams_per_key
    try:
        return hub.hold(owner, cap)
    except TooManyStreams:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"you have {cap} event streams and waiting result requests open; the limit "
            f"max_streams_per_key is {cap}: close one first",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ) from None


def _not_succeeded(doc: JobDocument, waited_s: float) -> str:
    if doc.error is not None:
        return f"job {doc.id} is {doc.status}, not succeeded: {doc.error.type}: {doc.error.message}"
    after = f" after waiting {waited_s:g} s" if waited_s and not doc.status.is_final else ""
    return f"job {doc.id} is {doc.status}, not succeeded{after}"


async def _ended(
    job_id: str, aconn: redis.asyncio.Redis, hub: EventHub, request: Request, wait_s: float
) -> JobDocument | None:
    """The job's document once it has ended, or as it is after ``wait_s``; ``None`` if the
    client disconnects first (a wait can be long: it must not outlive its caller). Blocks
    on the job's events, as a stream does: the result goes out as soon as the job ends."""
    async with hub.subscription(job_id) as inbox:
        ended = asyncio.ensure_future(_until_final(job_id, aconn, inbox))
        gone = asyncio.ensure_future(_disconnect(request))
        try:
            await asyncio.wait({ended, gone}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            gone.cancel()
        if ended.done() and not ended.cancelled():
            return ended.result()  # its error, if it failed, as it is
        if gone.done() and not gone.cancelled():
            return None
    record = await JobStore.get_async(aconn, job_id)  # waited in vain: the job as it is now
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    return record.document


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _message(data: bytes) -> dict[str, Any]:
    """A message of a job's channel, as its inbox hands it over (a lost subscription
    raises: events published meanwhile would be missed)."""
    if data == LOST:
        raise redis.ConnectionError("the job event subscription was lost")
    return cast("dict[str, Any]", json.loads(data))


async def _until_final(
    job_id: str, aconn: redis.asyncio.Redis, inbox: asyncio.Queue[bytes]
) -> JobDocument:
    """Read after subscribing, so no event falls between the read and the wait; read
    again once an event says the job ended (events carry the status, not the record)."""
    while True:
        record = await JobStore.get_async(aconn, job_id)
        if record is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
        if record.document.status.is_final:
            return record.document
        while True:
            event = _message(await inbox.get())
            if event["event"] == "status" and JobStatus(event["status"]).is_final:
                break


@router.delete("/{job_id}", response_model=JobDocument, status_code=status.HTTP_202_ACCEPTED)
def cancel_job(record: OwnedJobDep, store: StoreDep, settings: SettingsDep) -> JobDocument:
    """Cancel: a queued job never runs; a running one stops at its next step."""
    doc = record.document
    if doc.status.is_final:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {doc.id} already {doc.status}")
    store.request_cancel(doc.id)
    if store.cancel_queued(doc.id, settings.result_ttl_s):
        queue.drop(store.redis, doc.model, doc.id)
    log.info("cancel requested (was %s)", doc.status)
    updated = store.get(doc.id)
    return updated.document if updated else doc


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(
    record: OwnedJobDep, aconn: AsyncRedisDep, hub: EventsDep, settings: SettingsDep
) -> StreamingResponse:
    """Server-sent events: ``status`` (the job document) and ``progress``, until the job ends."""
    release = _hold(hub, record.owner, settings)
    return _HeldStream(
        _event_stream(record.document.id, aconn, hub),
        release,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


class _HeldStream(StreamingResponse):
    """A stream that gives its place back however it ends (the client gone before its
    first byte included)."""

    def __init__(
        self, content: AsyncIterator[str], release: Callable[[], None], **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def _sse(event: str, data: str) -> str:
    return f"event: {event}\ndata: {data}\n\n"


async def _event_stream(
    job_id: str, aconn: redis.asyncio.Redis, hub: EventHub
) -> AsyncIterator[str]:
    """Status and progress until the job ends; if Redis goes away meanwhile, an ``error``
    event and the end of the stream (the client reconnects, and gets the current status)."""
    try:
        async with hub.subscription(job_id) as inbox:
            async for chunk in _events(job_id, aconn, inbox):
                yield chunk
    except redis.RedisError as exc:
        log.warning("event stream ended, Redis unavailable: %s", exc)
        yield _sse("error", json.dumps({"detail": "the job queue (Redis) is unavailable"}))


async def _events(
    job_id: str, aconn: redis.asyncio.Redis, inbox: asyncio.Queue[bytes]
) -> AsyncIterator[str]:
    """The stream reads the job's record at the start, when it ends or goes back to the
    queue, and after a quiet keep-alive period (a queued job's position moves without
    events of its own); a start is applied from its event, which carries the start time
    (events carry what changed, never the record). Subscribed before the first read, so
    no event falls between the two."""
    last: tuple[JobStatus, int | None] | None = None
    doc: JobDocument | None = None
    while True:
        if doc is None:
            record = await JobStore.get_async(aconn, job_id)
            if record is None:
                return
            doc = await _positioned(record, aconn)
        if (doc.status, doc.queue_position) != last:
            last = (doc.status, doc.queue_position)
            yield _sse("status", doc.model_dump_json())
        if doc.status.is_final:
            return
        try:
            data = await asyncio.wait_for(inbox.get(), SSE_KEEPALIVE_S)
        except TimeoutError:
            doc = None
            yield ": keep-alive\n\n"
            continue
        while True:
            event = _message(data)
            if event.pop("event") == "progress":
                yield _sse("progress", json.dumps(event))
            elif event["status"] == JobStatus.RUNNING and doc is not None:
                doc = doc.model_copy(
                    update={
                        "status": JobStatus.RUNNING,
                        "started_at": datetime.fromisoformat(event["started_at"]),
                        "queue_position": None,
                    }
                )
            else:
                doc = None
            if inbox.empty():
                break
            data = inbox.get_nowait()
