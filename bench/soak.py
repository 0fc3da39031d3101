"""``python -m bench --soak``: many users at once, the way a lab uses a shared server.

Several API keys and many concurrent clients share one burst of jobs: one-text score
and trace jobs and small chg fits on the demo model. Each client belongs to a key; it
submits its key's next job, fetches the result with one held ``GET /result?wait=``,
checks it, and takes the next one. The same burst runs on a fresh service per worker
count (1 and 2 by default, ``lens serve``'s defaults otherwise), and the report gives,
per run: throughput, round trip per kind (p50, p95), queue wait per key, failures (an
HTTP error, a job that did not succeed, a result that is not its job's) and lost jobs
(submitted, but not listed as succeeded for its key). It goes in a section of
``bench/results.md``; ``tests/integration/test_soak.py`` runs a short one in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from app.core.config import Limits, ModelSpec, Settings
from app.core.redis_server import free_port
from app.stack import Stack
from bench.client import BenchClient
from bench.report import Row, machine, table, write_section
from workers.lens import demo
from workers.lens.demo import WORDS, ensure_demo_model

MODEL = "demo"
KINDS = ("score", "trace", "chg")
DEFAULT_MIX = "score=60,trace=30,chg=10"
TRACE_LAYERS = [1]
TRACE_SITES = ["block_output"]
CHG_PAIRS = 8
CHG_PARAMS = {"num_masks": 4, "num_updates": 20, "num_reg_updates": 20, "batch_size": 8}
"""A small fit: about 0.4 s alone on the demo model, one thread of this project's 2-core VM."""
MAX_LISTED = 1000
"""``GET /v1/jobs`` lists at most this many of a key's jobs: the most a run gives a key."""


@dataclass(frozen=True)
class Planned:
    """One job of the burst: its key (an index into the keys) and its request body."""

    key: int
    kind: str
    body: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    """What one client saw of one job; ``error`` is None when the job's result checked out."""

    planned: Planned
    job_id: str | None
    seconds: float
    error: str | None


@dataclass
class SoakRun:
    """One burst through one service."""

    workers: int
    seconds: float
    outcomes: list[Outcome]
    lost: list[str] = field(default_factory=list)
    not_succeeded: list[str] = field(default_factory=list)
    queue_waits: dict[int, list[float]] = field(default_factory=dict)
    worker_threads: dict[str, int] = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        """Every failure seen, each with the job and why."""
        seen = [f"{o.planned.kind} {o.job_id}: {o.error}" for o in self.outcomes if o.error]
        return seen + self.not_succeeded

    @property
    def throughput(self) -> float:
        return len(self.outcomes) / self.seconds

    def round_trips(self, kind: str) -> list[float]:
        return sorted(o.seconds for o in self.outcomes if o.planned.kind == kind and not o.error)


def parse_mix(text: str) -> dict[str, float]:
    """``score=60,trace=30,chg=10`` → each kind's share of the burst (summing to 1)."""
    shares: dict[str, float] = {}
    for part in text.split(","):
        kind, sep, weight = part.partition("=")
        if not sep or kind.strip() not in KINDS:
            raise ValueError(f"--mix: expected KIND=WEIGHT with KIND in {KINDS}, got {part!r}")
        shares[kind.strip()] = float(weight)
    total = sum(shares.values())
    if total <= 0 or any(w < 0 for w in shares.values()):
        raise ValueError(f"--mix: weights must be ≥ 0 and not all 0, got {text!r}")
    return {kind: weight / total for kind, weight in shares.items()}


def texts(count: int, seed: int) -> list[str]:
    """``count`` copy prompts of the demo model's task (3–8 words, then ``|`` and the first
    two again). Jobs draw from them, so some jobs are identical, as when many users score
    the same prompts."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words = rng.sample(WORDS, rng.randint(3, 8))
        out.append(" ".join([*words, "|", *words[:2]]))
    return out


def plan(
    count: int, keys: int, mix: dict[str, float], seed: int = 0, model: str = MODEL
) -> list[Planned]:
    """The burst: ``count`` jobs of the mix, shuffled, dealt to the keys in turn; each chg
    job has a seed of its own."""
    rng = random.Random(seed)
    pool = texts(16, seed)
    prompts = texts(CHG_PAIRS, seed + 1)
    kinds = [k for k, share in mix.items() for _ in range(round(share * count))]
    kinds = (kinds + [max(mix, key=lambda k: mix[k])] * count)[:count]
    rng.shuffle(kinds)
    jobs = []
    for i, kind in enumerate(kinds):
        body: dict[str, Any] = {"kind": kind, "model": model}
        if kind == "chg":
            body |= {"texts": prompts, "targets": [p.split()[2] for p in prompts]}
            body |= CHG_PARAMS | {"seed": i}
        else:
            body["texts"] = rng.choice(pool)
        if kind == "trace":
            body |= {"layers": TRACE_LAYERS, "sites": TRACE_SITES}
        jobs.append(Planned(key=i % keys, kind=kind, body=body))
    return jobs


@dataclass(frozen=True)
class Shape:
    """What a result of the served model must look like."""

    layers: int
    heads: int
    hidden_size: int
    vocab_size: int


class ResultCheck:
    """Whether a downloaded result is its job's: the file names the job, its kind and its
    parameters, and holds tensors of the right shapes for that job's own tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, shape: Shape) -> None:
        self.tokenizer, self.shape = tokenizer, shape
        self._ids: dict[str, list[int]] = {}

    def __call__(self, job: Planned, job_id: str, blob: bytes) -> str | None:
        meta = _metadata(blob)
        if meta.get("job_id") != job_id or meta.get("kind") != job.kind:
            return f"the result names job {meta.get('job_id')} ({meta.get('kind')})"
        params = json.loads(meta.get("params", "{}"))
        differ = [k for k, v in job.body.items() if k not in ("kind", "model") and params[k] != v]
        if differ:
            return f"the result's parameters differ in {differ}"
        tensors = load_safetensors(blob)
        if job.kind == "chg":
            want = (CHG_PARAMS["num_masks"], self.shape.layers, self.shape.heads)
            got = tensors["masks.positive"].shape
            return None if got == want else f"masks.positive is {got}, not {want}"
        ids = self._token_ids(job.body["texts"])
        if tensors["input_ids"].tolist() != [ids]:
            return "its input_ids are not its text's tokens"
        if job.kind == "score":
            want_score = (1, len(ids), self.shape.vocab_size)
            got_score = tensors["logits"].shape
            if got_score != want_score:
                return f"logits is {got_score}, not {want_score}"
            return None if np.isfinite(tensors["logits"]).all() else "non-finite logits"
        name = f"{TRACE_SITES[0]}.{TRACE_LAYERS[0]}"
        want_trace = (1, len(ids), self.shape.hidden_size)
        got_trace = tensors[name].shape
        return None if got_trace == want_trace else f"{name} is {got_trace}, not {want_trace}"

    def _token_ids(self, text: str) -> list[int]:
        if text not in self._ids:
            self._ids[text] = list(self.tokenizer(text)["input_ids"])
        return self._ids[text]


def _metadata(blob: bytes) -> dict[str, str]:
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    return dict(header.get("__metadata__", {}))


Check = Callable[[Planned, str, bytes], str | None]


def drive(
    url: str, keys: Sequence[str], jobs: Sequence[Planned], clients: int, check: Check
) -> tuple[float, list[Outcome]]:
    """Run the burst: ``clients`` threads, client ``c`` submitting the jobs of key
    ``c % len(keys)`` one at a time. Returns the wall time and every job's outcome."""
    per_key: dict[int, list[Planned]] = defaultdict(list)
    for job in reversed(jobs):
        per_key[job.key].append(job)
    lock = threading.Lock()
    outcomes: list[Outcome] = []
    ready = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        key = index % len(keys)
        http = BenchClient(url, api_key=keys[key] or None)
        ready.wait()
        try:
            while True:
                with lock:
                    if not per_key[key]:
                        return
                    job = per_key[key].pop()
                outcome = _one(http, job, check)
                with lock:
                    outcomes.append(outcome)
        finally:
            http.close()

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for thread in threads:
        thread.start()
    ready.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - began, outcomes


def _one(http: BenchClient, job: Planned, check: Check) -> Outcome:
    began = time.perf_counter()
    job_id = None
    try:
        job_id = http.submit(job.body)
        blob = http.fetch(job_id)
        error = check(job, job_id, blob)
    except Exception as exc:  # every failure is counted, none ends the run
        error = f"{type(exc).__name__}: {exc}"
    return Outcome(job, job_id, time.perf_counter() - began, error)


def audit(url: str, keys: Sequence[str], run: SoakRun) -> None:
    """Each key's job list: every job a client submitted must be listed for its key and
    have succeeded; the queue wait of each (started − created) is collected per key."""
    for index, key in enumerate(keys):
        http = BenchClient(url, api_key=key or None)
        try:
            listed = http.get_json(f"/v1/jobs?limit={MAX_LISTED}")["jobs"]
        finally:
            http.close()
        docs = {doc["id"]: doc for doc in listed}
        waits = run.queue_waits.setdefault(index, [])
        for outcome in run.outcomes:
            if outcome.planned.key != index or outcome.job_id is None:
                continue
            doc = docs.get(outcome.job_id)
            if doc is None:
                run.lost.append(outcome.job_id)
            elif doc["status"] != "succeeded":
                error = doc.get("error") or {}
                run.not_succeeded.append(
                    f"{doc['kind']} {doc['id']}: listed as {doc['status']}: "
                    f"{error.get('type')}: {error.get('message')}"
                )
            elif doc.get("started_at"):
                started = datetime.fromisoformat(doc["started_at"])
                waits.append((started - datetime.fromisoformat(doc["created_at"])).total_seconds())


def soak_service(
    stack: Stack,
    keys: Sequence[str],
    jobs: Sequence[Planned],
    clients: int,
    check: Check,
    warmup: Sequence[Planned] = (),
) -> SoakRun:
    """The burst (after ``warmup``, not counted) through a running stack, then its audit."""
    if warmup:
        drive(stack.url, keys, warmup, clients, check)
    seconds, outcomes = drive(stack.url, keys, jobs, clients, check)
    run = SoakRun(workers=len(stack.workers), seconds=seconds, outcomes=outcomes)
    run.worker_threads = _worker_threads(stack.url, keys[0])
    audit(stack.url, keys, run)
    return run


PROBE_FIT = {"num_masks": 4, "num_updates": 300, "num_reg_updates": 300, "batch_size": 8}
PROBE_JOBS = 20


@dataclass(frozen=True)
class FitProbe:
    """Short jobs sent one after another while a long fit runs."""

    trips: list[float]
    fit_running_after: bool
    update_s: float
    pauses: dict[str, Any]


def fit_probe(url: str, key: str, model: str = MODEL) -> FitProbe:
    """Start a long chg, wait for its first update, then send ``PROBE_JOBS`` one-text score
    jobs one after another (each: submit, then a held ``GET …/result?wait=``) while it runs.
    With one worker, only the fit's pauses can serve them."""
    http = BenchClient(url, api_key=key or None)
    try:
        prompts = texts(CHG_PAIRS, 7)
        fit = {"kind": "chg", "model": model, "texts": prompts, "seed": 0}
        fit |= {"targets": [p.split()[2] for p in prompts]} | PROBE_FIT
        fit_id = http.submit(fit)
        deadline = time.monotonic() + 120
        while http.get_json(f"/v1/jobs/{fit_id}").get("progress") is None:
            if time.monotonic() > deadline:
                raise TimeoutError("the probe's fit did not start within 120 s")
            time.sleep(0.01)
        body = {"kind": "score", "model": model, "texts": texts(1, 8)[0]}
        trips = [http.round_trip(body).seconds for _ in range(PROBE_JOBS)]
        running = http.get_json(f"/v1/jobs/{fit_id}")["status"] == "running"
        http.fetch(fit_id)
        doc = http.get_json(f"/v1/jobs/{fit_id}")
    finally:
        http.close()
    took = datetime.fromisoformat(doc["finished_at"]) - datetime.fromisoformat(doc["started_at"])
    updates = PROBE_FIT["num_updates"] + PROBE_FIT["num_reg_updates"]
    return FitProbe(
        trips=sorted(trips),
        fit_running_after=running,
        update_s=took.total_seconds() / updates,
        pauses=dict((doc.get("summary") or {}).get("pauses") or {}),
    )


def probe_rows(probe: FitProbe, workers: int) -> list[Row]:
    w = f"{workers} worker{'s' if workers > 1 else ''}"
    pauses = probe.pauses
    return [
        Row(
            f"{w}: score round trip during a chg, p50 / max",
            f"{_quantile(probe.trips, 0.5) * 1e3:.0f} / {probe.trips[-1] * 1e3:.0f} ms",
            f"{len(probe.trips)} one-text score jobs one after another during a chg of "
            f"{PROBE_FIT['num_updates'] + PROBE_FIT['num_reg_updates']} updates "
            f"({probe.update_s * 1e3:.1f} ms each; still running after them: "
            f"{'yes' if probe.fit_running_after else 'no'}); its pauses served "
            f"{pauses.get('jobs', 0)} jobs in {pauses.get('count', 0)} pauses, longest "
            f"{pauses.get('longest_s', 0) * 1e3:.0f} ms",
        )
    ]


def _worker_threads(url: str, key: str) -> dict[str, int]:
    http = BenchClient(url, api_key=key or None)
    try:
        models = http.get_json(f"/v1/models/{MODEL}")
    finally:
        http.close()
    return dict(models.get("worker_threads") or {})


def soak_settings(data_dir: Path, model_dir: Path, keys: Sequence[str]) -> Settings:
    """``lens serve``'s defaults, with the keys and no quota in the way of the burst."""
    return Settings(
        redis_url="redis://unused",
        data_dir=data_dir,
        models={MODEL: ModelSpec(source=str(model_dir))},
        port=free_port(),
        api_keys=list(keys),
        limits=Limits(max_active_jobs_per_key=10_000),
    )


def keys_of(count: int) -> list[str]:
    return [f"soak-key-{i}-{'x' * 24}" for i in range(count)]


def _quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile of a sorted list (NaN when empty)."""
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q * len(values)) - 1))]


def rows(runs: Sequence[SoakRun], count: int) -> list[Row]:
    """The table's rows for the runs of one worker count: throughput per run (median and
    range), round trips and queue waits over all their jobs, failures and lost jobs
    summed."""
    workers = runs[0].workers
    w = f"{workers} worker{'s' if workers > 1 else ''}"
    rates = sorted(run.throughput for run in runs)
    threads = ", ".join(str(t) for t in sorted(runs[0].worker_threads.values())) or "?"
    spread = f" ({rates[0]:.1f}–{rates[-1]:.1f})" if len(runs) > 1 else ""
    out = [
        Row(
            f"{w}: throughput",
            f"{statistics.median(rates):.1f} jobs/s{spread}",
            f"{count} jobs per run, {len(runs)} run(s): median (range); worker_threads {threads}",
        )
    ]
    for kind in KINDS:
        trips = sorted(t for run in runs for t in run.round_trips(kind))
        if trips:
            out.append(
                Row(
                    f"{w}: {kind} round trip p50 / p95",
                    f"{_quantile(trips, 0.5):.2f} / {_quantile(trips, 0.95):.2f} s",
                    f"{len(trips)} jobs; submit → held GET …/result?wait=",
                )
            )
    keys = sorted({k for run in runs for k in run.queue_waits})
    waits = []
    for key in keys:
        pooled = sorted(v for run in runs for v in run.queue_waits.get(key, []))
        waits.append(f"key {key}: {_quantile(pooled, 0.5):.2f} / {_quantile(pooled, 0.95):.2f} s")
    out.append(Row(f"{w}: queue wait p50 / p95 per key", "; ".join(waits), "started − created"))
    failures = [f for run in runs for f in run.failures]
    lost = sum(len(run.lost) for run in runs)
    out.append(
        Row(
            f"{w}: failures, lost jobs",
            f"{len(failures)}, {lost}",
            f"over {len(runs) * count} jobs; " + ("; ".join(failures[:3]) or "must be 0, 0"),
        )
    )
    return out


def scaling_row(by_workers: dict[int, list[SoakRun]]) -> list[Row]:
    """The most workers' throughput against one worker's, on the same burst."""
    most = max(by_workers)
    if 1 not in by_workers or most == 1:
        return []
    one, many = (statistics.median(r.throughput for r in by_workers[n]) for n in (1, most))
    return [
        Row(
            f"{most} workers / 1 worker, throughput",
            f"{many / one:.2f}×",
            "medians of the runs above; must be ≥ 1",
        )
    ]


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench --soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--keys", type=int, default=4, help="API keys (default 4)")
    parser.add_argument("--clients", type=int, default=24, help="concurrent clients (default 24)")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="worker counts to run (default 1 2)"
    )
    parser.add_argument("--count", type=int, default=200, help="jobs per burst (default 200)")
    parser.add_argument("--mix", default=DEFAULT_MIX, help=f"kinds' shares (default {DEFAULT_MIX})")
    parser.add_argument("--runs", type=int, default=1, help="bursts per worker count (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="the burst's seed")
    parser.add_argument("--no-write", action="store_true", help="print only; leave results.md")
    parser.add_argument("--logs", type=Path, help="keep the services' logs in this directory")
    args = parser.parse_args(argv)
    if args.keys < 1 or args.clients < args.keys or args.count < 1:
        parser.error("need keys ≥ 1, clients ≥ keys and count ≥ 1")
    if args.count > args.keys * MAX_LISTED:
        parser.error(f"at most {MAX_LISTED} jobs per key (the audit lists them)")
    mix = parse_mix(args.mix)
    keys = keys_of(args.keys)
    jobs = plan(args.count, args.keys, mix, args.seed)
    warmup = plan(2 * args.clients, args.keys, mix, args.seed + 1)
    load_before = os.getloadavg()[0]
    by_workers: dict[int, list[SoakRun]] = {}
    probes: dict[int, FitProbe] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lens-soak-") as tmp:
        root = Path(tmp)
        model_dir = ensure_demo_model()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        for workers in args.workers:
            for attempt in range(args.runs):
                settings = soak_settings(root / f"data-{workers}-{attempt}", model_dir, keys)
                stack = Stack(settings)
                try:
                    stack.start(workers=workers)
                    stack.wait_ready(timeout=300)
                    check = ResultCheck(tokenizer, shape_of(stack.url, keys[0]))
                    print(f"[soak] {workers} worker(s), run {attempt + 1}…", flush=True)
                    run = soak_service(stack, keys, jobs, args.clients, check, warmup)
                    if attempt == 0:
                        probes[workers] = fit_probe(stack.url, keys[0])
                finally:
                    stack.stop()
                    if args.logs is not None:
                        shutil.copytree(
                            settings.data_dir / "logs",
                            args.logs / f"{workers}-{attempt}",
                            dirs_exist_ok=True,
                        )
                by_workers.setdefault(workers, []).append(run)
                for row in rows([run], args.count):
                    print(f"[soak]   {row.measure}: {row.value}  {row.detail}", flush=True)
                for failure in run.failures[:10]:
                    print(f"[soak]   failure: {failure}", flush=True)
    all_rows = [
        row
        for workers, runs in by_workers.items()
        for row in rows(runs, args.count) + probe_rows(probes[workers], workers)
    ]
    all_rows += scaling_row(by_workers)
    setup = _setup(args, mix)
    setup["load average (1 min) at start, end"] = f"{load_before:.2f}, {os.getloadavg()[0]:.2f}"
    print()
    print(table(all_rows))
    if not args.no_write:
        body = [*[f"- {k}: {v}" for k, v in setup.items()], "", table(all_rows)]
        path = write_section("Soak", body, time.perf_counter() - started)
        print(f"\nwritten to {path}; machine: {json.dumps(machine())}")


def shape_of(url: str, key: str) -> Shape:
    http = BenchClient(url, api_key=key)
    try:
        info = http.get_json(f"/v1/models/{MODEL}")
    finally:
        http.close()
    return Shape(
        layers=info["layers"],
        heads=info["heads"],
        hidden_size=info["hidden_size"],
        vocab_size=info["vocab_size"],
    )


def _setup(args: argparse.Namespace, mix: dict[str, float]) -> dict[str, str]:
    shares = ", ".join(f"{round(100 * v)} % {k}" for k, v in mix.items())
    return {
        "command": f"python -m bench --soak --keys {args.keys} --clients {args.clients} "
        f"--count {args.count} --workers {' '.join(map(str, args.workers))} --runs {args.runs}",
        "burst": f"{args.count} jobs ({shares}); score and trace: one copy prompt of 6–11 "
        f"words (16 distinct), trace layers {TRACE_LAYERS} sites {TRACE_SITES}; chg: "
        f"{CHG_PAIRS} pairs, {json.dumps(CHG_PARAMS)}",
        "clients": f"{args.clients} threads, client c on key c mod {args.keys}, each submitting "
        "its key's next job then fetching its result with one held GET …/result?wait=",
        "service": "app.stack.Stack with lens serve's defaults (its own Redis, the API, N "
        "workers), a fresh one per run; a warm-up burst of "
        f"{2 * args.clients} jobs first, not counted",
        "model": f"the demo model (a Llama of {demo.LAYERS} layers, hidden {demo.HIDDEN}, "
        f"{demo.HEADS} heads, trained to copy), float32 on CPU",
        "during a chg": "after the first burst of each worker count, a chg of "
        f"{json.dumps(PROBE_FIT)} and {PROBE_JOBS} one-text score jobs sent one after "
        "another once its first update is reported",
    }
