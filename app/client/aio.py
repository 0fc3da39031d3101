"""The asyncio client: ``AsyncLensClient``, with the same surface as ``LensClient``.

What they do is written once in :mod:`app.client._ops`; this module awaits its effects
(:class:`_AsyncTransport`), :mod:`app.client.sync` performs them blocking.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import httpx

from app.client import _http, _kinds, _ops
from app.client._body import BodySink
from app.client._http import Call, ClientConfig, DatasetSource, RetryPolicy, ServerEvent
from app.client._kinds import JobSpec, JobView, method_like, op_method
from app.client._ops import Effect, Exchange, Op, Sleep
from app.client._tensors import TensorBackend
from app.client._wait import Waiter
from app.client.errors import LensError
from app.client.results import (
    AblateResult,
    AttributeResult,
    CchgResult,
    ChgResult,
    Result,
    ScoreResult,
    TraceResult,
)

P = ParamSpec("P")
T = TypeVar("T")
R = TypeVar("R", bound=Result)


class _AsyncTransport:
    """Performs the shared operations' effects with ``httpx.AsyncClient``."""

    def __init__(self, config: ClientConfig, transport: httpx.AsyncBaseTransport | None) -> None:
        self._http = httpx.AsyncClient(**config.httpx_options(), transport=transport)

    async def run(self, op: Op[T]) -> T:
        """Drive ``op`` to its end: perform each effect it yields, send back the outcome."""
        try:
            effect = next(op)
            while True:
                try:
                    outcome = await self._perform(effect)
                except Exception as exc:
                    effect = op.throw(exc)
                else:
                    effect = op.send(outcome)
        except StopIteration as stop:
            return stop.value
        finally:
            op.close()

    async def _perform(self, effect: Effect) -> Any:
        if isinstance(effect, Exchange):
            return await self._exchange(effect.call, effect.into)
        if isinstance(effect, Sleep):
            await asyncio.sleep(effect.seconds)
            return None
        return await self._follow(effect.job_id, effect.waiter)

    async def _exchange(self, call: Call, into: Path | None) -> httpx.Response | bytearray | Path:
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

    async def _follow(self, job_id: str, waiter: Waiter) -> None:
        try:
            async with contextlib.aclosing(self._events(job_id, waiter.read_timeout())) as events:
                async for event in events:
                    if waiter.on_event(event):
                        return
        except (httpx.TransportError, LensError):
            pass
        waiter.stream_failed()

    async def _events(self, job_id: str, read_timeout: float) -> AsyncGenerator[ServerEvent]:
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

    async def _run(self, op: Op[T]) -> T:
        return await self._transport.run(op)

    async def _call(self, call: Call) -> Any:
        return await self._run(_ops.request(self.config, call))

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
    """A model coroutine that runs the job ``build`` describes and returns its result."""

    async def method(self: AsyncModel, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self.client._run(_ops.analyse(self, build(*args, **kwargs), returns))

    return method_like(method, build, name, f"Awaitable[{returns.__name__}]")


def _runs(
    op: Callable[Concatenate[Any, P], Op[T]],
) -> Callable[Concatenate[Any, P], Awaitable[T]]:
    """A coroutine method that runs the shared operation ``op`` on its object."""

    async def method(self: Any, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.client._run(op(self, *args, **kwargs))

    return op_method(method, op, "Awaitable[{}]")


class AsyncModel:
    """Runs jobs on one served model; the analysis coroutines end when the job ends."""

    def __init__(self, client: AsyncLensClient, name: str) -> None:
        self.client = client
        self.name = name
        self._shape: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return f"AsyncModel({self.name!r} at {self.client.url})"

    info = _runs(_ops.info)

    async def submit(self, kind: str, **params: Any) -> AsyncJob:
        """Queue a job of ``kind`` on this model and return at once."""
        return await self.client.submit(kind, self.name, **params)

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

    fit_dataset = _runs(_ops.fit_dataset)
    fit = _awaiting(_kinds.chg, "fit", ChgResult)
    fit_pattern_task = _awaiting(_kinds.chg_pattern, "fit_pattern_task", ChgResult)
    fit_contrastive = _awaiting(_kinds.cchg, "fit_contrastive", CchgResult)
    trace = _awaiting(_kinds.trace, "trace", TraceResult)
    score = _awaiting(_kinds.score, "score", ScoreResult)
    ablate = _awaiting(_kinds.ablate, "ablate", AblateResult)
    attribute = _awaiting(_kinds.attribute, "attribute", AttributeResult)


class AsyncJob(JobView):
    """A submitted job; ``document`` is the latest job document seen."""

    client: AsyncLensClient

    refresh = _runs(_ops.refresh)
    status = _runs(_ops.status)
    wait = _runs(_ops.wait)
    result = _runs(_ops.result)
    download = _runs(_ops.download)
    cancel = _runs(_ops.cancel)
