"""The Python client against the running service (real Redis, worker and HTTP).

Each call is checked against the raw HTTP answer of the same job, and against
numbers computed independently (an in-process forward pass, the paper's role
table applied to the returned gates).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load
from transformers import AutoModelForCausalLM, AutoTokenizer

from app import __version__
from app.client import (
    AsyncLensClient,
    ChgResult,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    LensClient,
    NotFound,
    Progress,
    ScoreResult,
    TraceResult,
    Unauthorized,
    VersionMismatch,
    load_result,
)
from app.stack import Stack
from tests.conftest import DEMO, service_settings
from tests.waiting import poll_job

TEXTS = ["red cat blue dog | red cat blue", "one two three | one two"]
PROMPTS = ["red cat blue dog | red cat blue", "sun tree cup | sun tree", "one two | one"]
TARGETS = [" dog", " cup", " two"]
ALICE, BOB = "alice-client-test-key-0123", "bob-client-test-key-4567"


@pytest.fixture(scope="module")
def lens(service: Stack):
    with LensClient(service.url, progress=False, tensors="torch") as client:
        yield client


@pytest.fixture(scope="module")
def demo(lens: LensClient):
    return lens.model(DEMO)


def raw_result(http: httpx.Client, job_id: str) -> dict[str, torch.Tensor]:
    """The job's result file as fetched with plain HTTP, once the job has succeeded."""
    assert poll_job(http, job_id, timeout=120)["status"] == "succeeded"
    response = http.get(f"/v1/jobs/{job_id}/result")
    assert response.status_code == 200, response.text
    return load(response.content)


def test_score_matches_raw_http_and_an_in_process_forward(demo, http, demo_model_dir: Path):
    scores = demo.score(TEXTS, temperature=2.0)
    assert isinstance(scores, ScoreResult) and scores.model == DEMO
    raw = raw_result(http, scores.job_id)
    assert torch.equal(scores.logits, raw["logits"])
    torch.testing.assert_close(scores.log_probs, torch.log_softmax(raw["logits"], -1))
    torch.testing.assert_close(scores.probs, torch.softmax(raw["logits"], -1))
    torch.testing.assert_close(
        scores.final_token_probs(), torch.softmax(raw["final_token_logits"], -1)
    )
    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir).eval()
    for row, text in enumerate(TEXTS):
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = model(ids).logits[0] / 2.0
        n = ids.shape[1]
        torch.testing.assert_close(scores.logits[row, :n], expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            scores.final_token_logits()[row], expected[-1], atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(
            scores.gather_log_probs(scores.input_ids)[row, :n],
            torch.log_softmax(expected, -1).gather(-1, ids[0, :, None])[:, 0],
            atol=1e-4, rtol=1e-4,
        )  # fmt: skip


def test_trace_quick_start_matches_raw_http(demo, http):
    trace = demo.trace(
        texts="red cat blue dog | red cat",
        layers=[0],
        sites=["attn_o_proj_pre", "final_norm", "logits"],
    )
    assert isinstance(trace, TraceResult)
    raw = raw_result(http, trace.job_id)
    assert trace.available_sites == ["attn_o_proj_pre", "final_norm", "logits"]
    assert torch.equal(trace.get("attn_o_proj_pre", 0), raw["attn_o_proj_pre.0"])
    assert torch.equal(trace.get("final_norm"), raw["final_norm"])
    assert torch.equal(trace.final_logits, raw["final_logits"])
    torch.testing.assert_close(trace.final_log_probs(), torch.log_softmax(raw["final_logits"], -1))
    torch.testing.assert_close(trace.layer_probs(0), torch.softmax(raw["logits.0"].float(), -1))
    assert trace.tokens is not None and trace.tokens[0][-2:] == ["red", "cat"]
    with pytest.raises(KeyError, match="layer 1"):
        trace.get("attn_o_proj_pre", 1)


def test_fit_quick_start_reports_progress_and_the_papers_taxonomy(demo, http):
    seen: list[Progress] = []
    results = demo.fit(
        texts=PROMPTS, targets=TARGETS, num_masks=2, num_updates=3, num_reg_updates=2,
        batch_size=2, seed=0, on_progress=seen.append,
    )  # fmt: skip
    assert isinstance(results, ChgResult)
    stages = {p.stage for p in seen}  # the two regularised fits may report as one joint stage
    assert "none" in stages and any("positive" in s for s in stages), stages
    assert any("negative" in s for s in stages), stages
    assert all(1 <= p.step <= p.total for p in seen)
    raw = raw_result(http, results.job_id)
    for stage in ("none", "positive", "negative"):
        assert torch.equal(results.masks[stage], raw[f"masks.{stage}"])
    # The consensus roles, recomputed here from the README's rules on the returned gates:
    # each mask's role from the paper's scores, unsupported roles undetermined (4), and the
    # role of more than half of the masks.
    g_plus, g_minus = raw["masks.positive"], raw["masks.negative"]
    fac, inter = g_minus >= 0.5, 1 - g_plus >= 0.5
    irr = g_plus * (1 - g_minus) >= 0.5
    per_mask = torch.where(
        fac & inter, 3, torch.where(fac, 1, torch.where(inter, 2, torch.where(irr, 0, 4)))
    )
    per_mask = torch.where((raw["gate_signal"] < 1) & (per_mask != 0), 4, per_mask)
    assert torch.equal(raw["mask_roles"].long(), per_mask)
    counts = torch.stack([(per_mask == code).sum(0) for code in range(4)])
    best, code = counts.max(dim=0)
    expected = torch.where(best * 2 > per_mask.shape[0], code, 4)
    assert torch.equal(results.taxonomy.long(), expected)
    records = results.head_taxonomy()
    assert len(records) == raw["masks.positive"].shape[1] * raw["masks.positive"].shape[2]
    facilitating = [tuple(ix) for ix in (expected == 1).nonzero().tolist()]
    assert results.facilitating_heads() == facilitating
    assert torch.equal(results.get_facilitating_mask(), (expected == 1).float())
    assert results.summary()["roles"]["facilitating"] == len(facilitating)


def test_submit_then_reattach_from_another_client(demo, service: Stack):
    job = demo.submit("score", texts=TEXTS)
    with LensClient(service.url, progress=False, tensors="numpy") as other:
        again = other.job(job.id)
        assert again.wait(timeout=120) == "succeeded"
        from_other = again.result()
    mine = job.result()
    assert job.status() == "succeeded"
    np.testing.assert_array_equal(from_other.logits, mine.logits.numpy())


def test_download_round_trip(demo, tmp_path: Path):
    job = demo.submit("score", texts="one two | one", final_token_only=True)
    path = job.download(tmp_path / "r.safetensors", timeout=120)
    loaded = load_result(path, tensors="numpy")
    assert isinstance(loaded, ScoreResult) and loaded.job_id == job.id
    assert "logits" not in loaded and loaded.final_token_probs().shape[0] == 1


def test_errors_map_to_exceptions(lens: LensClient, demo):
    with pytest.raises(NotFound) as missing:
        lens.job("0" * 32)
    assert missing.value.status == 404
    with pytest.raises(NotFound, match="not served"):
        lens.model("no-such-model").score("red cat")
    with pytest.raises(NotFound):
        lens.model("no-such-model").info()
    assert demo.info()["heads"] == 8 and demo.info()["worker_alive"]
    with pytest.raises(InvalidRequest) as invalid:
        demo.score("red cat", temperature=-1.0)
    assert invalid.value.status == 422 and "temperature" in str(invalid.value)
    # Longer than the demo model's context: the API cannot tell (it has no tokenizer), the
    # worker rejects it, and the job fails with the worker's error.
    with pytest.raises(JobFailed) as failed:
        demo.score(" ".join(["red"] * 300))
    assert failed.value.job_status == "failed" and failed.value.error_type
    assert "context" in failed.value.error_message.lower()


def test_async_client_runs_the_same_calls(service: Stack, demo):
    async def main():
        async with AsyncLensClient(service.url, progress=False, tensors="torch") as client:
            model = client.model(DEMO)
            scores = await model.score(TEXTS, temperature=2.0)
            job = await model.submit("score", texts=TEXTS, temperature=2.0)
            assert await job.wait(timeout=120) == "succeeded"
            with pytest.raises(NotFound):
                await client.job("0" * 32)
            return scores, await job.result()

    scores, again = asyncio.run(main())
    assert torch.equal(scores.logits, again.logits)
    assert torch.equal(scores.logits, demo.score(TEXTS, temperature=2.0).logits)


@pytest.fixture(scope="module")
def keyed_api(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[str]:
    """An API with two keys and no worker (jobs stay queued): enough to test auth."""
    settings = service_settings(
        tmp_path_factory.mktemp("keyed"), {DEMO: demo_model_dir}, api_keys=[ALICE, BOB]
    )
    stack = Stack(settings)
    try:
        stack.start(workers=0)
        stack.wait_api()
        yield stack.url
    finally:
        stack.stop()


def test_keys_map_to_unauthorized_and_other_keys_jobs_are_not_found(keyed_api: str):
    with pytest.raises(Unauthorized) as anonymous:
        LensClient(keyed_api, progress=False).models()
    assert anonymous.value.status == 401 and "LENS_API_KEY" in str(anonymous.value)
    with pytest.raises(Unauthorized, match="invalid API key"):
        LensClient(keyed_api, api_key="wrong", progress=False).models()
    alice = LensClient(keyed_api, api_key=ALICE, progress=False)
    bob = LensClient(keyed_api, api_key=BOB, progress=False)
    job = alice.model(DEMO).submit("score", texts="red cat")
    assert job.status() == "queued"
    with pytest.raises(NotFound):
        bob.job(job.id)
    assert [j.id for j in alice.jobs()] == [job.id] and bob.jobs() == []
    assert job.cancel() == "cancelled"
    with pytest.raises(JobCancelled):
        alice.job(job.id).result(timeout=10)


def test_an_incompatible_client_version_is_named(keyed_api: str, monkeypatch):
    monkeypatch.setattr("app.client._http.__version__", "9.0.0")
    with pytest.raises(VersionMismatch) as caught:
        LensClient(keyed_api, api_key=ALICE, progress=False).models()
    message = str(caught.value)
    assert caught.value.status == 426
    assert "9.0.0" in message and __version__ in message
