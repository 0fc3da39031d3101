"""The shared pass on a tiny Llama: every job of a shared pass gets what it gets alone."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from app.schemas import ScoreJob, TraceJob
from workers import shared_pass
from workers.lens.errors import ContextTooLong, InvalidParameter
from workers.lens.loading import LoadedModel, load_model
from workers.lens.results import AnalysisResult
from workers.lens.scoring import score
from workers.lens.testing import build_tiny_model
from workers.lens.tracing import trace

SHORT = "a b a"
MEDIUM = "The capital of France is Paris"
LONG = "Once upon a time there was a little model that learned to count."
TOO_LONG = " ".join(["seven"] * 80)


def run_batch(
    lm: LoadedModel, items: list[shared_pass.Prepared]
) -> list[AnalysisResult | Exception]:
    """The worker's shared pass then every job's split, as the worker runs them."""
    return list(shared_pass.results(lm, items, shared_pass.forward(lm, items)))


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = build_tiny_model("llama", tmp_path_factory.mktemp("llama"))
    return load_model(str(path), device="cpu", dtype="float32")


def assert_same(got: AnalysisResult, alone: AnalysisResult) -> None:
    """Same tensor names, shapes and dtypes; integer tensors equal, floats equal up to the
    rounding of differently shaped products (and of the half types); same summary."""
    assert got.tensors.keys() == alone.tensors.keys()
    for name, expected in alone.tensors.items():
        actual = got.tensors[name]
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
        if expected.dtype == torch.float32:
            torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4, msg=name)
        elif expected.is_floating_point():  # one rounding step of the half type at most
            torch.testing.assert_close(actual, expected, msg=name)
        else:
            assert torch.equal(actual, expected), name
    assert _rounded(got.summary) == _rounded(alone.summary)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 5)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def alone(lm: LoadedModel, job: ScoreJob | TraceJob) -> AnalysisResult:
    """The job run by itself, the way its handler runs it."""
    if isinstance(job, ScoreJob):
        return score(
            lm,
            job.text_list(),
            temperature=job.temperature,
            final_token_only=job.final_token_only,
            top_k=job.top_k,
        )
    return trace(
        lm,
        job.text_list(),
        layers=job.layers,
        sites=job.sites,
        positions=job.positions,
        dtype=job.dtype.value,
    )


def run_together(lm: LoadedModel, jobs: list[ScoreJob | TraceJob]) -> list[AnalysisResult]:
    outcomes = run_batch(lm, [shared_pass.prepare(lm, job) for job in jobs])
    assert all(isinstance(o, AnalysisResult) for o in outcomes), outcomes
    return outcomes  # type: ignore[return-value]


def test_score_jobs_of_different_lengths_and_options_get_what_they_get_alone(
    lm: LoadedModel,
) -> None:
    jobs = [
        ScoreJob(model="m", texts=SHORT),
        ScoreJob(model="m", texts=[LONG, SHORT], temperature=2.5),
        ScoreJob(model="m", texts=MEDIUM, final_token_only=True, temperature=0.5),
        ScoreJob(model="m", texts=[SHORT, MEDIUM], top_k=5),
        ScoreJob(model="m", texts=[MEDIUM], top_k=3, final_token_only=True),
    ]
    prepared = [shared_pass.prepare(lm, job) for job in jobs]
    assert len({p.length for p in prepared}) == 3  # the shared pass pads most of them
    for job, got in zip(jobs, run_together(lm, jobs), strict=True):
        assert_same(got, alone(lm, job))


def test_trace_jobs_keep_their_own_layers_sites_positions_and_dtype(lm: LoadedModel) -> None:
    jobs = [
        TraceJob(model="m", texts=[SHORT, LONG]),
        TraceJob(model="m", texts=MEDIUM, layers=[1], sites=["logits", "mlp_output"]),
        TraceJob(
            model="m", texts=[LONG, MEDIUM], layers=[0], sites=["attn_o_proj_pre"], dtype="float16"
        ),
        TraceJob(model="m", texts=[MEDIUM, SHORT], positions="last", sites=["final_norm"]),
        TraceJob(
            model="m",
            texts=[LONG, SHORT],
            positions=[0, -1],
            sites=["block_output", "logits"],
            dtype="bfloat16",
        ),
    ]
    for job, got in zip(jobs, run_together(lm, jobs), strict=True):
        assert_same(got, alone(lm, job))


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_one_job_alone_is_exactly_its_own_pass(lm: LoadedModel, temperature: float) -> None:
    job = ScoreJob(model="m", texts=[SHORT, LONG], temperature=temperature)
    [got] = run_together(lm, [job])
    for name, expected in alone(lm, job).tensors.items():
        assert torch.equal(got.tensors[name], expected), name


@pytest.mark.parametrize(
    ("job", "error", "field"),
    [
        (ScoreJob(model="m", texts=[SHORT, TOO_LONG]), ContextTooLong, "texts"),
        (ScoreJob(model="m", texts=SHORT, top_k=100_000), InvalidParameter, "top_k"),
        (  # the API refuses it; the worker checks again (a job queued by any client)
            ScoreJob.model_construct(model="m", texts=SHORT, temperature=float("inf")),
            InvalidParameter,
            "temperature",
        ),
        (TraceJob(model="m", texts=SHORT, layers=[7]), InvalidParameter, "layers"),
        (TraceJob(model="m", texts=[SHORT, LONG], positions=[5]), InvalidParameter, "positions"),
    ],
)
def test_prepare_rejects_what_the_job_alone_rejects(
    lm: LoadedModel, job: ScoreJob | TraceJob, error: type[Exception], field: str
) -> None:
    with pytest.raises(error) as caught:
        shared_pass.prepare(lm, job)
    assert caught.value.field == field  # type: ignore[attr-defined]
    with pytest.raises(error) as caught:
        alone(lm, job)
    assert caught.value.field == field  # type: ignore[attr-defined]


def test_a_failing_split_fails_only_its_job(
    lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shared_pass._score_result

    def flaky(lm: LoadedModel, item: shared_pass.Prepared, job: ScoreJob, raw: torch.Tensor):
        if job.temperature == 3.0:
            raise RuntimeError("boom")
        return real(lm, item, job, raw)

    monkeypatch.setattr(shared_pass, "_score_result", flaky)
    jobs = [
        ScoreJob(model="m", texts=t, temperature=x)
        for t, x in [(SHORT, 1.0), (LONG, 3.0), (MEDIUM, 2.0)]
    ]
    outcomes = run_batch(lm, [shared_pass.prepare(lm, job) for job in jobs])
    assert isinstance(outcomes[1], RuntimeError)
    for i in (0, 2):
        assert isinstance(outcomes[i], AnalysisResult)
        assert_same(outcomes[i], alone(lm, jobs[i]))


def test_token_budget_counts_padding(lm: LoadedModel) -> None:
    short = shared_pass.prepare(lm, ScoreJob(model="m", texts=[SHORT, SHORT]))
    long = shared_pass.prepare(lm, ScoreJob(model="m", texts=LONG))
    assert shared_pass.padded_tokens([short]) == 2 * short.length
    assert shared_pass.padded_tokens([short, long]) == 3 * long.length
    assert shared_pass.is_full([short, long], 3 * long.length)
    assert not shared_pass.is_full([short, long], 4 * long.length)


def test_only_score_and_gradient_free_trace_jobs_are_batchable() -> None:
    assert shared_pass.batchable(ScoreJob(model="m", texts=SHORT))
    assert shared_pass.batchable(TraceJob(model="m", texts=SHORT))
    with_gradients = TraceJob(model="m", texts=SHORT, gradients={"target": " b"})
    assert not shared_pass.batchable(with_gradients)
