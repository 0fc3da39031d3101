"""Every supported family served for real: one worker holds a tiny model of each, and
score, trace, chg, ablate and attribute jobs succeed on all of them; score and trace
results are the size estimated at submission."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.stack import Stack
from tests.conftest import running_stack, service_settings
from tests.integration.test_estimates import tensor_bytes
from tests.integration.test_service import submit, wait
from workers.lens.testing import FAMILIES, build_tiny_model

PROMPTS = ["The capital of France is", "One two three"]
TARGETS = [" Paris.", " four"]


@pytest.fixture(scope="module")
def family_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    models_dir = tmp_path_factory.mktemp("families")
    models = {f: build_tiny_model(f, models_dir / f) for f in FAMILIES}
    settings = service_settings(tmp_path_factory.mktemp("family-service"), models)
    with running_stack(settings, timeout=300) as stack:
        yield stack


@pytest.fixture(scope="module")
def client(family_service: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=family_service.url, timeout=60) as http:
        yield http


def test_models_report_their_geometry(client: httpx.Client, tmp_path: Path) -> None:
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(models) == set(FAMILIES)
    for name, info in models.items():
        for field in ("family", "layers", "heads", "kv_heads", "head_dims", "vocab_size"):
            assert info[field], (name, field)
        assert info["worker_alive"] and info["kv_heads"] <= info["heads"]
        assert len(info["head_dims"]) == info["layers"]
        uniform = len(set(info["head_dims"])) == 1
        assert info["head_dim"] == (info["head_dims"][0] if uniform else None), name
    assert models["gemma4_text"]["head_dims"] == [16, 32, 32]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_kind_succeeds(client: httpx.Client, family: str) -> None:
    info = client.get(f"/v1/models/{family}").json()
    mask = [[1.0] * info["heads"] for _ in range(info["layers"])]
    mask[0][0] = 0.0
    jobs = {
        "score": {"kind": "score", "texts": PROMPTS, "top_k": 3},
        "trace": {"kind": "trace", "texts": PROMPTS, "positions": "last"},
        "chg": {
            "kind": "chg", "texts": PROMPTS, "targets": TARGETS, "num_masks": 2,
            "num_updates": 2, "num_reg_updates": 2, "batch_size": 2, "seed": 0,
        },
        "ablate": {"kind": "ablate", "texts": PROMPTS, "targets": TARGETS, "head_mask": mask},
        "attribute": {
            "kind": "attribute", "document": "One two. Three four.",
            "sentences": ["One two.", "Three four."], "summary": " five", "facilitating_mask": mask,
        },
    }  # fmt: skip
    submitted = {kind: submit(client, model=family, **body) for kind, body in jobs.items()}
    for kind, doc in submitted.items():
        final = wait(client, doc["id"], timeout=300)
        assert final["status"] == "succeeded", (family, kind, final["error"])
    for kind in ("score", "trace"):  # the estimate made at submission, with counted tokens
        doc = submitted[kind]
        real = tensor_bytes(client.get(f"/v1/jobs/{doc['id']}/result").content)
        assert doc["estimate"] == {**doc["estimate"], "result_bytes": real, "tokens": "counted"}
    ablated = wait(client, submitted["ablate"]["id"])["summary"]
    assert ablated["heads_on"] == ablated["heads_total"] - 1
