"""How big a job is, counted the same way by the API (limits at submission) and the
workers (token limits, out-of-memory messages). Torch-free."""

from __future__ import annotations

from typing import Any

from app.schemas import AttributeJob, ChgJob, JobRequest

TEXT_FIELDS = (
    "texts",
    "targets",
    "retain_texts",
    "retain_targets",
    "forget_texts",
    "forget_targets",
    "eval_retain_texts",
    "eval_retain_targets",
    "eval_forget_texts",
    "eval_forget_targets",
    "sentences",
)
SIZE_PARAMS = ("num_masks", "batch_size", "num_samples", "num_updates", "num_reg_updates")


def text_fields(job: JobRequest) -> dict[str, list[str]]:
    """Every text of the job given inline, by field (data sets and patterns are not inline)."""
    found: dict[str, list[str]] = {}
    for name in TEXT_FIELDS:
        value = getattr(job, name, None)
        if value is not None:
            found[name] = [value] if isinstance(value, str) else list(value)
    if isinstance(job, AttributeJob):
        found["document"] = [job.document]
        found["summary"] = [job.summary]
    return found


def describe_size(kind: str, params: dict[str, Any]) -> str:
    """``chg: 64 texts of up to 120 characters, …, num_masks=8, batch_size=32, num_masks ×
    batch_size = 256``: what a user needs to shrink a job that did not fit."""
    parts = []
    for name in TEXT_FIELDS:
        value = params.get(name)
        if value:
            texts = [value] if isinstance(value, str) else value
            longest = max(len(t) for t in texts)
            parts.append(f"{len(texts)} {name} of up to {longest} characters")
    for name in SIZE_PARAMS:
        if params.get(name) is not None and (name != "num_samples" or params.get("pattern")):
            parts.append(f"{name}={params[name]}")
    if params.get("num_masks") and params.get("batch_size"):
        parts.append(f"num_masks × batch_size = {params['num_masks'] * params['batch_size']}")
    return f"{kind}: " + (", ".join(parts) or "no size parameters")


def pattern_samples(job: JobRequest) -> int | None:
    """Prompts a pattern-generated chg job will make, if it is one."""
    if isinstance(job, ChgJob) and job.pattern is not None:
        return job.num_samples
    return None
