"""The job kinds, each declared once: everything else that lists kinds is derived from here.

A kind names its request model (a class of :mod:`app.schemas`), its handler (a dotted
path the workers import, RQ-style, so that ``app`` never imports torch), its result type
(a class of :mod:`app.client.results`), whether its jobs can share a forward pass and
whether they report progress after each step. Names, not classes: this module imports
nothing, so the client and its CLI read the table without pydantic, and neither side
imports the other. ``tests/app/test_kind_registry.py`` checks that every name resolves
and that the client, the CLI and the dashboard agree with the table. Adding a kind:
``docs/adding-a-job-kind.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class JobKind(StrEnum):
    SCORE = "score"
    TRACE = "trace"
    CHG = "chg"
    ABLATE = "ablate"
    CCHG = "cchg"
    ATTRIBUTE = "attribute"


@dataclass(frozen=True)
class KindSpec:
    """One job kind. ``request``: its model's class name in :mod:`app.schemas`;
    ``handler``: ``module.function`` run by a worker; ``result``: its class name in
    :mod:`app.client.results`; ``batchable``: its jobs may share a forward pass with
    others of the model (:mod:`workers.shared_pass` still refuses the ones that cannot);
    ``progress``: it reports progress after every step (so a fit can pause there for
    short jobs, and the client shows a bar)."""

    kind: JobKind
    request: str
    handler: str
    result: str
    batchable: bool = False
    progress: bool = False


_SPECS = (
    KindSpec(
        JobKind.SCORE, "ScoreJob", "workers.handlers.run_score", "ScoreResult", batchable=True
    ),
    KindSpec(
        JobKind.TRACE, "TraceJob", "workers.handlers.run_trace", "TraceResult", batchable=True
    ),
    KindSpec(JobKind.CHG, "ChgJob", "workers.handlers.run_chg", "ChgResult", progress=True),
    KindSpec(
        JobKind.ABLATE, "AblateJob", "workers.handlers.run_ablate", "AblateResult", progress=True
    ),
    KindSpec(JobKind.CCHG, "CchgJob", "workers.handlers.run_cchg", "CchgResult", progress=True),
    KindSpec(
        JobKind.ATTRIBUTE, "AttributeJob", "workers.handlers.run_attribute", "AttributeResult"
    ),
)

KINDS: dict[JobKind, KindSpec] = {spec.kind: spec for spec in _SPECS}
"""Every kind's declaration."""


class KindTableError(ValueError):
    """The kind table and :class:`JobKind` disagree."""


if len(KINDS) != len(_SPECS) or set(KINDS) != set(JobKind):
    raise KindTableError(
        f"app.kinds: each JobKind needs exactly one KindSpec; kinds {sorted(JobKind)}, "
        f"specs {[spec.kind.value for spec in _SPECS]}"
    )

BATCHABLE_KINDS = frozenset(k for k, spec in KINDS.items() if spec.batchable)
PROGRESS_KINDS = frozenset(k for k, spec in KINDS.items() if spec.progress)


def handler_path(kind: str) -> tuple[str, str]:
    """(module, function) of a kind's handler."""
    module, _, name = KINDS[JobKind(kind)].handler.rpartition(".")
    return module, name
