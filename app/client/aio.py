"""The asyncio client: ``AsyncLensClient``, with the same surface as ``LensClient``."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import httpx

from app.client import _http, _kinds, _wait
from app.client._body import BodySink
from app.client._http import Call, ClientConfig, DatasetSource, RetryPolicy, ServerEvent
from app.client._kinds import JobSpec, method_like
from app.client._tensors import TensorBackend
from app.client._wait import ProgressCallback, ProgressReporter, Waiter, job_failure
from app.client.errors import Conflict, LensError
from app.client.results import (
    AblateResult,
    AttributeResult,
    CchgResult,
    ChgResult,
    Result,
    ScoreResult,
    TraceResult,
    expect_kind,
    load_result,
)

P = ParamSpec("P")
R = TypeVar("R", bound=Result)


class _AsyncTransport:
    """Sends calls with retries, and opens event streams."""

    def __init__(self, config: ClientConfig, transport: httpx.AsyncBaseTransport | None) -> None:
        self.config = config
        self._http = httpx.AsyncClient(**config.httpx_options(), transport=transport)

    async def call(self, call: Call, into: Path | None = None) -> Any:
        """Send ``call``, retrying as the policy says; a raw call's body is read into one
        buffer, or written to the file ``into``, as it arrives."""
        attempt = 0
        while True:
            sent: httpx.Response | httpx.TransportError | bytearray | Path
            try:
                sent = await self._send(call, into)
            except httpx.TransportError as exc:
                sent = exc
            if isinstance(sent, bytearray | Path):
                return sent
            delay = self.config.retry.delay(call, attempt, sent)
            if delay is None:
                return _http.finish(call, sent, self.config.url)
            await asyncio.sleep(delay)
            attempt += 1

    async def _send(self, call: Call, into: Path | None) -> httpx.Response | bytearray | Path:
        if not call.raw:
            return await self._http.request(**call.request_kwargs(self._http.timeout))
        async with self._http.stream(**call.request_kwargs(self._http.timeout)) as response:
            if response.status_code != 200:
                await response.aread()
                return response
            sink = BodySink(response, into)
            try:
                async for chunk in response.aiter_bytes():
                    sink.add(chunk)
            except BaseException:
                sink.abort()
                raise
            return sink.finish()

    async def events(self, job_id: str, read_timeout: float) -> AsyncGenerator[ServerEvent]:
        timeout = _http.stream_timeout(self._http.timeout, read_timeout)
        async with self._http.stream("GET", _http.events_path(job_id), timeout=timeout) as response:
            if response.status_code != 200:
                await response.aread()
                raise _http.error_from_response(response)
            parser = _http.SSEParser()
            async for line in response.aiter_lines():
                if (event := parser.feed(line)) is not None:
                    yield event

    async def aclose(self) -> None:
        await self._http.aclose()


class AsyncLensClient:
    """``LensClient`` for asyncio: the same methods, awaited.

    Use as ``async with AsyncLensClient(url) as lens: ...`` or call ``aclose()``.
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        timeout: float = _http.DEFAULT_TIMEOUT_S,
        *,
        tensors: TensorBackend = "auto",
        progress: bool = True,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = ClientConfig.create(url, api_key, timeout, tensors, progress, retry)
        self._transport = _AsyncTransport(self.config, transport)

    @property
    def url(self) -> str:
        return self.config.url

    async def __aenter__(self) -> AsyncLensClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()

    def __repr__(self) -> str:
        return f"AsyncLensClient({self.url!r})"

    async def _call(self, call: Call) -> Any:
        return await self._transport.call(call)

    async def models(self) -> list[dict[str, Any]]:
        """The served models: name, architecture, layers, heads, vocabulary, where resident."""
        return (await self._call(_http.models_call()))["models"]

    def model(self, name: str) -> AsyncModel:
        """A handle that runs jobs on the served model ``name``."""
        return AsyncModel(self, name)

    async def submit(self, kind: str, model: str, **params: Any) -> AsyncJob:
        """Queue a job and return at once."""
        doc = await self._call(_http.submit_call(kind, model, _kinds.params(**params)))
        return AsyncJob(self, doc)

    async def job(self, job_id: str) -> AsyncJob:
        """Reattach to a job by id."""
        return AsyncJob(self, await self._call(_http.job_call(job_id)))

    async def jobs(self, status: str | None = None, limit: int | None = None) -> list[AsyncJob]:
        """Your jobs, newest first."""
        docs = (await self._call(_http.jobs_call(status, limit)))["jobs"]
        return [AsyncJob(self, doc) for doc in docs]

    async def upload_dataset(
        self, source: DatasetSource, format: str | None = None
    ) -> dict[str, Any]:
        """Upload prompt/target rows once; jobs name them by the returned ``id``."""
        return await self._call(_http.dataset_call(source, format))


def _awaiting(
    build: Callable[P, JobSpec], name: str, returns: type[R]
) -> Callable[Concatenate[AsyncModel, P], Awaitable[R]]:
    async def method(self: AsyncModel, *args: P.args, **kwargs: P.kwargs) -> R:
        spec = build(*args, **kwargs)
        job = await self.submit(spec.kind, **spec.params)
        result = await job.result(
            spec.wait.timeout, progress=spec.wait.progress, on_progress=spec.wait.on_progress
        )
        return expect_kind(result, returns)

    return method_like(method, build, name, f"Awaitable[{returns.__name__}]")


class AsyncModel:
    """Runs jobs on one served model; the analysis coroutines end when the job ends."""

    def __init__(self, client: AsyncLensClient, name: str) -> None:
        self.client = client
        self.name = name
        self._shape: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return f"AsyncModel({self.name!r} at {self.client.url})"

    async def num_layers(self) -> int:
        """Number of transformer layers of the served model (asked once; a coroutine here,
        a property on the blocking ``Model``)."""
        return (await self._layers_heads())[0]

    async def num_heads(self) -> int:
        """Number of attention heads per layer of the served model (asked once)."""
        return (await self._layers_heads())[1]

    async def _layers_heads(self) -> tuple[int, int]:
        if self._shape is None:
            info = await self.info()
            self._shape = (int(info["layers"]), int(info["heads"]))
        return self._shape

    async def fit_dataset(self, dataset: DatasetSource, *args: Any, **kwargs: Any) -> ChgResult:
        known = _kinds.dataset_id(dataset)
        if known is None:
            known = (await self.client.upload_dataset(dataset))["id"]
        return await self._fit_uploaded(known, *args, **kwargs)

    fit_dataset.__doc__ = _kinds.chg_dataset.__doc__

    async def info(self) -> dict[str, Any]:
        """Shape, workers and queue of this model (``NotFound`` if it is not served)."""
        return await self.client._call(_http.model_call(self.name))

    async def submit(self, kind: str, **params: Any) -> AsyncJob:
        """Queue a job of ``kind`` on this model and return at once."""
        return await self.client.submit(kind, self.name, **params)

    fit = _awaiting(_kinds.chg, "fit", ChgResult)
    fit_pattern_task = _awaiting(_kinds.chg_pattern, "fit_pattern_task", ChgResult)
    _fit_uploaded = _awaiting(_kinds.chg_dataset, "fit_dataset", ChgResult)
    fit_contrastive = _awaiting(_kinds.cchg, "fit_contrastive", CchgResult)
    trace = _awaiting(_kinds.trace, "trace", TraceResult)
    score = _awaiting(_kinds.score, "score", ScoreResult)
    ablate = _awaiting(_kinds.ablate, "ablate", AblateResult)
    attribute = _awaiting(_kinds.attribute, "attribute", AttributeResult)


class AsyncJob(_kinds.JobView):
    """A submitted job; ``document`` is the latest job document seen."""

    client: AsyncLensClient

    async def refresh(self) -> dict[str, Any]:
        """Fetch the job document again."""
        self.document = await self.client._call(_http.job_call(self.id))
        return self.document

    async def status(self) -> str:
        """The job's current status: queued, running, succeeded, failed or cancelled."""
        return (await self.refresh())["status"]

    async def wait(
        self,
        timeout: float | None = None,
        *,
        progress: bool | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> str:
        """Wait until the job ends and return its final status (raises ``WaitTimeout``)."""
        show = self.client.config.progress if progress is None else progress
        reporter = ProgressReporter(self.id, show=show, callback=on_progress)
        with Waiter(self.document, reporter, timeout) as waiter:
            waiter.on_document(await self.refresh())
            while not waiter.done:
                waiter.check_deadline()
                if waiter.streaming:
                    await self._follow(waiter)
                else:
                    await asyncio.sleep(waiter.poll_delay())
                if not waiter.done:
                    waiter.on_document(await self.refresh())
            self.document = waiter.doc
        return self.document["status"]

    async def _follow(self, waiter: Waiter) -> None:
        try:
            async with contextlib.aclosing(
                self.client._transport.events(self.id, waiter.read_timeout())
            ) as events:
                async for event in events:
                    if waiter.on_event(event):
                        return
        except (httpx.TransportError, LensError):
            pass
        waiter.stream_failed()

    async def result(
        self,
        timeout: float | None = None,
        *,
        progress: bool | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Result:
        """Wait for the job, then download and load its result (raises ``JobFailed``)."""
        data = await self._fetch_result(None, timeout, progress, on_progress)
        return load_result(data, tensors=self.client.config.tensors)

    async def download(self, path: str | os.PathLike[str], timeout: float | None = None) -> Path:
        """Wait for the job, then save its result file at ``path`` (atomically, streamed
        to disk: the result is never held in memory whole)."""
        return await self._fetch_result(Path(path), timeout, False, None)

    async def _fetch_result(
        self,
        into: Path | None,
        timeout: float | None,
        progress: bool | None,
        on_progress: ProgressCallback | None,
    ) -> Any:
        show = self.client.config.progress if progress is None else progress
        if self.document["status"] not in _wait.FINAL_STATUSES:
            if not _wait.follows_events(self.kind, show, on_progress):
                return await self._held_result(into, timeout)
            await self.wait(timeout, progress=progress, on_progress=on_progress)
        failure = job_failure(self.document)
        if failure is not None:
            raise failure
        return await self.client._transport.call(_http.result_call(self.id), into)

    async def _held_result(self, into: Path | None, timeout: float | None) -> Any:
        """The result from requests that the server holds until the job ends."""
        waiting = _wait.ResultWait(self.document, timeout)
        while True:
            held = _http.result_call(self.id, waiting.next_wait_s())
            try:
                return await self.client._transport.call(held, into)
            except Conflict:
                waiting.not_succeeded(await self.refresh())

    async def cancel(self) -> str:
        """Cancel the job; returns its status after the request (an ended job keeps its own)."""
        try:
            self.document = await self.client._call(_http.cancel_call(self.id))
        except Conflict:
            return await self.status()
        return self.document["status"]
