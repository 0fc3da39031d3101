"""The blocking client: ``LensClient``, its model handles and its jobs.

What they do is written once in :mod:`app.client._ops`; this module performs its effects
with blocking I/O (:class:`_Transport`). :mod:`app.client.aio` is its asyncio twin.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Generator
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


class _Transport:
    """Performs the shared operations' effects with ``httpx.Client``."""

    def __init__(self, config: ClientConfig, transport: httpx.BaseTransport | None) -> None:
        self._http = httpx.Client(**config.httpx_options(), transport=transport)

    def run(self, op: Op[T]) -> T:
        """Drive ``op`` to its end: perform each effect it yields, send back the outcome."""
        try:
            effect = next(op)
            while True:
                try:
                    outcome = self._perform(effect)
                except Exception as exc:
                    effect = op.throw(exc)
                else:
                    effect = op.send(outcome)
        except StopIteration as stop:
            return stop.value
        finally:
            op.close()

    def _perform(self, effect: Effect) -> Any:
        if isinstance(effect, Exchange):
            return self._exchange(effect.call, effect.into)
        if isinstance(effect, Sleep):
            time.sleep(effect.seconds)
            return None
        return self._follow(effect.job_id, effect.waiter)

    def _exchange(self, call: Call, into: Path | None) -> httpx.Response | bytearray | Path:
        if not call.raw:
            return self._http.request(**call.request_kwargs(self._http.timeout))
        with self._http.stream(**call.request_kwargs(self._http.timeout)) as response:
            if response.status_code != 200:
                response.read()
                return response
            sink = BodySink(response, into)
            try:
                for chunk in response.iter_bytes():
                    sink.add(chunk)
            except BaseException:
                sink.abort()
                raise
            return sink.finish()

    def _follow(self, job_id: str, waiter: Waiter) -> None:
        try:
            with contextlib.closing(self._events(job_id, waiter.read_timeout())) as events:
                for event in events:
                    if waiter.on_event(event):
                        return
        except (httpx.TransportError, LensError):
            pass
        waiter.stream_failed()

    def _events(self, job_id: str, read_timeout: float) -> Generator[ServerEvent]:
        timeout = _http.stream_timeout(self._http.timeout, read_timeout)
        with self._http.stream("GET", _http.events_path(job_id), timeout=timeout) as response:
            if response.status_code != 200:
                response.read()
                raise _http.error_from_response(response)
            parser = _http.SSEParser()
            for line in response.iter_lines():
                if (event := parser.feed(line)) is not None:
                    yield event

    def close(self) -> None:
        self._http.close()


class LensClient:
    """A lens-server seen from Python: models, jobs and their results.

    ``url`` and ``api_key`` default to ``$LENS_URL`` (else http://127.0.0.1:8000) and
    ``$LENS_API_KEY``. Tensors come back as torch tensors when torch is installed
    (``tensors="auto"``), else as numpy arrays. Connection failures and 503s are
    retried with backoff (``retry``).
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
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.config = ClientConfig.create(url, api_key, timeout, tensors, progress, retry)
        self._transport = _Transport(self.config, transport)

    @property
    def url(self) -> str:
        return self.config.url

    def __enter__(self) -> LensClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._transport.close()

    def __repr__(self) -> str:
        return f"LensClient({self.url!r})"

    def _run(self, op: Op[T]) -> T:
        return self._transport.run(op)

    def _call(self, call: Call) -> Any:
        return self._run(_ops.request(self.config, call))

    def models(self) -> list[dict[str, Any]]:
        """The served models: name, architecture, layers, heads, vocabulary, where resident."""
        return self._call(_http.models_call())["models"]

    def model(self, name: str) -> Model:
        """A handle that runs jobs on the served model ``name``."""
        return Model(self, name)

    def submit(self, kind: str, model: str, **params: Any) -> Job:
        """Queue a job and return at once."""
        return Job(self, self._call(_http.submit_call(kind, model, _kinds.params(**params))))

    def job(self, job_id: str) -> Job:
        """Reattach to a job by id (from another process, or after a restart)."""
        return Job(self, self._call(_http.job_call(job_id)))

    def jobs(self, status: str | None = None, limit: int | None = None) -> list[Job]:
        """Your jobs, newest first."""
        return [Job(self, doc) for doc in self._call(_http.jobs_call(status, limit))["jobs"]]

    def upload_dataset(self, source: DatasetSource, format: str | None = None) -> dict[str, Any]:
        """Upload prompt/target rows once; jobs name them by the returned ``id``."""
        return self._call(_http.dataset_call(source, format))


def _blocking(
    build: Callable[P, JobSpec], name: str, returns: type[R]
) -> Callable[Concatenate[Model, P], R]:
    """A model method that runs the job ``build`` describes and returns its result."""

    def method(self: Model, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.client._run(_ops.analyse(self, build(*args, **kwargs), returns))

    return method_like(method, build, name, returns.__name__)


def _runs(op: Callable[Concatenate[Any, P], Op[T]]) -> Callable[Concatenate[Any, P], T]:
    """A method that runs the shared operation ``op`` on its object."""

    def method(self: Any, *args: P.args, **kwargs: P.kwargs) -> T:
        return self.client._run(op(self, *args, **kwargs))

    return op_method(method, op, "{}")


class Model:
    """Runs jobs on one served model; the analysis methods block until the job ends."""

    def __init__(self, client: LensClient, name: str) -> None:
        self.client = client
        self.name = name
        self._shape: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return f"Model({self.name!r} at {self.client.url})"

    info = _runs(_ops.info)

    def submit(self, kind: str, **params: Any) -> Job:
        """Queue a job of ``kind`` on this model and return at once."""
        return self.client.submit(kind, self.name, **params)

    @property
    def num_layers(self) -> int:
        """Number of transformer layers of the served model (asked once)."""
        return self._layers_heads()[0]

    @property
    def num_heads(self) -> int:
        """Number of attention heads per layer of the served model (asked once)."""
        return self._layers_heads()[1]

    def _layers_heads(self) -> tuple[int, int]:
        if self._shape is None:
            info = self.info()
            self._shape = (int(info["layers"]), int(info["heads"]))
        return self._shape

    fit_dataset = _runs(_ops.fit_dataset)
    fit = _blocking(_kinds.chg, "fit", ChgResult)
    fit_pattern_task = _blocking(_kinds.chg_pattern, "fit_pattern_task", ChgResult)
    fit_contrastive = _blocking(_kinds.cchg, "fit_contrastive", CchgResult)
    trace = _blocking(_kinds.trace, "trace", TraceResult)
    score = _blocking(_kinds.score, "score", ScoreResult)
    ablate = _blocking(_kinds.ablate, "ablate", AblateResult)
    attribute = _blocking(_kinds.attribute, "attribute", AttributeResult)


class Job(JobView):
    """A submitted job; ``document`` is the latest job document seen."""

    client: LensClient

    refresh = _runs(_ops.refresh)
    status = _runs(_ops.status)
    wait = _runs(_ops.wait)
    result = _runs(_ops.result)
    download = _runs(_ops.download)
    cancel = _runs(_ops.cancel)
