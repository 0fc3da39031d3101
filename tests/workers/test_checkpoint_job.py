"""A chg or cchg job's ``checkpoint_above`` (the API schema's field) is what its handler
fits with."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import TypeAdapter

from app.schemas import JobKind, JobRequest
from tests.workers.lens.test_checkpointing import OFF, PROMPTS, TARGETS, counting_block_calls
from workers.context import JobContext
from workers.handlers import HANDLERS
from workers.lens.gated_forward import shortcuts
from workers.lens.loading import LoadedModel, load_model
from workers.lens.results import Progress
from workers.lens.testing import build_tiny_model


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    lm = load_model(str(build_tiny_model("llama", tmp_path_factory.mktemp("llama"))))
    shortcuts(lm)  # its one-time check runs passes of its own, not counted
    return lm


class _Offline(JobContext):
    """A handler's context with nowhere to report progress to."""

    def progress(self, report: Progress) -> None:
        pass


@pytest.mark.parametrize("kind", ["chg", "cchg"])
def test_the_job_field_reaches_the_fit(lm: LoadedModel, kind: str, tmp_path: Path) -> None:
    if kind == "chg":
        body = {"texts": PROMPTS, "targets": TARGETS, "num_masks": 1, "num_reg_updates": 0}
    else:
        body = {
            "retain_texts": PROMPTS[:2],
            "retain_targets": TARGETS[:2],
            "forget_texts": PROMPTS[2:],
            "forget_targets": TARGETS[2:],
        }
    ctx = _Offline(
        job_id="0" * 32,
        owner="o",
        lm=lm,
        store=None,  # type: ignore[arg-type]  # never reached: progress goes nowhere
        blob_dir=tmp_path,
        dataset_dir=tmp_path,
    )
    runs = []
    for above in (OFF, 1):
        job = TypeAdapter(JobRequest).validate_python(
            {"kind": kind, "model": "m", **body, "num_updates": 1, "checkpoint_above": above}
        )
        with counting_block_calls(lm) as calls:
            HANDLERS[JobKind(kind)](ctx, job)
        runs.append(len(calls))
    # The same passes, plus a recomputation of each differentiated one: chg's one update
    # is one pass, cchg's a retain and a forget pass (its evaluation is not differentiated).
    assert runs[1] - runs[0] == (1 if kind == "chg" else 2)
