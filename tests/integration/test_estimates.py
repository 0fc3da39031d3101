"""The estimate made at submission, through the real service (the demo model, whose
worker published its tokenizer): a score and a trace job's estimated result bytes are
the downloaded result's tensor bytes, exactly, where the old byte-based guess was off."""

from __future__ import annotations

import json
from typing import Any

import httpx
from pydantic import TypeAdapter

from app.core import jobsize
from app.schemas import JobRequest, ModelInfo
from tests.conftest import DEMO
from tests.integration.test_service import submit, wait

TEXTS = ["red cat blue dog | red cat blue", "漢字かなカナ 한국어 | café", "  one\ttwo \n\n three  "]


def tensor_bytes(blob: bytes) -> int:
    """Bytes of a safetensors file's tensors, from its header."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    header.pop("__metadata__", None)
    return sum(end - begin for begin, end in (t["data_offsets"] for t in header.values()))


def guessed_bytes(body: dict[str, Any], info: ModelInfo) -> int:
    """What the API estimated before it counted tokens."""
    job = TypeAdapter(JobRequest).validate_python({"model": DEMO, **body})
    shape = jobsize.ModelShape.of(info)
    assert shape is not None
    return jobsize.result_bytes(job, shape, jobsize.guessed_tokens(job, None))


def test_the_estimate_at_submission_is_the_result_size(http: httpx.Client) -> None:
    info = ModelInfo.model_validate(http.get(f"/v1/models/{DEMO}").json())
    assert info.tokenizer_sha256 is not None
    jobs = {
        "score": {"kind": "score", "texts": TEXTS},
        "trace": {"kind": "trace", "texts": TEXTS[1]},
    }
    submitted = {kind: submit(http, **body) for kind, body in jobs.items()}
    for kind, doc in submitted.items():
        estimate = doc["estimate"]
        assert estimate["tokens"] == "counted", kind
        assert wait(http, doc["id"])["status"] == "succeeded", kind
        real = tensor_bytes(http.get(f"/v1/jobs/{doc['id']}/result").content)
        assert estimate["result_bytes"] == real, kind
        assert estimate["peak_bytes"] >= real, kind
        assert guessed_bytes(jobs[kind], info) != real, kind
