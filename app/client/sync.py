"""The blocking client: ``LensClient``, its model handles and its jobs."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Generator
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


class _Transport:
    """Sends calls with retries, and opens event streams."""

    def __init__(self, config: ClientConfig, transport: httpx.BaseTransport | None) -> None:
        self.config = config
        self._http = httpx.Client(**config.httpx_options(), transport=transport)

    def call(self, call: Call, into: Path | None = None) -> Any:
        """Send ``call``, retrying as the policy says; a raw call's body is read into one
        buffer, or written to the file ``into``, as it arrives."""
        attempt = 0
        while True:
            sent: httpx.Response | httpx.TransportError | bytearray | Path
            try:
                sent = self._send(call, into)
            except httpx.TransportError as exc:
                sent = exc
            if isinstance(sent, bytearray | Path):
                return sent
            delay = self.config.retry.delay(call, attempt, sent)
            if delay is None:
                return _http.finish(call, sent, self.config.url)
            time.sleep(delay)
            attempt += 1

    def _send(self, call: Call, into: Path | None) -> httpx.Response | bytearray | Path:
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

    def events(self, job_id: str, read_timeout: float) -> Generator[ServerEvent]:
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

    def _call(self, call: Call) -> Any:
        return self._transport.call(call)

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
    def method(self: Model, *args: P.args, **kwargs: P.kwargs) -> R:
        spec = build(*args, **kwargs)
        job = self.submit(spec.kind, **spec.params)
        result = job.result(
            spec.wait.timeout, progress=spec.wait.progress, on_progress=spec.wait.on_progress
        )
        return expect_kind(result, returns)

    return method_like(method, build, name, returns.__name__)


class Model:
    """Runs jobs on one served model; the analysis methods block until the job ends."""

    def __init__(self, client: LensClient, name: str) -> None:
        self.client = client
        self.name = name
        self._shape: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return f"Model({self.name!r} at {self.client.url})"

    def info(self) -> dict[str, Any]:
        """Shape, workers and queue of this model (``NotFound`` if it is not served)."""
        return self.client._call(_http.model_call(self.name))

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

    def fit_dataset(self, dataset: DatasetSource, *args: Any, **kwargs: Any) -> ChgResult:
        return self._fit_uploaded(_dataset(self.client, dataset), *args, **kwargs)

    fit_dataset.__doc__ = _kinds.chg_dataset.__doc__
    fit = _blocking(_kinds.chg, "fit", ChgResult)
    fit_pattern_task = _blocking(_kinds.chg_pattern, "fit_pattern_task", ChgResult)
    _fit_uploaded = _blocking(_kinds.chg_dataset, "fit_dataset", ChgResult)
    fit_contrastive = _blocking(_kinds.cchg, "fit_contrastive", CchgResult)
    trace = _blocking(_kinds.trace, "trace", TraceResult)
    score = _blocking(_kinds.score, "score", ScoreResult)
    ablate = _blocking(_kinds.ablate, "ablate", AblateResult)
    attribute = _blocking(_kinds.attribute, "attribute", AttributeResult)


def _dataset(client: LensClient, source: DatasetSource) -> str:
    """The id of an uploaded data set: ``source`` itself, or what uploading it gave."""
    known = _kinds.dataset_id(source)
    return known if known is not None else client.upload_dataset(source)["id"]


class Job(_kinds.JobView):
    """A submitted job; ``document`` is the latest job document seen."""

    client: LensClient

    def refresh(self) -> dict[str, Any]:
        """Fetch the job document again."""
        self.document = self.client._call(_http.job_call(self.id))
        return self.document

    def status(self) -> str:
        """The job's current status: queued, running, succeeded, failed or cancelled."""
        return self.refresh()["status"]

    def wait(
        self,
        timeout: float | None = None,
        *,
        progress: bool | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> str:
        """Block until the job ends and return its final status (raises ``WaitTimeout``).

        Follows the job's event stream; falls back to polling if the stream keeps breaking.
        """
        show = self.client.config.progress if progress is None else progress
        reporter = ProgressReporter(self.id, show=show, callback=on_progress)
        with Waiter(self.document, reporter, timeout) as waiter:
            waiter.on_document(self.refresh())
            while not waiter.done:
                waiter.check_deadline()
                if waiter.streaming:
                    self._follow(waiter)
                else:
                    time.sleep(waiter.poll_delay())
                if not waiter.done:
                    waiter.on_document(self.refresh())
            self.document = waiter.doc
        return self.document["status"]

    def _follow(self, waiter: Waiter) -> None:
        events = self.client._transport.events(self.id, waiter.read_timeout())
        try:
            with contextlib.closing(events):
                for event in events:
                    if waiter.on_event(event):
                        return
        except (httpx.TransportError, LensError):
            pass
        waiter.stream_failed()

    def result(
        self,
        timeout: float | None = None,
        *,
        progress: bool | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Result:
        """Wait for the job, then download and load its result (raises ``JobFailed``)."""
        data = self._fetch_result(None, timeout, progress, on_progress)
        return load_result(data, tensors=self.client.config.tensors)

    def download(self, path: str | os.PathLike[str], timeout: float | None = None) -> Path:
        """Wait for the job, then save its result file at ``path`` (atomically, streamed
        to disk: the result is never held in memory whole)."""
        return self._fetch_result(Path(path), timeout, False, None)

    def _fetch_result(
        self,
        into: Path | None,
        timeout: float | None,
        progress: bool | None,
        on_progress: ProgressCallback | None,
    ) -> Any:
        show = self.client.config.progress if progress is None else progress
        if self.document["status"] not in _wait.FINAL_STATUSES:
            if not _wait.follows_events(self.kind, show, on_progress):
                return self._held_result(into, timeout)
            self.wait(timeout, progress=progress, on_progress=on_progress)
        failure = job_failure(self.document)
        if failure is not None:
            raise failure
        return self.client._transport.call(_http.result_call(self.id), into)

    def _held_result(self, into: Path | None, timeout: float | None) -> Any:
        """The result from requests that the server holds until the job ends."""
        waiting = _wait.ResultWait(self.document, timeout)
        while True:
            held = _http.result_call(self.id, waiting.next_wait_s())
            try:
                return self.client._transport.call(held, into)
            except Conflict:
                waiting.not_succeeded(self.refresh())

    def cancel(self) -> str:
        """Cancel the job: a queued one never runs, a running one stops at its next step.

        Returns the status after the request; a job that already ended keeps its status.
        """
        try:
            self.document = self.client._call(_http.cancel_call(self.id))
        except Conflict:
            return self.status()
        return self.document["status"]
