"""The benchmark suite: a real service on one machine, measured the way its users see it.

Sections (each a function returning table rows):

- round-trip latency of small jobs (p50, p95), submission to downloaded result;
- overhead: a score job of 8 texts × 64 tokens through the service versus the plain
  forward pass of the same batch in this process, on the same device;
- throughput of 16 one-text score jobs: one after another, all at once with batching,
  and all at once without it (the same model served with a one-token budget);
- CHG fit time against the seed library (``bench/chg_vs_seed.py``, skipped with a
  note when ``inteprelens`` is not installed);
- download throughput of a 1 GiB result over loopback, and the API process's memory
  growth while it streams it;
- on CUDA: the worker's and this process's peak CUDA memory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch

from app import presence
from app.api.routes.jobs import MAX_RESULT_WAIT_S
from app.blobstore import BlobStore, BlobTensor, blob_metadata
from app.core.config import Limits, ModelSpec, Settings
from app.core.redis_server import free_port
from app.jobstore import ANONYMOUS, JobStore
from app.schemas import JobStatus, TensorInfo
from app.stack import Stack
from bench import realistic
from bench.client import BenchClient, RoundTrip
from bench.models import GEOMETRY, build_bench_model, texts_of_length
from bench.report import Row, machine, table, write_results
from bench.shapes import DEFAULT_SHAPES, SHAPES
from workers.lens.loading import LoadedModel, load_model

BATCHED = "bench"
SOLO = "bench-solo"
"""The same model served with a one-token budget: every job runs in a pass of its own."""
REPO = Path(__file__).resolve().parent.parent
SEED_PYTHON_ENV = "LENS_BENCH_SEED_PYTHON"
SEED_VENV = Path("/tmp/seedenv/bin/python")
GIB = 1 << 30
OVERHEAD_RESULT_BYTES = 17_054_176
"""The size of the overhead section's full-logits result (8 × 64 × 8192 float32 and more)."""


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="repeats of timed comparisons")
    parser.add_argument("--download-gib", type=float, default=1.0, help="size of the big result")
    parser.add_argument("--no-seed", action="store_true", help="skip the CHG comparison")
    parser.add_argument(
        "--results-dir", type=Path, help="the service's results_dir (default: in its data dir)"
    )
    parser.add_argument(
        "--shapes",
        nargs="*",
        choices=list(SHAPES),
        metavar="SHAPE",
        help="instead, the real-shapes tier (bench/realistic.py; not in CI) on these shapes "
        f"(default: {', '.join(DEFAULT_SHAPES)})",
    )
    parser.add_argument("--threads", type=int, help="with --shapes: torch threads")
    parser.add_argument(
        "--chg-dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=["float32", "bfloat16"],
        help="with --shapes: the dtypes of the CHG comparison",
    )
    args = parser.parse_args()
    if args.shapes is not None:
        realistic.main(args.shapes, args.threads, args.chg_dtypes)
        return
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lens-bench-") as tmp:
        root = Path(tmp)
        model_dir = build_bench_model(root / "model")
        lm = load_model(str(model_dir))
        settings = Settings(
            redis_url="redis://unused",
            data_dir=root / "data",
            results_dir=args.results_dir,
            models={
                BATCHED: ModelSpec(source=str(model_dir)),
                SOLO: ModelSpec(source=str(model_dir), max_batch_tokens=1),
            },
            port=free_port(),
            heartbeat_s=1.0,
            limits=Limits(max_texts=64, max_active_jobs_per_key=10_000),
        )
        stack = Stack(settings)
        client = None
        try:
            stack.start(workers=1)
            stack.wait_ready(timeout=300)
            client = BenchClient(stack.url)
            rows = _run_sections(args, stack, client, lm)
        finally:
            if client is not None:
                client.close()
            stack.stop()
    g = GEOMETRY
    setup = {
        "model": f"random Llama, {g['num_hidden_layers']} layers, hidden {g['hidden_size']}, "
        f"MLP {g['intermediate_size']}, {g['num_attention_heads']} heads, vocabulary "
        f"{g['vocab_size']} ({_params(lm) / 1e6:.1f} M parameters), "
        f"{str(lm.dtype).removeprefix('torch.')} on {lm.device}",
        "service": "app.stack.Stack: its own Redis, 1 worker, the API (uvicorn), on this machine",
        "client": "http.client, one kept-alive connection per thread: POST /v1/jobs, then "
        f"stream GET /v1/jobs/{{id}}/result?wait={MAX_RESULT_WAIT_S} (it answers when the job "
        "ends); one row "
        "waits on GET /v1/jobs/{id}/events (SSE) and downloads after",
        "results stored in": f"{args.results_dir or 'the data directory, under /tmp'} "
        f"({_filesystem(args.results_dir or Path(tempfile.gettempdir()))})",
        "load average (1 min) at start, end": f"{load_before:.2f}, {os.getloadavg()[0]:.2f}",
    }
    print()
    print(table(rows))
    path = write_results(rows, setup, time.perf_counter() - started)
    print(f"\nwritten to {path}; machine: {json.dumps(machine())}")


def _run_sections(
    args: argparse.Namespace, stack: Stack, client: BenchClient, lm: LoadedModel
) -> list[Row]:
    sections: list[tuple[str, Callable[[], list[Row]]]] = [
        ("latency", lambda: small_job_latency(client, lm)),
        ("overhead", lambda: overhead(client, lm, 6 * args.repeats)),
        ("storage", lambda: result_writes(stack.settings.blob_dir, OVERHEAD_RESULT_BYTES)),
        ("throughput", lambda: throughput(client, stack, lm, args.repeats)),
        ("chg", lambda: chg_vs_seed(args.no_seed)),
        ("download", lambda: big_download(client, stack, int(args.download_gib * GIB))),
    ]
    if torch.cuda.is_available():
        sections.append(("cuda", lambda: cuda_memory(stack)))
    rows: list[Row] = []
    for name, section in sections:
        began = time.perf_counter()
        print(f"[bench] {name}…", flush=True)
        new = section()
        for row in new:
            print(f"[bench]   {row.measure}: {row.value}  {row.detail}", flush=True)
        print(f"[bench] {name} took {time.perf_counter() - began:.1f} s", flush=True)
        rows += new
    return rows


def small_job_latency(client: BenchClient, lm: LoadedModel, count: int = 40) -> list[Row]:
    """Sequential one-text score jobs: the service's fixed cost per job."""
    text = "the capital of France is"
    body = {"kind": "score", "model": BATCHED, "texts": text}
    for _ in range(3):
        client.round_trip(body)
    seconds = sorted(client.round_trip(body).seconds for _ in range(count))
    p50, p95 = _quantile(seconds, 0.5), _quantile(seconds, 0.95)
    tokens = len(lm.tokenizer(text)["input_ids"])
    what = f"score, 1 text of {tokens} tokens, submit → waiting download; {count} in a row"
    return [
        Row("small job round trip, p50", f"{p50 * 1e3:.1f} ms", what),
        Row("small job round trip, p95", f"{p95 * 1e3:.1f} ms", ""),
    ]


def overhead(client: BenchClient, lm: LoadedModel, repeats: int) -> list[Row]:
    """A compute-bound score job through the service versus its bare forward pass: with
    its full logits (a 17 MB result), with the final token's only (0.3 MB), and with full
    logits again but waited for on the event stream and downloaded after (two requests
    more, what a client showing progress does). A pair takes a third of a second, and
    single ratios range over ±15 % on a shared VM (a median of 15 moved by ±0.05 from run
    to run), so the median is over six times ``--repeats`` pairs."""
    texts = texts_of_length(lm.tokenizer, 8, 64, seed=1)
    enc = lm.tokenizer(texts, padding=True, return_tensors="pt").to(lm.device)
    full_body = {"kind": "score", "model": BATCHED, "texts": texts}
    final_body = full_body | {"final_token_only": True}
    trips: dict[str, Callable[[], RoundTrip]] = {
        "full": lambda: client.round_trip(full_body),
        "final": lambda: client.round_trip(final_body),
        "events": lambda: client.round_trip(full_body, follow_events=True),
    }

    def forward() -> float:
        _sync()
        began = time.perf_counter()
        with torch.inference_mode():
            lm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        _sync()
        return time.perf_counter() - began

    for _ in range(2):
        forward()
        for run in trips.values():
            run()
    local: list[float] = []
    served: dict[str, list[float]] = {name: [] for name in trips}
    ratios: dict[str, list[float]] = {name: [] for name in trips}
    sizes: dict[str, int] = {}
    for _ in range(repeats):
        for name, run in trips.items():
            local.append(forward())
            trip = run()
            served[name].append(trip.seconds)
            ratios[name].append(trip.seconds / local[-1])
            sizes[name] = trip.result_bytes
    bare = statistics.median(local)
    full, final, events = (statistics.median(served[k]) for k in ("full", "final", "events"))
    paired = "median over pairs (a forward pass, then the job right after it)"
    return [
        Row(
            "in-process forward, 8 × 64 tokens",
            f"{bare * 1e3:.1f} ms",
            f"median of {len(local)}; `model(input_ids, attention_mask)` in this process",
        ),
        Row(
            "same batch as a score job",
            f"{full * 1e3:.1f} ms",
            f"median of {repeats}; submit → `GET …/result?wait=` of {sizes['full'] / 1e6:.1f} MB",
        ),
        Row(
            "overhead ratio (service / in-process)",
            f"{statistics.median(ratios['full']):.2f}×",
            f"{paired}; target ≤ 1.25×",
        ),
        Row(
            "same job, final_token_only",
            f"{final * 1e3:.1f} ms ({statistics.median(ratios['final']):.2f}×)",
            f"median of {repeats}; a {sizes['final'] / 1e6:.2f} MB result; ratio as above",
        ),
        Row(
            "same job, waited for on the event stream",
            f"{events * 1e3:.1f} ms ({statistics.median(ratios['events']):.2f}×)",
            f"median of {repeats}; submit → SSE → download; ratio as above",
        ),
    ]


def result_writes(directory: Path, size: int, count: int = 10) -> list[Row]:
    """Writing a result-sized file where the service stores results, each kept as results
    are: in one ``write`` call (as ``safetensors.save_file`` does) and as the service
    writes results, 1 MiB at a time. Where a large write into new page cache is slow (this
    project's VM), the difference is what chunking saves each full-logits job."""
    data = memoryview(np.random.default_rng(0).bytes(size))
    directory.mkdir(parents=True, exist_ok=True)
    scratch = BlobStore(Path(tempfile.mkdtemp(prefix="bench-writes-", dir=directory)))
    tensors = {"x": BlobTensor(dtype="uint8", shape=(size,), data=data)}
    whole: list[float] = []
    chunked: list[float] = []
    try:
        for _ in range(count):
            began = time.perf_counter()
            with open(scratch.root / uuid.uuid4().hex, "wb") as f:
                f.write(data)
            whole.append(time.perf_counter() - began)
            began = time.perf_counter()
            scratch.write(uuid.uuid4().hex, tensors, {})
            chunked.append(time.perf_counter() - began)
    finally:
        shutil.rmtree(scratch.root)
    mb = size / 1e6
    return [
        Row(
            f"writing a {mb:.0f} MB file in one write",
            f"{statistics.median(whole) * 1e3:.1f} ms",
            f"median of {count}, each a new file, kept; where the service writes results",
        ),
        Row(
            f"writing a {mb:.0f} MB result as the service does",
            f"{statistics.median(chunked) * 1e3:.1f} ms",
            "the same, alternating with the above, 1 MiB per write (app/blobstore.py)",
        ),
    ]


def throughput(client: BenchClient, stack: Stack, lm: LoadedModel, repeats: int) -> list[Row]:
    """16 one-text score jobs: sequential, concurrent with batching, concurrent without."""
    texts = texts_of_length(lm.tokenizer, 16, 32, seed=2)

    def bodies(model: str) -> list[dict[str, Any]]:
        return [{"kind": "score", "model": model, "texts": t} for t in texts]

    def sequential(model: str) -> float:
        began = time.perf_counter()
        for body in bodies(model):
            client.round_trip(body)
        return time.perf_counter() - began

    def concurrent(model: str) -> float:
        """All sixteen at once: each thread is started and waiting before the clock starts
        (starting sixteen threads here spreads their requests over 20–35 ms)."""
        ready = threading.Barrier(len(texts) + 1)

        def trip(body: dict[str, Any]) -> None:
            ready.wait()
            client.round_trip(body)

        with ThreadPoolExecutor(len(texts)) as pool:
            done = [pool.submit(trip, body) for body in bodies(model)]
            ready.wait()
            began = time.perf_counter()
            for future in done:
                future.result()
        return time.perf_counter() - began

    for model in (BATCHED, SOLO):  # warm-up: the client's connections, the server's tasks
        concurrent(model)
    time.sleep(1.5 * stack.settings.heartbeat_s)
    before = _batching(stack)
    runs: dict[str, list[float]] = {"sequential": [], "batched": [], "solo": []}
    for _ in range(repeats):
        runs["sequential"].append(sequential(BATCHED))
        runs["batched"].append(concurrent(BATCHED))
        runs["solo"].append(concurrent(SOLO))
    time.sleep(1.5 * stack.settings.heartbeat_s)  # the counters travel with the heartbeat
    after = _batching(stack)
    seq, bat, solo = (statistics.median(runs[k]) for k in ("sequential", "batched", "solo"))
    n = len(texts)
    shared = after.get("batched_jobs", 0) - before.get("batched_jobs", 0)
    passes = after.get("passes", 0) - before.get("passes", 0)
    return [
        Row(
            "16 score jobs one after another",
            f"{seq:.2f} s ({n / seq:.1f} jobs/s)",
            f"1 text of 32 tokens each; median of {repeats}",
        ),
        Row(
            "16 score jobs at once, batched",
            f"{bat:.2f} s ({n / bat:.1f} jobs/s)",
            f"{seq / bat:.1f}× faster than one after another (target ≥ 2×)",
        ),
        Row(
            "16 score jobs at once, not batched",
            f"{solo:.2f} s ({n / solo:.1f} jobs/s)",
            f"batching gains {solo / bat:.1f}×; over the whole section the worker ran "
            f"{passes} passes, {shared} jobs in shared ones",
        ),
    ]


def chg_vs_seed(skip: bool) -> list[Row]:
    """``bench/chg_vs_seed.py`` in an interpreter that has ``inteprelens``, if there is one."""
    name = "CHG fit, lens-server vs inteprelens"
    python = None if skip else _seed_python()
    if python is None:
        why = "skipped (--no-seed)" if skip else "skipped: inteprelens is not installed"
        note = f"install it as bench/chg_vs_seed.py says, or set {SEED_PYTHON_ENV}"
        return [Row(name, why, note)]
    repeats = 3
    params = ["--num-masks", "10", "--updates", "25", "--examples", "64", "--repeats", str(repeats)]
    done = subprocess.run(
        [python, "-m", "bench.chg_vs_seed", *params],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    lines = done.stdout.splitlines()
    if done.returncode != 0 or "{" not in lines:
        return [Row(name, "failed", (done.stderr.strip().splitlines() or ["?"])[-1][:200])]
    report = json.loads("\n".join(lines[len(lines) - 1 - lines[::-1].index("{") :]))
    wall, cpu = report["median"]["seconds"], report["median"]["cpu_seconds"]
    what = (
        f"demo model on CPU, {report['examples']} examples, {report['num_masks']} masks, "
        f"{report['num_updates']} + {report['num_reg_updates']} updates, batch "
        f"{report['batch_size']}, {report['threads']} threads; median of {repeats}"
    )
    return [
        Row("CHG fit, inteprelens 0.2.1 in-process", f"{wall['seed']:.2f} s", what),
        Row(
            "CHG fit, lens-server core in-process",
            f"{wall['ours']:.2f} s",
            f"{wall['seed'] / wall['ours']:.2f}× the seed's speed (by CPU time "
            f"{cpu['seed'] / cpu['ours']:.2f}×)",
        ),
        Row(
            "CHG fit, chg job through the service",
            f"{wall['service']:.2f} s",
            f"{wall['seed'] / wall['service']:.2f}× the seed's speed (target ≥ 3×); submit → "
            "waiting download, one worker",
        ),
    ]


def big_download(client: BenchClient, stack: Stack, size: int) -> list[Row]:
    """A crafted ``size``-byte result, streamed; the API's RSS sampled meanwhile."""
    conn = redis.Redis.from_url(stack.settings.redis_url)
    store = JobStore(conn)
    doc = store.create(kind="score", model=BATCHED, owner=ANONYMOUS, params={"texts": "crafted"})
    _write_blob(BlobStore(stack.settings.blob_dir), doc.id, size)
    store.start(doc.id, "bench")
    info = {"blob": TensorInfo(dtype="uint8", shape=[size])}
    store.finish(doc.id, JobStatus.SUCCEEDED, summary={}, tensors=info, ttl_s=3600)
    if stack.api is None:
        raise RuntimeError("the API is not running")
    client.get_json("/healthz")
    sampler = _RssSampler(stack.api.pid)
    sampler.start()
    began = time.perf_counter()
    got = client.download(doc.id)
    seconds = time.perf_counter() - began
    sampler.stop()
    BlobStore(stack.settings.blob_dir).delete(doc.id)
    conn.close()
    if got < size:
        raise RuntimeError(f"downloaded {got} of {size} bytes")
    growth = (sampler.peak - sampler.baseline) / 2**20
    return [
        Row(
            "result download throughput",
            f"{got / seconds / 2**20:.0f} MiB/s",
            f"{got / GIB:.2f} GiB over loopback in {seconds:.2f} s, streamed from disk",
        ),
        Row(
            "API memory growth while streaming it",
            f"{growth:.1f} MiB",
            f"RSS {sampler.baseline / 2**20:.0f} → peak {sampler.peak / 2**20:.0f} MiB; "
            "limit 100 MiB",
        ),
    ]


def cuda_memory(stack: Stack) -> list[Row]:
    """Peak CUDA memory: the worker's (from its heartbeat) and this process's baseline runs."""
    conn = redis.Redis.from_url(stack.settings.redis_url)
    workers = presence.live_workers(conn)
    conn.close()
    peaks = [w.get("registry", {}).get("cuda_max_allocated_bytes") for w in workers.values()]
    worker_peak = max((p for p in peaks if p is not None), default=None)
    rows = [
        Row(
            "CUDA memory, in-process baseline (peak)",
            f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB",
            "",
        )
    ]
    if worker_peak is not None:
        rows.append(Row("CUDA memory, worker (peak)", f"{worker_peak / 2**20:.0f} MiB", ""))
    return rows


def _write_blob(blobs: BlobStore, job_id: str, size: int) -> None:
    """A valid safetensors file with one uint8 tensor of ``size`` bytes (zeros: the pages
    are the kernel's zero page until written, so the benchmark does not hold them)."""
    meta = blob_metadata(job_id=job_id, kind="score", model=BATCHED, params={}, summary={})
    data = np.zeros(size, np.uint8).data
    blobs.write(job_id, {"blob": BlobTensor(dtype="uint8", shape=(size,), data=data)}, meta)


class _RssSampler(threading.Thread):
    """Peak resident set size of a process, sampled every 5 ms (Linux /proc)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.baseline = self.peak = _rss(pid)
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.005):
            self.peak = max(self.peak, _rss(self.pid))

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.peak = max(self.peak, _rss(self.pid))


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _filesystem(path: Path) -> str:
    """The type of the file system holding ``path`` (from /proc/mounts), e.g. ext4 or tmpfs."""
    resolved, best, kind = path.resolve(), -1, "unknown file system"
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fs_type, *_ = line.split()
        depth = len(Path(mount).parts)
        if (resolved == Path(mount) or Path(mount) in resolved.parents) and depth > best:
            best, kind = depth, fs_type
    return kind


def _seed_python() -> str | None:
    """An interpreter that can import inteprelens: $LENS_BENCH_SEED_PYTHON, this one, or the
    scratch virtualenv that bench/chg_vs_seed.py suggests."""
    configured = os.environ.get(SEED_PYTHON_ENV)
    if configured:
        return configured
    if importlib.util.find_spec("inteprelens") is not None:
        return sys.executable
    if SEED_VENV.is_file():
        probe = subprocess.run(
            [SEED_VENV, "-c", "import inteprelens, workers"],
            cwd=REPO,
            check=False,
            capture_output=True,
        )
        if probe.returncode == 0:
            return str(SEED_VENV)
    return None


def _batching(stack: Stack) -> dict[str, int]:
    """The worker's batching counters, from its latest heartbeat."""
    conn = redis.Redis.from_url(stack.settings.redis_url)
    workers = presence.live_workers(conn)
    conn.close()
    totals: dict[str, int] = {}
    for info in workers.values():
        for key, value in info.get("batching", {}).items():
            totals[key] = totals.get(key, 0) + value
    return totals


def _quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of an already sorted list."""
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _params(lm: LoadedModel) -> int:
    return sum(p.numel() for p in lm.model.parameters())
