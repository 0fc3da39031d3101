"""``positions``, ``dtype`` and ``top_k`` through the service: slices of the full result."""

from __future__ import annotations

import json
from typing import Any

import httpx
import torch
from safetensors.torch import load

from tests.conftest import DEMO

TEXTS = ["red cat blue dog | red cat blue", "one two | one"]


def run(http: httpx.Client, **body: Any) -> dict[str, torch.Tensor]:
    """Submit, follow the event stream to the end, download the result."""
    r = http.post("/v1/jobs", json={"model": DEMO, **body})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    with http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=120) as events:
        for line in events.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:]).get("status") in (
                "succeeded",
                "failed",
                "cancelled",
            ):
                assert json.loads(line[6:])["status"] == "succeeded", line
                break
    r = http.get(f"/v1/jobs/{job_id}/result")
    assert r.status_code == 200, r.text
    return load(r.content)


def test_top_k_is_the_top_of_the_full_logits(http: httpx.Client) -> None:
    full = run(http, kind="score", texts=TEXTS, temperature=2.0)
    small = run(http, kind="score", texts=TEXTS, temperature=2.0, top_k=4)
    assert "logits" not in small
    values, ids = full["logits"].topk(4, dim=-1)
    torch.testing.assert_close(small["top_k_logits"], values, atol=1e-5, rtol=1e-5)
    assert torch.equal(small["top_k_ids"], ids)
    torch.testing.assert_close(small["final_token_logits"], full["final_token_logits"])


def test_trace_positions_and_dtype_are_slices_of_the_full_trace(http: httpx.Client) -> None:
    sites = ["block_output", "logits"]
    full = run(http, kind="trace", texts=TEXTS, layers=[1], sites=sites)
    last = run(
        http, kind="trace", texts=TEXTS, layers=[1], sites=sites, positions="last", dtype="float16"
    )
    listed = run(
        http,
        kind="trace",
        texts=TEXTS,
        layers=[1],
        sites=sites,
        positions=[0, -2],
        dtype="bfloat16",
    )
    lengths = full["attention_mask"].sum(1)
    rows = torch.arange(len(TEXTS))
    last_index = (lengths - 1)[:, None]
    listed_index = torch.stack([torch.zeros_like(lengths), lengths - 2], dim=1)
    assert torch.equal(last["positions"], last_index)
    assert torch.equal(listed["positions"], listed_index)
    for result, index, dtype in (
        (last, last_index, torch.float16),
        (listed, listed_index, torch.bfloat16),
    ):
        for name in ("block_output.1", "logits.1"):
            want = full[name][rows[:, None], index]
            assert result[name].dtype == dtype and result[name].shape == want.shape
            torch.testing.assert_close(result[name], want.to(dtype))
        want = full["final_logits"][rows[:, None], index]
        torch.testing.assert_close(result["final_logits"], want, atol=1e-5, rtol=1e-5)
