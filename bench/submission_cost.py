"""What counting tokens at submission costs the API, on a shape's published tokenizer.

``python -m bench.submission_cost [SHAPE]`` (default ``smollm2-135m``) starts an API of
its own (its own Redis, no worker) and publishes the shape's info twice, as a worker
would: ``counted`` with the shape's tokenizer, ``guessed`` without. It then reports the
API process's CPU per submission (``/proc/<pid>/stat``: all its threads, the
tokenizer's included) for one-text and 1,000-text score jobs on each, so the difference
is what counting adds; the first submission after a tokenizer is published (it is
fetched and parsed once); and a 16 MiB body of non-ASCII text, with the latency of
``/healthz`` from another client while it is counted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from app import presence, tokens
from app.core.config import Limits, ModelSpec, Settings
from app.core.redis_server import free_port
from app.stack import Stack
from bench.shapes import SHAPES, build_shape

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "an",
    "which",
    "or",
    "had",
    "it",
    "capital",
    "France",
    "Paris",
    "river",
    "mountain",
    "history",
    "science",
    "language",
    "model",
    "token",
]
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def shape_info(name: str) -> dict[str, Any]:
    """The shape's info as its worker publishes it (what sizes jobs)."""
    config = SHAPES[name].hf_config()
    return {
        "name": name,
        "source": name,
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "head_dim": getattr(config, "head_dim", None)
        or config.hidden_size // config.num_attention_heads,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "max_context": config.max_position_embeddings,
        "dtype": "float32",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", nargs="?", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    path = build_shape(args.shape)
    with tempfile.TemporaryDirectory(prefix="lens-submission-cost-") as tmp:
        settings = Settings(
            redis_url="redis://unused",
            data_dir=Path(tmp),
            port=free_port(),
            models={n: ModelSpec(source=str(path)) for n in ("counted", "guessed")},
            limits=Limits(max_active_jobs_per_key=10**6),
        )
        stack = Stack(settings).start(workers=0)
        try:
            stack.wait_api()
            _measure(stack, path, args.shape, args.rounds)
        finally:
            stack.stop()


def _measure(stack: Stack, path: Path, name: str, rounds: int) -> None:
    from transformers import AutoTokenizer

    conn = redis.Redis.from_url(stack.settings.redis_url)
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.backend_tokenizer.to_str()
    sha256, blob = tokens.pack(text)
    presence.publish_tokenizer(conn, sha256, blob)
    print(f"tokenizer: {len(text) / 1e6:.2f} MB of JSON, {len(blob) / 1e6:.2f} MB published")
    info = shape_info(name)
    presence.publish_model_info(conn, "counted", info | {"tokenizer_sha256": sha256})
    presence.publish_model_info(conn, "guessed", info)
    assert stack.api is not None
    pid = stack.api.pid
    rng = random.Random(0)

    def words() -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(48))

    with httpx.Client(base_url=stack.url, timeout=120) as http:

        def post(model: str, body: dict[str, Any]) -> httpx.Response:
            return http.post("/v1/jobs", json={"model": model, **body})

        post("guessed", {"kind": "score", "texts": words()})  # opens the connections
        began, cpu = time.perf_counter(), cpu_seconds(pid)
        post("counted", {"kind": "score", "texts": words()})
        print(
            f"first submission with the tokenizer (fetched, parsed): "
            f"{(time.perf_counter() - began) * 1e3:.0f} ms, API CPU "
            f"{(cpu_seconds(pid) - cpu) * 1e3:.0f} ms"
        )
        one = [{"kind": "score", "texts": words()} for _ in range(1000)]
        many = [
            {"kind": "score", "texts": [words() for _ in range(1000)], "final_token_only": True}
            for _ in range(12)
        ]
        counts = tokenizer(one[0]["texts"])["input_ids"]
        print(f"a text: {len(one[0]['texts'])} characters, {len(counts)} tokens")
        for label, bodies in (("1 text", one), ("1,000 texts", many)):
            cpu_ms: dict[str, list[float]] = {"guessed": [], "counted": []}
            for _ in range(rounds):
                for model, found in cpu_ms.items():
                    cpu = cpu_seconds(pid)
                    for body in bodies:
                        r = post(model, body)
                        r.raise_for_status()
                    found.append((cpu_seconds(pid) - cpu) / len(bodies) * 1e3)
            guessed, counted = (statistics.median(v) for v in cpu_ms.values())
            print(
                f"{label}: API CPU per submission, median of {rounds} rounds: guessed "
                f"{guessed:.2f} ms, counted {counted:.2f} ms, added {counted - guessed:.2f} ms"
            )
        _huge_body(stack, http, pid)


def _huge_body(stack: Stack, http: httpx.Client, pid: int) -> None:
    """A 16 MiB body of non-ASCII text on each model, while another client polls."""
    text = "漢字かなカナ한국어" * 11_000
    for model in ("guessed", "counted"):
        body = {"model": model, "kind": "score", "texts": [text] * 55}
        data = json.dumps(body, ensure_ascii=False).encode()
        stop, latencies = threading.Event(), []

        def poll(stop: threading.Event = stop, latencies: list[float] = latencies) -> None:
            with httpx.Client(base_url=stack.url, timeout=60) as other:
                while not stop.is_set():
                    began = time.perf_counter()
                    other.get("/healthz")
                    latencies.append(time.perf_counter() - began)
                    time.sleep(0.01)

        poller = threading.Thread(target=poll)
        poller.start()
        time.sleep(0.5)
        seen, cpu, began = len(latencies), cpu_seconds(pid), time.perf_counter()
        r = http.post("/v1/jobs", content=data, headers={"Content-Type": "application/json"})
        took, used = time.perf_counter() - began, cpu_seconds(pid) - cpu
        during = latencies[seen:] or [float("nan")]
        stop.set()
        poller.join()
        print(
            f"{len(data) / 2**20:.1f} MiB body, {model}: {r.status_code} in {took:.2f} s, API "
            f"CPU {used:.2f} s; /healthz meanwhile: {len(during)} answers, slowest "
            f"{max(during) * 1e3:.0f} ms; {str(r.json().get('detail', ''))[:90]}"
        )


if __name__ == "__main__":
    main()
