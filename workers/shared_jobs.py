"""Score and trace jobs run together in one padded forward pass (:mod:`workers.shared_pass`).

Two ways they meet: a score or trace job that starts takes the jobs of its kind queued
behind it for the same model (a burst; if the API is still taking jobs of that kind for
the model, it first waits for them to be queued, up to ``ModelSpec.batch_wait_ms``), and
a running chg, cchg or ablate job serves the model's queued short jobs between two of its
steps (:mod:`workers.fit_pauses`). Either way :mod:`workers.claim` takes them off the
queue up to the model's token budget, and :func:`run_shared` runs the pass and records
each job's own outcome.
"""

from __future__ import annotations

import logging

from app.schemas import JobDocument, JobKind
from workers import shared_pass
from workers.claim import SHORT_KINDS, Member
from workers.fit_pauses import FIT_KINDS, FitPauses
from workers.lens.loading import LoadedModel
from workers.outcomes import deliver, fail, free_memory
from workers.runtime import Runtime

log = logging.getLogger(__name__)


def run_burst(rt: Runtime, lm: LoadedModel, doc: JobDocument, leader: shared_pass.Prepared) -> None:
    """Run a starting score or trace job with the jobs of its kind queued behind it."""
    spec = rt.registry.specs[doc.model]
    head = rt.claims.await_submissions(spec, doc, leader)
    companions = rt.claims.take(lm, doc.model, {doc.kind}, [leader], spec.max_batch_tokens, head)
    for member in companions:
        log.info(
            "job %s: running %s on %s, batched with %s",
            member.doc.id, doc.kind, doc.model, doc.id,
        )  # fmt: skip
    run_shared(rt, lm, [Member(doc, leader), *companions])


def fit_pauses(rt: Runtime, lm: LoadedModel, doc: JobDocument) -> FitPauses | None:
    """For a fit, the hook that serves its model's queued short jobs between its steps."""
    spec = rt.registry.specs[doc.model]
    if JobKind(doc.kind) not in FIT_KINDS or spec.fit_pause_ms <= 0:
        return None

    def serve() -> int:
        members = rt.claims.take(lm, doc.model, SHORT_KINDS, [], spec.max_batch_tokens)
        for member in members:
            log.info(
                "job %s: running %s on %s, in a pause of %s",
                member.doc.id, member.doc.kind, doc.model, doc.id,
            )  # fmt: skip
        if members:
            rt.batching.in_fit_pauses += len(members)
            try:
                run_shared(rt, lm, members)
            except Exception as exc:  # a lone job's pass failed: its own failure, not the fit's
                for member in members:
                    fail(rt, member.doc.id, exc)
                free_memory()
        return len(members)

    return FitPauses(serve, spec.fit_pause_ms / 1000)


def run_shared(rt: Runtime, lm: LoadedModel, members: list[Member]) -> None:
    """One forward pass for all ``members``, then each job's result stored or its error
    recorded. If the shared pass fails (out of memory, or any error one job may have
    caused), each job runs again on its own, so one job's failure fails only that job."""
    items = [m.prepared for m in members]
    try:
        shared = shared_pass.forward(lm, items)
    except Exception as exc:
        if len(members) == 1:
            raise
        log.warning("shared pass of %d jobs failed (%s); running them one by one", len(items), exc)
        shared = None
    if shared is None:
        free_memory()
        for member in members:
            try:
                run_shared(rt, lm, [member])
            except Exception as exc:
                fail(rt, member.doc.id, exc)
        return
    rt.batching.record(len(members))
    failed = False
    for member, outcome in zip(members, shared_pass.results(lm, items, shared), strict=True):
        try:
            if isinstance(outcome, Exception):
                raise outcome
            deliver(rt, member.doc, outcome)
        except Exception as exc:
            fail(rt, member.doc.id, exc)
            failed = True
    if failed:
        del shared, outcome
        free_memory()
