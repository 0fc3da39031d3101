"""Token and result limits end to end through the API and the real worker code, run
in-process in burst mode: checked by the worker (the backstop) for jobs submitted before
any worker published the model's tokenizer, and by the API at submission after."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from app.core.config import Limits, ModelSpec, Settings
from app.core.jobsize import TensorSpec
from app.core.redis_server import RedisServer
from app.main import create_app
from tests.conftest import JSONL, LOCAL
from workers.limits import LimitExceeded, check_result_size, is_out_of_memory, out_of_memory_message
from workers.process import run_worker

LIMITS = Limits(max_tokens_per_text=8, max_tokens_per_job=20, max_result_bytes=20_000)


@pytest.fixture
def settings(
    redis_server: RedisServer, redis_conn: redis.Redis, tmp_path: Path, demo_model_dir: Path
) -> Settings:
    return Settings(
        redis_url=redis_server.url,
        data_dir=tmp_path,
        models={"demo": ModelSpec(source=str(demo_model_dir))},
        limits=LIMITS,
        # its worker runs in this process (drain): leave pytest's priority and malloc alone
        worker_nice=0,
        worker_keep_freed_mib=0,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), base_url=LOCAL) as c:
        yield c


@pytest.fixture(scope="module")
def tokens(demo_model_dir: Path):
    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    return lambda text: len(tok(text)["input_ids"])


def drain(settings: Settings) -> None:
    """Run every queued job with a real worker in this process, then return."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        run_worker(settings, name="in-process", burst=True)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def submit(client: TestClient, **body: Any) -> str:
    r = client.post("/v1/jobs", json={"model": "demo", **body})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_token_and_result_limits_fail_the_job_by_name(
    client: TestClient, settings: Settings, tokens
) -> None:
    long_text = "red cat blue dog red cat blue dog red"
    short = "red cat blue dog | red"
    assert tokens(long_text) == 10 > 8 and tokens(short) == 7
    ok = submit(client, kind="score", texts=short, final_token_only=True)
    too_long = submit(client, kind="score", texts=[short, long_text])
    too_many = submit(client, kind="score", texts=[short, short, short])
    rows = "\n".join(
        json.dumps(r)
        for r in ({"prompt": short, "target": " cat"}, {"prompt": long_text, "target": " cat"})
    )
    dataset = client.post("/v1/datasets", content=rows, headers=JSONL).json()["id"]
    from_dataset = submit(client, kind="chg", dataset=dataset, num_updates=1, num_reg_updates=0)
    # 2 layers × 10 sites × [1, 7, 64] float32 alone is 2 × 10 × 1792 bytes > 20 000
    too_big = submit(client, kind="trace", texts=short)
    drain(settings)

    def doc(job_id: str) -> dict[str, Any]:
        return client.get(f"/v1/jobs/{job_id}").json()

    assert doc(ok)["status"] == "succeeded"
    for job_id, field, limit in (
        (too_long, "texts", "a text of 10 tokens exceeds the limit max_tokens_per_text = 8"),
        (too_many, "texts", "21 tokens in all exceed the limit max_tokens_per_job = 20"),
        (from_dataset, "dataset.prompt", "10 tokens exceeds the limit max_tokens_per_text = 8"),
    ):
        d = doc(job_id)
        assert d["status"] == "failed", d
        assert d["error"]["type"] == "InvalidParameter"
        assert d["error"]["message"].startswith(field) and limit in d["error"]["message"]
    d = doc(too_big)
    assert d["status"] == "failed" and d["error"]["type"] == "LimitExceeded"
    assert "max_result_bytes = 20000" in d["error"]["message"]
    assert not list(settings.blob_dir.glob(f"*/{too_big}*"))


def test_once_a_worker_published_its_tokenizer_the_api_refuses_at_submission(
    client: TestClient, settings: Settings
) -> None:
    """The same jobs as above, once the worker has loaded the model: refused by the API
    with the worker's own words (413), and the one that fits gets an exact estimate."""
    drain(settings)  # loads the model, publishes its shape and tokenizer, finds no job
    long_text = "red cat blue dog red cat blue dog red"
    short = "red cat blue dog | red"
    for texts, message in (
        ([short, long_text], "texts: a text of 10 tokens exceeds the limit max_tokens_per_text"),
        ([short] * 3, "texts: 21 tokens in all exceed the limit max_tokens_per_job = 20"),
    ):
        r = client.post("/v1/jobs", json={"model": "demo", "kind": "score", "texts": texts})
        assert r.status_code == 413, r.text
        assert r.json()["detail"].startswith(message)
    r = client.post("/v1/jobs", json={"model": "demo", "kind": "trace", "texts": short})
    assert r.status_code == 413 and "max_result_bytes = 20000" in r.text
    ok = client.post("/v1/jobs", json={"model": "demo", "kind": "score", "texts": short})
    assert ok.status_code == 202, ok.text
    assert ok.json()["estimate"]["tokens"] == "counted"
    drain(settings)
    done = client.get(f"/v1/jobs/{ok.json()['id']}").json()
    real = sum(TensorSpec(t["dtype"], tuple(t["shape"])).nbytes for t in done["tensors"].values())
    assert done["status"] == "succeeded" and done["estimate"]["result_bytes"] == real


def test_result_size_counts_every_tensor() -> None:
    tensors = {"a": torch.zeros(10, dtype=torch.float32), "b": torch.zeros(4, dtype=torch.int8)}
    check_result_size(tensors, Limits(max_result_bytes=44))
    with pytest.raises(LimitExceeded, match=r"44 bytes.*max_result_bytes = 43"):
        check_result_size(tensors, Limits(max_result_bytes=43))


def test_out_of_memory_is_recognised_and_explained() -> None:
    cpu = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
        "you tried to allocate 314572800 bytes"
    )
    assert is_out_of_memory(cpu) and is_out_of_memory(MemoryError())
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    params = {"texts": ["a b c", "a"], "targets": ["x", "y"], "num_masks": 8, "batch_size": 16}
    message = out_of_memory_message("chg", params, cpu)
    assert message.startswith("out of memory running chg: 2 texts of up to 5 characters")
    assert "num_masks=8" in message and "num_masks × batch_size = 128" in message
    assert "314572800 bytes" in message
