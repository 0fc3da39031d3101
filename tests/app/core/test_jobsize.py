"""The size estimate the API and the workers refuse jobs by is exact where results are
deterministic in shape: every tensor of a real result, by name, dtype and shape, from
the model's published shape and the texts' token counts (a tiny Qwen3, whose heads
together are wider than its hidden size)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from app.core.config import Limits
from app.core.jobsize import TensorSpec, peak_bytes, result_bytes, result_tensors
from app.schemas import JobKind, JobRequest
from workers.context import JobContext
from workers.handlers import HANDLERS
from workers.lens.loading import LoadedModel, load_model
from workers.lens.results import AnalysisResult, Progress
from workers.lens.testing import build_tiny_model
from workers.limits import check_tokens, model_shape

_requests: TypeAdapter[JobRequest] = TypeAdapter(JobRequest)
TEXTS = ["The capital of France is Paris.", "one two three", "a b a. c d c."]
PAIRS = {"texts": TEXTS[:2], "targets": [" Rome", " four"]}
JOBS: list[dict[str, Any]] = [
    {"kind": "score", "texts": TEXTS},
    {"kind": "score", "texts": TEXTS, "top_k": 5},
    {"kind": "score", "texts": TEXTS[1], "final_token_only": True},
    {"kind": "trace", "texts": TEXTS},
    {"kind": "trace", "texts": TEXTS, "layers": [1], "positions": [0, -1], "dtype": "float16"},
    {
        "kind": "trace",
        "texts": TEXTS[:2],
        "sites": ["attn_o_proj_pre", "logits", "final_norm"],
        "positions": "last",
        "gradients": {"target": " Paris"},
    },
    {
        "kind": "chg",
        **PAIRS,
        "num_masks": 2,
        "num_updates": 2,
        "num_reg_updates": 1,
        "batch_size": 2,
        "record_history": True,
    },
    {
        "kind": "chg",
        **PAIRS,
        "num_masks": 1,
        "num_updates": 2,
        "num_reg_updates": 0,
        "batch_size": 1,
        "record_history": True,
    },
    {
        "kind": "cchg",
        "retain_texts": TEXTS[:1],
        "retain_targets": [" x"],
        "forget_texts": TEXTS[1:2],
        "forget_targets": [" y"],
        "num_updates": 2,
        "num_masks": 2,
    },
    {"kind": "ablate", **PAIRS, "head_mask": "ones"},
]


@pytest.fixture(scope="module", params=["qwen3"])
def lm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = build_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    return load_model(str(path), device="cpu")


def _job(lm: LoadedModel, body: dict[str, Any]) -> JobRequest:
    if body.get("head_mask") == "ones":
        body = body | {"head_mask": [[1.0] * lm.adapter.num_heads] * lm.adapter.num_layers}
    return _requests.validate_python({"model": "m", **body})


class _Offline(JobContext):
    """A handler's context with nowhere to report progress to."""

    def progress(self, report: Progress) -> None:
        pass


def _run(lm: LoadedModel, job: JobRequest, tmp_path: Path) -> AnalysisResult:
    ctx = _Offline(
        job_id="0" * 32,
        owner="o",
        lm=lm,
        store=None,  # type: ignore[arg-type]  # never reached: progress goes nowhere
        blob_dir=tmp_path,
        dataset_dir=tmp_path,
    )
    return HANDLERS[JobKind(job.kind)](ctx, job)


@pytest.mark.parametrize("body", JOBS, ids=lambda b: f"{b['kind']}-{len(b)}")
def test_the_estimate_names_every_tensor_of_the_result(
    lm: LoadedModel, body: dict[str, Any], tmp_path: Path
) -> None:
    job = _job(lm, body)
    shape = model_shape(lm)
    assert shape is not None
    tokens = check_tokens(job, lm.tokenizer, Limits(), tmp_path)
    result = _run(lm, job, tmp_path)
    real = {
        name: TensorSpec(str(t.dtype).removeprefix("torch."), tuple(t.shape))
        for name, t in result.tensors.items()
    }
    assert result_tensors(job, shape, tokens) == real
    size = sum(t.numel() * t.element_size() for t in result.tensors.values())
    assert result_bytes(job, shape, tokens) == size
    assert peak_bytes(job, shape, tokens) >= size
