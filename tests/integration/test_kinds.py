"""Every job kind through the real service: chg feeding ablate and attribute, trace
gradients, contrastive CHG, and cancelling a running fit."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import torch

from tests.integration.test_service import result, submit, wait
from workers.lens.demo import copy_task_examples


@pytest.fixture(scope="module")
def copy_data() -> tuple[list[str], list[str]]:
    return copy_task_examples(24, seed=3)


@pytest.fixture(scope="module")
def chg_job(service, copy_data) -> dict[str, Any]:
    prompts, targets = copy_data
    with httpx.Client(base_url=service.url, timeout=60) as http:
        doc = submit(
            http,
            kind="chg",
            texts=prompts,
            targets=targets,
            num_masks=2,
            num_updates=40,
            num_reg_updates=40,
            batch_size=8,
            seed=0,
        )
        return wait(http, doc["id"], timeout=300)


def test_chg_result_has_the_design_tensors(http: httpx.Client, chg_job: dict[str, Any]) -> None:
    assert chg_job["status"] == "succeeded", chg_job["error"]
    tensors = result(http, chg_job["id"])
    for stage in ("none", "positive", "negative"):
        assert tensors[f"masks.{stage}"].shape == (2, 3, 8)
        assert ((tensors[f"masks.{stage}"] >= 0) & (tensors[f"masks.{stage}"] <= 1)).all()
    assert tensors["nll.none"].shape == (40,)
    assert tensors["taxonomy"].dtype == torch.int8 and tensors["taxonomy"].shape == (3, 8)
    torch.testing.assert_close(tensors["scores.facilitation"], tensors["masks.negative"])
    torch.testing.assert_close(tensors["scores.interference"], 1 - tensors["masks.positive"])
    assert chg_job["progress"]["stage"] and chg_job["progress"]["step"] == 40


def test_ablate_from_chg_job_is_causal(
    http: httpx.Client, chg_job: dict[str, Any], copy_data
) -> None:
    prompts, targets = copy_data
    figures = {}
    for keep in ("sufficient", "remove_facilitating"):
        doc = submit(
            http, kind="ablate", texts=prompts, targets=targets, from_job=chg_job["id"], keep=keep
        )
        final = wait(http, doc["id"])
        assert final["status"] == "succeeded", final["error"]
        figures[keep] = final["summary"]
    assert figures["sufficient"]["masked_nll"] < figures["sufficient"]["baseline_nll"] + 0.5
    assert figures["remove_facilitating"]["masked_nll"] > figures["sufficient"]["masked_nll"] + 1.0


def test_attribute_through_the_chg_circuit(http: httpx.Client, chg_job: dict[str, Any]) -> None:
    document = "red cat blue dog . sun tree cup hat ."
    doc = submit(
        http,
        kind="attribute",
        document=document,
        sentences=["red cat blue dog .", "sun tree cup hat ."],
        summary="| red cat blue dog",
        from_job=chg_job["id"],
        keep="facilitating",
    )
    final = wait(http, doc["id"])
    assert final["status"] == "succeeded", final["error"]
    scores = final["summary"]["scores"]
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
    tensors = result(http, doc["id"])
    assert tensors["token_grad_norms"].shape == tensors["token_sentence"].shape


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"from_job": "0" * 32, "keep": "facilitating"}, 404, "from_job"),
        ({"head_mask": [[1.0] * 4] * 3}, 422, "head_mask"),
    ],
)
def test_ablate_rejects_bad_masks(
    http: httpx.Client, body: dict[str, Any], status: int, field: str
) -> None:
    r = http.post(
        "/v1/jobs",
        json={"kind": "ablate", "model": "demo", "texts": ["a"], "targets": [" b"], **body},
    )
    assert r.status_code == status, r.text
    assert field in json.dumps(r.json()["detail"])


def test_from_job_must_be_a_chg_job(http: httpx.Client) -> None:
    score = submit(http, kind="score", texts="red cat")
    wait(http, score["id"])
    r = http.post(
        "/v1/jobs",
        json={"kind": "ablate", "model": "demo", "texts": ["a"], "targets": [" b"],
              "from_job": score["id"], "keep": "facilitating"},
    )  # fmt: skip
    assert r.status_code == 422 and "not a chg job" in r.text


def test_trace_gradients_follow_positions_and_dtype(http: httpx.Client) -> None:
    texts = ["red cat blue dog | red cat", "sun tree cup | sun"]
    base = {"kind": "trace", "texts": texts, "layers": [1], "sites": ["block_input"]}
    grads = {"target": " blue"}
    full = submit(http, **base, gradients=grads)
    small = submit(http, **base, gradients=grads, positions="last", dtype="float16")
    full_t = result(http, wait(http, full["id"])["id"])
    assert wait(http, small["id"])["status"] == "succeeded"
    small_t = result(http, small["id"])
    g = full_t["grad.block_input.1"]
    assert g.shape[:2] == full_t["block_input.1"].shape[:2] and g.abs().sum() > 0
    last = full_t["attention_mask"].sum(1) - 1
    expected = g[torch.arange(2), last][:, None].to(torch.float16)
    assert small_t["grad.block_input.1"].dtype == torch.float16
    torch.testing.assert_close(small_t["grad.block_input.1"], expected)


def test_cchg_runs_through_the_service(http: httpx.Client) -> None:
    retain, retain_t = copy_task_examples(8, seed=11)
    forget, forget_t = copy_task_examples(8, seed=12, length=4)
    doc = submit(
        http,
        kind="cchg",
        retain_texts=retain,
        retain_targets=retain_t,
        forget_texts=forget,
        forget_targets=forget_t,
        num_updates=10,
        batch_size=8,
        seed=0,
    )
    final = wait(http, doc["id"], timeout=300)
    assert final["status"] == "succeeded", final["error"]
    tensors = result(http, doc["id"])
    assert tensors["masks.contrastive"].shape == (1, 3, 8)
    assert tensors["nll.retain"].shape == (10,)


def test_cancelling_a_running_chg_stops_it_within_an_update(http: httpx.Client, copy_data) -> None:
    prompts, targets = copy_data
    doc = submit(
        http, kind="chg", texts=prompts, targets=targets, num_masks=2, num_updates=100_000 // 20,
        num_reg_updates=0, batch_size=4,
    )  # fmt: skip
    steps = []
    with http.stream("GET", f"/v1/jobs/{doc['id']}/events", timeout=120) as r:
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event == "progress":
                steps.append(json.loads(line.removeprefix("data: "))["step"])
                if len(steps) == 3:
                    cancel = http.delete(f"/v1/jobs/{doc['id']}")
                    assert cancel.status_code == 202
                    at_cancel = cancel.json()["progress"]["step"]
            elif line.startswith("data: ") and event == "status":
                status = json.loads(line.removeprefix("data: "))["status"]
                if status in ("succeeded", "failed", "cancelled"):
                    break
    assert status == "cancelled"
    # the update running when the cancel landed is the last one: it publishes nothing more
    assert max(steps) <= at_cancel, (steps, at_cancel)
