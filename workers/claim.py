"""Taking queued score and trace jobs off a model's queue for one shared forward pass.

Two callers: a score or trace job that starts takes the jobs of its kind queued behind
it (a burst), and a running fit takes the model's queued short jobs between two of its
steps (:mod:`workers.fit_pauses`). Either way, up to the model's token budget
(``ModelSpec.max_batch_tokens``): each job taken is removed from the RQ queue
atomically (LREM) before it is marked running, so no other worker can run it too; a
job it cannot take (cancelled, taken by another worker, invalid, over the budget) stays
queued and runs in its turn.

A claim reads each queued job's parameters and tokenises them once per worker: what the
job needs in a pass (its rows and padded length), or that it can share none, is kept
(:class:`Footprints`), so a huge job queued by one key is not read and tokenised again
each time a small job of another key starts.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import redis
from pydantic import TypeAdapter
from rq.job import Job

from app import keys, queue
from app.core.config import Limits, ModelSpec
from app.jobstore import JobRecord, JobStore
from app.keys import job_key
from app.kinds import BATCHABLE_KINDS
from app.schemas import JobDocument, JobRequest, JobStatus
from workers import limits, shared_pass
from workers.lens.errors import LensError
from workers.lens.loading import LoadedModel

CLAIM_SCAN = 64
"""Queued jobs looked at, from the head of the queue, per scan."""
SUBMISSION_POLL_S = 0.001
SUBMISSIONS_QUIET_S = 0.010
"""How long no submission must be in flight before a waiting burst counts as queued:
the API's handlers come one after another, with short gaps between them."""
SHORT_KINDS = frozenset(kind.value for kind in BATCHABLE_KINDS)
"""The kinds that can share a pass (a trace with gradients cannot: it is found out when
its parameters are read)."""

_requests: TypeAdapter[JobRequest] = TypeAdapter(JobRequest)


@dataclass(frozen=True)
class Member:
    """A running job of a shared pass."""

    doc: JobDocument
    prepared: shared_pass.Prepared


@dataclass(frozen=True)
class KnownFootprint:
    """What a queued job takes in a shared pass: its rows and its own padded length."""

    rows: int
    length: int


class Footprints:
    """Per worker, the footprint of each queued job a claim has read (``None``: it cannot
    share a pass), so that no claim reads or tokenises it again. Job ids are never
    reused and a job's parameters never change, so an entry stays true; the oldest go
    beyond ``capacity``."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._known: dict[str, KnownFootprint | None] = {}

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._known

    def __len__(self) -> int:
        return len(self._known)

    def put(self, job_id: str, footprint: KnownFootprint | None) -> None:
        self._known[job_id] = footprint
        while len(self._known) > self.capacity:
            del self._known[next(iter(self._known))]

    def may_fit(self, job_id: str, chosen: Sequence[shared_pass.Prepared], budget: int) -> bool:
        """False if the job is known to be unable to join ``chosen`` within ``budget``."""
        if job_id not in self._known:
            return True
        known = self._known[job_id]
        return known is not None and shared_pass.padded_tokens([*chosen, known]) <= budget


@dataclass
class Claimer:
    """What a worker needs to take queued jobs: its name, the job store, its limits."""

    worker: str
    store: JobStore
    limits: Limits
    dataset_dir: Path
    footprints: Footprints = field(default_factory=Footprints)

    def check_tokens(
        self, lm: LoadedModel, job: JobRequest, prepared: shared_pass.Prepared | None
    ) -> None:
        """The operator's token limits, and the job's size estimated from its token counts,
        before any compute; a prepared job's texts are counted from its batch."""
        counted = {"texts": prepared.batch.lengths.tolist()} if prepared is not None else None
        limits.check_job(job, lm, self.limits, self.dataset_dir, counted)

    def await_submissions(
        self, spec: ModelSpec, doc: JobDocument, leader: shared_pass.Prepared
    ) -> list[bytes] | None:
        """While the API is taking jobs of ``doc``'s kind for its model (a burst), wait
        until no such submission has been in flight for ``SUBMISSIONS_QUIET_S``, or for
        the model's ``batch_wait_ms`` at most: the burst then shares this pass instead
        of the next ones. A lone job, or one user's jobs one after another, finds nothing
        in flight and starts at once. The first check reads the head of the queue too, and
        returns it if nothing was in flight: it is then the claim's first scan."""
        conn = self.store.redis
        if shared_pass.is_full([leader], spec.max_batch_tokens):
            return None
        pipe = conn.pipeline(transaction=False)
        pipe.get(keys.submitting_key(doc.model, doc.kind))
        pipe.lrange(queue.queue_key(doc.model), 0, CLAIM_SCAN - 1)
        in_flight, head = pipe.execute()
        if not queue.in_flight_count(in_flight):
            return cast("list[bytes]", head)
        deadline, quiet_since = time.monotonic() + spec.batch_wait_ms / 1000, None
        while time.monotonic() < deadline:
            time.sleep(SUBMISSION_POLL_S)
            now = time.monotonic()
            if queue.submissions_in_flight(conn, doc.model, doc.kind):
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= SUBMISSIONS_QUIET_S:
                return None
        return None

    def take(
        self,
        lm: LoadedModel,
        model: str,
        kinds: Collection[str],
        chosen: Sequence[shared_pass.Prepared],
        budget: int,
        head: list[bytes] | None = None,
    ) -> list[Member]:
        """Take queued jobs of ``model`` of one of ``kinds`` that fit beside ``chosen`` in
        ``budget`` tokens, scanning the queue again while each scan finds new jobs (a
        burst still landing). A scan reads its new candidates' kind and status in one
        round trip, the records of those that may fit in another, and takes the ones that
        fit in a third; ``head``, if given, is the first scan's read of the queue."""
        conn = self.store.redis
        queue_key = queue.queue_key(model)
        chosen = list(chosen)
        seen: set[str] = set()
        members: list[Member] = []
        while not shared_pass.is_full(chosen, budget):
            queued = head if head is not None else _head(conn, queue_key)
            head = None
            fresh = [i for i in (q.decode() for q in queued) if i not in seen]
            if not fresh:
                break
            seen.update(fresh)
            candidates = self._queued(
                [i for i in fresh if self.footprints.may_fit(i, chosen, budget)], kinds
            )
            planned: list[Member] = []
            for record in filter(None, self.store.get_many(candidates)):  # gone: skip
                if shared_pass.is_full(chosen, budget):
                    break
                prepared = self._fitting(lm, record, chosen, budget)
                if prepared is not None:
                    chosen.append(prepared)
                    planned.append(Member(record.document, prepared))
            takes = [(m.doc.id, (queue_key, Job.key_for(m.doc.id))) for m in planned]
            for member, taken in zip(
                planned, self.store.start_many(self.worker, takes), strict=True
            ):
                if taken is None:  # cancelled meanwhile, or another worker was first
                    chosen = [p for p in chosen if p is not member.prepared]
                    continue
                members.append(member)
        return members

    def _queued(self, ids: list[str], kinds: Collection[str]) -> list[str]:
        """Those of ``ids`` still queued and of one of ``kinds``; ids of kinds that never
        share a pass are remembered as such."""
        if not ids:
            return []
        pipe = self.store.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(job_key(job_id), "kind", "status")
        found = []
        for job_id, (kind, status) in zip(ids, pipe.execute(), strict=True):
            if kind is not None and kind.decode() not in SHORT_KINDS:
                self.footprints.put(job_id, None)
            elif (
                kind is not None
                and kind.decode() in kinds
                and status == JobStatus.QUEUED.value.encode()
            ):
                found.append(job_id)
        return found

    def _fitting(
        self,
        lm: LoadedModel,
        record: JobRecord,
        chosen: list[shared_pass.Prepared],
        budget: int,
    ) -> shared_pass.Prepared | None:
        """A queued job ready for the shared pass, if it is valid and fits beside
        ``chosen``; its footprint is remembered either way."""
        job_id = record.document.id
        try:
            job = parse(record.document)
            prepared = prepare(lm, job)
            self.check_tokens(lm, job, prepared)
        except Exception:  # it fails alone, with its own error, in its turn
            prepared = None
        self.footprints.put(
            job_id, None if prepared is None else KnownFootprint(prepared.rows, prepared.length)
        )
        if prepared is None or shared_pass.padded_tokens([*chosen, prepared]) > budget:
            return None
        return prepared


def _head(conn: redis.Redis, queue_key: str) -> list[bytes]:
    return cast("list[bytes]", conn.lrange(queue_key, 0, CLAIM_SCAN - 1))


def parse(doc: JobDocument) -> JobRequest:
    return _requests.validate_python({"kind": doc.kind, "model": doc.model, **doc.params})


def prepare(lm: LoadedModel, job: JobRequest) -> shared_pass.Prepared | None:
    """The job ready for a shared pass; ``None`` if it is not batchable or is invalid (its
    handler then runs it alone and reports its error)."""
    if not shared_pass.batchable(job):
        return None
    try:
        return shared_pass.prepare(lm, job)
    except LensError:
        return None
