"""A lens worker process: loads its models once, then takes jobs from their queues.

RQ's default worker forks a child per job, which would reload models every job
and cannot carry CUDA across the fork; this one runs jobs in its own process.

Lifecycle guarantees:

- Alive: a heartbeat thread refreshes the worker's key every ``heartbeat_s`` (it
  expires after 3 beats) and reaps the jobs of workers whose key has expired.
- SIGTERM (or Ctrl-C): no new job is taken; the current one may run for
  ``shutdown_grace_s``, then it is failed (``WorkerShutdown``; re-queued instead when
  the operator enables retries) and stopped at its next step, and the worker exits.
  A second signal stops at once, settling the job the same way first.
- Redis outage: RQ's loop retries, or gives up; the worker then waits for Redis and
  starts a new loop, so it never has to be restarted by hand.
- A model that cannot load: the worker says why (its log, its heartbeat, and the
  model's entry that the API reads at submission: 503) and serves its other models; with
  none left it stays up, reporting, until stopped.
- Only lens's job function runs (:mod:`workers.rq_guard`): a foreign RQ job in a queue
  is logged, deleted, and never imported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, cast

import redis
import torch
from redis.client import Pipeline
from rq.exceptions import StopRequested
from rq.job import Job
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from app import keys, presence, tokens
from app.blobstore import BlobStore
from app.core.config import Settings
from app.jobstore import JobStore, RunningJob
from app.logs import job_context
from app.maintenance import Reaper, settle
from app.schemas import JobError
from workers import limits, tasks
from workers.malloc import keep_freed_memory
from workers.registry import ModelRegistry, describe
from workers.rq_guard import ForeignJob, LensJob
from workers.runtime import Runtime
from workers.threads import apply_thread_budget, thread_budget

log = logging.getLogger(__name__)

REDIS_WAIT_S = 1.0


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def served_models(settings: Settings, name: str, explicit: list[str] | None = None) -> list[str]:
    """``explicit`` (``--serve``) if given, else the models the config assigns to ``name``."""
    names = list(explicit) if explicit else settings.models_of(name)
    unknown = [m for m in names if m not in settings.models]
    if unknown:
        raise ValueError(
            f"models {unknown} are not configured; configured: {sorted(settings.models)}"
        )
    if not names:
        raise ValueError(
            f"worker {name!r} serves no model: every configured model lists other workers "
            f"(ModelSpec.workers); configured: {sorted(settings.models)}"
        )
    return names


class _Heartbeat(threading.Thread):
    """Reports this worker alive and settles the jobs of workers that stopped reporting."""

    def __init__(
        self,
        settings: Settings,
        name: str,
        info: Callable[[], dict[str, Any]],
        store: JobStore,
        shapes: dict[str, dict[str, Any]],
    ) -> None:
        super().__init__(name="lens-heartbeat", daemon=True)
        self.settings, self.worker, self.info, self.store = settings, name, info, store
        self.shapes = shapes
        self.reap = Reaper(store, settings)
        self.stopped = threading.Event()

    def beat(self) -> None:
        conn = self.store.redis
        presence.heartbeat(conn, self.worker, self.info(), ttl_s=self.settings.worker_ttl_s)
        published = presence.model_infos(conn)
        for model, shape in self.shapes.items():
            if "error" in published.get(model, {}):
                presence.publish_model_info(conn, model, shape)
        self.reap()

    def run(self) -> None:
        while not self.stopped.wait(self.settings.heartbeat_s):
            try:
                self.beat()
            except redis.RedisError as exc:
                self.reap.outage()
                log.warning("heartbeat failed, Redis unavailable: %s", exc)
            except Exception:
                log.exception("heartbeat failed; trying again next beat")


class _Shutdown:
    """What SIGTERM does to the jobs this worker holds."""

    def __init__(self, settings: Settings, name: str, store: JobStore) -> None:
        self.settings, self.worker, self.store = settings, name, store
        self.requested = False
        self._begun = threading.Event()
        # Started now, not from the signal handler: starting a thread there could wait
        # for a lock the interrupted main thread holds.
        threading.Thread(target=self._end_of_grace, name="lens-shutdown", daemon=True).start()

    def begin(self) -> None:
        """Start the grace period (once): when it ends, whatever still runs is stopped."""
        self.requested = True
        self._begun.set()

    def _end_of_grace(self) -> None:
        self._begun.wait()
        time.sleep(self.settings.shutdown_grace_s)
        self.stop_jobs()

    def stop_jobs(self) -> None:
        """Settle every job this worker holds, then stop them at their next step."""
        try:
            held = [job for job in self.store.running() if job.worker == self.worker]
        except redis.RedisError as exc:
            log.warning("could not settle running jobs on shutdown: %s", exc)
            return
        for job in held:
            settle(self.store, self.settings, job, _shutdown_error(job))
            self.store.stop_locally(job.job_id)


def _shutdown_error(job: RunningJob) -> JobError:
    return JobError(
        type="WorkerShutdown",
        message=f"worker {job.worker} was shut down while running this job; submit it again",
    )


class LensWorker(SimpleWorker):
    """RQ's in-process worker, plus: the job id on every log line, the shutdown grace, and
    a short reconnect backoff so that a Redis restart costs seconds, not a minute."""

    max_connection_wait_time = 5.0

    def __init__(self, *args: Any, shutdown: _Shutdown, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lens_shutdown = shutdown

    def execute_job(self, job: Job, queue: Queue) -> None:
        with job_context(job.id):
            try:
                cast(LensJob, job).check()
            except ForeignJob as exc:
                self._refuse(job, queue, exc)
                return
            super().execute_job(job, queue)

    def _refuse(self, job: Job, queue: Queue, reason: ForeignJob) -> None:
        """Log a foreign job and delete it (RQ's record and its place in the queue's
        intermediate list); nothing of it is imported or run."""
        with self.connection.pipeline() as pipe:
            pipe.lrem(queue.intermediate_queue_key, 0, job.id)
            pipe.delete(job.key)
            pipe.execute()
        log.error("refused RQ job %s from queue %s (deleted): %s", job.id, queue.name, reason)

    def subscribe(self) -> None:
        """No RQ control channel: lens cancels and stops jobs through its job store, never
        through RQ's pub/sub commands. RQ's listener thread also made stopping slow: RQ's
        teardown joins it, and once it has read the reply to the unsubscribe it may start a
        60 s wait for a subscription, so a worker whose job ended inside the shutdown grace
        sat in its teardown until the supervisor killed it, never logging ``stopped``."""

    def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
        """RQ's heartbeat, its three commands in one round trip: RQ sends them one by one
        when not given a pipeline, twice around every job (one of them between taking a
        job and running it)."""
        if pipeline is not None:
            super().heartbeat(timeout, pipeline)
            return
        with self.connection.pipeline(transaction=False) as own:
            super().heartbeat(timeout, own)
            own.execute()

    def handle_warm_shutdown_request(self) -> None:
        grace = self.lens_shutdown.settings.shutdown_grace_s
        log.info("shutdown requested: a running job has %.0f s to finish", grace)
        self.lens_shutdown.begin()

    def request_force_stop(self, signum: int, frame: FrameType | None) -> None:
        self.lens_shutdown.stop_jobs()
        super().request_force_stop(signum, frame)


def _gpu_memory(devices: set[torch.device]) -> list[dict[str, Any]]:
    """Memory of the CUDA devices this worker's models live on (no new CUDA contexts)."""
    return [
        {
            "device": str(d),
            "allocated": torch.cuda.memory_allocated(d),
            "reserved": torch.cuda.memory_reserved(d),
            "total": torch.cuda.get_device_properties(d).total_memory,
        }
        for d in sorted(devices, key=str)
        if d.type == "cuda"
    ]


def _wait_for_redis(conn: redis.Redis, shutdown: _Shutdown) -> bool:
    """Block until Redis answers (True) or a shutdown is requested (False)."""
    while not shutdown.requested:
        try:
            conn.ping()
            return True
        except redis.RedisError:
            time.sleep(REDIS_WAIT_S)
    return False


def run_worker(
    settings: Settings,
    models: list[str] | None = None,
    name: str | None = None,
    *,
    burst: bool = False,
) -> None:
    """Load its models (``models``, else those the config assigns to ``name``), then work
    their queues until told to stop."""
    name = name or default_worker_name()
    names = served_models(settings, name, models)
    apply_thread_budget(thread_budget(settings, names))
    hf_logging.disable_progress_bar()
    os.nice(settings.worker_nice)
    keeps_freed = keep_freed_memory(settings.worker_keep_freed_mib)
    conn = redis.Redis.from_url(settings.redis_url, health_check_interval=10)
    store = JobStore(conn, worker=name)
    for job in store.running():
        if job.worker == name:
            settle(store, settings, job, _restarted_error(job))
    registry = ModelRegistry(
        {m: settings.models[m] for m in names},
        max_bytes=settings.max_resident_bytes,
        max_models=settings.max_resident_models,
        offload_dir=settings.data_dir / "offload",
    )
    shapes, failed = _load_at_start(conn, registry, names)
    for model, shape in shapes.items():
        presence.publish_model_info(conn, model, shape)
    _publish_failures(conn, registry, failed)
    serving = [m for m in names if m in shapes]
    limits.apply_memory_limits(settings, list(registry.loaded.values()))
    tasks.install(
        Runtime(
            worker_name=name,
            registry=registry,
            store=store,
            blobs=BlobStore(settings.blob_dir),
            dataset_dir=settings.dataset_dir,
            result_ttl_s=settings.result_ttl_s,
            limits=settings.limits,
        )
    )
    since = time.time()

    def info() -> dict[str, Any]:
        loaded = dict(registry.loaded)
        return {
            **tasks.stats(),
            "models": serving,
            "failed": failed,
            "resident": sorted(loaded),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "worker_threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
            "nice": os.getpriority(os.PRIO_PROCESS, 0),
            "keeps_freed_mib": settings.worker_keep_freed_mib if keeps_freed else 0,
            "since": since,
            "loads": dict(registry.load_counts),
            "load_seconds": dict(registry.load_seconds),
            "gpus": _gpu_memory({d for lm in loaded.values() for d in lm.devices}),
        }

    heartbeat = _Heartbeat(settings, name, info, store, shapes)
    heartbeat.beat()
    heartbeat.start()
    shutdown = _Shutdown(settings, name, store)
    log.info("worker %s ready: models %s", name, serving)
    try:
        if serving:
            _work(conn, settings, name, serving, shutdown, burst=burst)
        elif not burst:
            log.error("worker %s has no model it can serve; waiting to be stopped", name)
            _wait_for_stop()
    finally:
        heartbeat.stopped.set()
        with contextlib.suppress(redis.RedisError):
            presence.remove_worker(conn, name)
        log.info("worker %s stopped", name)


def _load_at_start(
    conn: redis.Redis, registry: ModelRegistry, names: list[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Each model's shape (what GET /v1/models reports), its tokenizer published, and for
    each that cannot load, why: one log line that names it (the traceback at debug level)."""
    shapes: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    for name in names:
        source = registry.specs[name].source
        try:
            lm = registry.get(name)
            shapes[name] = describe(name, lm)
        except Exception as exc:
            failed[name] = f"cannot load it from {source}: {type(exc).__name__}: {exc}"
            log.debug("loading model %s failed", name, exc_info=True)
            log.error("cannot load model %s from %s: %s: %s", name, source, type(exc).__name__, exc)
            continue
        shapes[name]["tokenizer_sha256"] = publish_tokenizer(conn, lm.tokenizer)
    return shapes, failed


PROBE_TEXTS = (
    "The capital of France is Paris.",
    "  spaces,\ta tab  and a\nnewline ",
    "漢字かなカナ한국어, café, naïve, 🙂",
    "",
    "<s></s><pad><unk><|endoftext|><bos><eos>",
    "x" * 2000,
)
"""Texts on which the API's count with a published tokenizer must equal the worker's (and
one of the tokenizer's own special tokens)."""


def publish_tokenizer(conn: redis.Redis, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Publish a fast tokenizer for the API's token counts at submission (``app.tokens``),
    and return its hash; None (the API then guesses) for a slow one, or one that counts
    otherwise through ``tokenizers`` alone than through transformers (the probe texts
    tell: some tokenizer classes change the text in Python first)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not tokenizer.is_fast or backend is None:
        return None
    texts = [*PROBE_TEXTS, " ".join(tokenizer.all_special_tokens)]
    try:
        sha256, blob = tokens.pack(backend.to_str())
        same = tokens.encoder(tokens.unpack(blob))(texts) == limits.encoder(tokenizer)(texts)
    except Exception as exc:  # tokenizers raises plain Exceptions; the model serves anyway
        log.warning("tokenizer not published, it does not serialise: %s", exc)
        return None
    if not same:
        log.warning("tokenizer not published: it counts otherwise through tokenizers alone")
        return None
    presence.publish_tokenizer(conn, sha256, blob)
    return sha256


def _publish_failures(conn: redis.Redis, registry: ModelRegistry, failed: dict[str, str]) -> None:
    """Mark each failed model so that the API refuses its jobs (503, with the reason),
    unless a live worker serves it: that worker clears the mark at its next beat anyway."""
    if not failed:
        return
    served = {m for info in presence.live_workers(conn).values() for m in info.get("models", [])}
    for model, reason in failed.items():
        if model not in served:
            presence.publish_model_info(
                conn,
                model,
                {"name": model, "source": registry.specs[model].source, "error": reason},
            )


def _wait_for_stop() -> None:
    """Block until SIGTERM or SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def _restarted_error(job: RunningJob) -> JobError:
    return JobError(
        type="WorkerLost",
        message=f"worker {job.worker} restarted while running this job; submit it again",
    )


def _work(
    conn: redis.Redis,
    settings: Settings,
    name: str,
    models: list[str],
    shutdown: _Shutdown,
    *,
    burst: bool,
) -> None:
    """RQ's loop, started again after a Redis outage made it quit. Each loop registers
    with RQ under a fresh name: a killed predecessor's RQ record would block the old one."""
    rounds = 0
    while True:
        rounds += 1
        worker = LensWorker(
            [
                Queue(
                    keys.queue_name(m),
                    connection=conn,
                    serializer=JSONSerializer,
                    job_class=LensJob,
                )
                for m in models
            ],
            name=f"{name}.{os.getpid()}.{rounds}",
            connection=conn,
            serializer=JSONSerializer,
            job_class=LensJob,
            shutdown=shutdown,
        )
        try:
            worker.work(burst=burst, logging_level="WARNING", with_scheduler=False)
        except StopRequested:
            return
        except redis.RedisError as exc:
            log.warning("lost Redis: %s", exc)
        if burst or shutdown.requested:
            return
        log.warning("the job loop stopped (Redis unavailable?); waiting for Redis")
        try:
            if not _wait_for_redis(conn, shutdown):
                return
        except StopRequested:
            return
        log.info("Redis is back; taking jobs again")
