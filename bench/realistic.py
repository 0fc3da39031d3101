"""The shapes tier, ``python -m bench --shapes [NAME ...]``: the models labs serve, measured.

Not part of CI: a few minutes per shape on a small CPU machine. For each shape of
``bench/shapes.py`` (built once into its cache directory), it records:

- load: the worker's own load time (from its heartbeat) and its resident memory before
  the load (a fresh process with the worker's imports) and once the model is loaded;
- a score job (8 texts × 64 tokens, full logits) and a trace job (one text of 128
  tokens, every site at every layer, float32) through a real service (its own Redis,
  one worker, the API): round-trip seconds and the worker's peak resident memory
  during the job (its high-water mark reset before it);
- each job's result size next to the estimate made at submission
  (:func:`submission_estimate`);
- a CHG fit's seconds per update, lens-server's core against ``inteprelens`` 0.2.1,
  each in a fresh process with the same prompts, gate sets, batch and updates, in
  float32 and in bfloat16 (``bench/chg_per_update.py``; the seed's column reads
  "not installed" without it).

The table is printed and written into ``bench/results.md`` as its "Real shapes"
section (the rest of the file is kept).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from transformers import AutoTokenizer

from app import presence
from app.core.config import ModelSpec, Settings
from app.core.redis_server import free_port
from app.stack import Stack
from bench.chg_per_update import seed_python
from bench.client import BenchClient
from bench.memory import reset_peak, status_bytes
from bench.models import texts_of_length
from bench.report import RESULTS, machine, write_section_into
from bench.shapes import DEFAULT_SHAPES, SHAPES, build_shape
from workers.lens.demo import copy_task_examples

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Real shapes"
ROWS = Path(__file__).with_name("shapes_results.json")
CHG = {"num_masks": 1, "batch_size": 2, "updates": 1, "reg_updates": 0}
"""The CHG comparison's fit: small, so that a 1B model runs it in minutes on a CPU."""
GIB = 1 << 30


def main(names: list[str], threads: int | None, chg_dtypes: list[str]) -> None:
    """Measure each shape, then rewrite the section from every shape measured so far
    (``bench/shapes_results.json`` keeps each shape's latest row, so runs of different
    shapes add up)."""
    rows = json.loads(ROWS.read_text()) if ROWS.is_file() else {}
    for name in names or DEFAULT_SHAPES:
        began = time.perf_counter()
        print(f"[shapes] {name}: building (once) …", flush=True)
        path = build_shape(name)
        row = {
            "shape": name,
            "mirrors": SHAPES[name].mirrors,
            **measure_shape(name, path, threads, chg_dtypes),
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average": os.getloadavg()[0],
            "threads": threads,
        }
        row["total_seconds"] = time.perf_counter() - began
        print(f"[shapes] {name}: {json.dumps(row)}", flush=True)
        rows[name] = row
        ROWS.write_text(json.dumps(rows, indent=1) + "\n")
    text = section([rows[n] for n in SHAPES if n in rows])
    print("\n" + text)
    write_section(text)
    print(f"\nwritten to {RESULTS}")


def measure_shape(
    name: str, path: Path, threads: int | None, chg_dtypes: list[str]
) -> dict[str, Any]:
    row: dict[str, Any] = {"parameters": SHAPES[name].parameters()}
    row["rss_before_load"] = _imports_rss()
    with _service(name, path, threads) as (stack, client):
        worker = next(iter(stack.workers.values())).pid
        row["load_seconds"] = _worker_info(stack)["load_seconds"][name]
        row["rss_after_load"] = status_bytes(worker, "VmRSS")
        tokenizer = AutoTokenizer.from_pretrained(path)
        jobs = {
            "score": {"kind": "score", "texts": texts_of_length(tokenizer, 8, 64, seed=1)},
            "trace": {"kind": "trace", "texts": texts_of_length(tokenizer, 1, 128, seed=3)},
        }
        for kind, body in jobs.items():
            body = body | {"model": name}
            idle = status_bytes(worker, "VmRSS")
            reset_peak(worker)
            trip = client.round_trip(body)
            estimate = submission_estimate(client, trip.job_id)
            row[kind] = {
                "seconds": trip.seconds,
                "worker_idle": idle,
                "worker_peak": status_bytes(worker, "VmHWM"),
                "result_bytes": trip.result_bytes,
                "estimate": estimate and estimate["result_bytes"],
                "peak_estimate": estimate and estimate["peak_bytes"],
            }
            print(f"[shapes] {name}: {kind} {row[kind]}", flush=True)
    row["chg"] = chg_comparison(path, threads, chg_dtypes)
    return row


def submission_estimate(client: BenchClient, job_id: str) -> dict[str, int] | None:
    """The result size and peak memory the API estimated at submission, in bytes, as it
    stored them in the job's document (``estimate``: ``result_bytes``, ``peak_bytes``);
    ``None`` where it made none (no shape published)."""
    estimate = client.get_json(f"/v1/jobs/{job_id}").get("estimate")
    if not estimate:
        return None
    return {k: int(estimate[k]) for k in ("result_bytes", "peak_bytes")}


def chg_comparison(path: Path, threads: int | None, dtypes: list[str]) -> dict[str, Any]:
    """Seconds per update of the seed's and ours, in each of ``dtypes``."""
    prompts, targets = copy_task_examples(16, seed=0)
    seed = seed_python()
    out: dict[str, Any] = {"seed_python": seed, **CHG}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"texts": prompts, "targets": targets}, f)
    try:
        for dtype in dtypes:
            for impl, python in (("seed", seed), ("ours", sys.executable)):
                if python is None:
                    out[f"{impl}_{dtype}"] = None
                    continue
                print(f"[shapes]   chg {impl} {dtype} …", flush=True)
                out[f"{impl}_{dtype}"] = _run_chg(python, impl, path, Path(f.name), dtype, threads)
    finally:
        os.unlink(f.name)
    return out


def _run_chg(
    python: str, impl: str, path: Path, examples: Path, dtype: str, threads: int | None
) -> dict[str, Any] | str:
    args = [python, "-m", "bench.chg_per_update", impl, str(path), str(examples)]
    args += ["--dtype", dtype, "--device", "cpu"]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in CHG.items()]
    if impl == "seed":  # no one-time cost to absorb: its first fit took as long as its second
        args.append("--no-warm-up")
    if threads:
        args.append(f"--threads={threads}")
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return "failed: " + ((done.stderr.strip().splitlines() or ["?"])[-1][:200])
    return dict(json.loads(lines[-1]))


def _imports_rss() -> int:
    """Resident bytes of a fresh process that has imported what a worker imports."""
    probe = "import workers.process, bench.memory as m; print(m.status_bytes('self', 'VmRSS'))"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    return int(done.stdout.split()[-1])


@contextmanager
def _service(name: str, path: Path, threads: int | None) -> Iterator[tuple[Stack, BenchClient]]:
    with tempfile.TemporaryDirectory(prefix="lens-shapes-") as tmp:
        settings = Settings(
            redis_url="redis://unused",
            data_dir=Path(tmp),
            models={name: ModelSpec(source=str(path))},
            port=free_port(),
            heartbeat_s=1.0,
            torch_threads=threads,
        )
        stack = Stack(settings)
        client = None
        try:
            stack.start(workers=1)
            stack.wait_ready(timeout=3600)
            client = BenchClient(stack.url)
            yield stack, client
        finally:
            if client is not None:
                client.close()
            stack.stop()


def _worker_info(stack: Stack) -> dict[str, Any]:
    conn = redis.Redis.from_url(stack.settings.redis_url)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            workers = presence.live_workers(conn)
            if workers:
                return next(iter(workers.values()))
            time.sleep(stack.settings.heartbeat_s / 2)
    finally:
        conn.close()
    raise RuntimeError("no worker heartbeat within 30 s")


def _gb(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.0f} MiB"


def _size(job: dict[str, Any]) -> str:
    real = f"{job['result_bytes'] / 1e6:.1f} MB"
    if job["estimate"] is None:
        return f"{real} (estimate n/a)"
    estimate = job["estimate"]
    late = "*" if job.get("estimate_after_the_run") else ""
    return f"{real} (est.{late} {estimate / 1e6:.1f} MB, {estimate / job['result_bytes']:.2f}×)"


def _job_cell(job: dict[str, Any]) -> str:
    """Round trip, the worker's peak, and its rise over idle next to the estimated peak."""
    cell = f"{job['seconds']:.2f} s, peak {_gb(job['worker_peak'])}"
    if job.get("peak_estimate"):
        rise = job["worker_peak"] - job["worker_idle"]
        late = "*" if job.get("peak_estimate_after_the_run") else ""
        cell += f" (+{_gb(rise)} over idle; est.{late} {_gb(job['peak_estimate'])})"
    return cell


def _short(failure: str) -> str:
    """A failure's first sentence: the seed's refusals name every architecture it knows."""
    return failure.split(". ")[0]


def _chg_cell(chg: dict[str, Any], dtype: str) -> str:
    ours, seed = chg.get(f"ours_{dtype}"), chg.get(f"seed_{dtype}")
    if ours is None and seed is None:
        return "not run"
    if not isinstance(ours, dict):
        seed_part = f"; seed {_per_update(seed)}" if isinstance(seed, dict) else ""
        return f"ours {ours}{seed_part}"
    cell = _per_update(ours)
    if isinstance(seed, dict):
        ratio = seed["cpu_seconds_per_update"] / ours["cpu_seconds_per_update"]
        cell += f" vs {_per_update(seed)}: {ratio:.2f}×"
    else:
        cell += " vs seed " + ("not installed" if seed is None else _short(str(seed)))
    return cell


def _per_update(run: dict[str, Any]) -> str:
    return f"{run['seconds_per_update']:.1f} s ({run['cpu_seconds_per_update']:.1f} CPU s)"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| shape | parameters | load | worker RSS before → after load | score 8 × 64 | "
        "trace 1 × 128, all sites | result size (estimate) score; trace | "
        "CHG s/update, ours vs seed (speed-up), fp32 | same, bf16 |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        score, trace = r["score"], r["trace"]
        lines.append(
            f"| {r['shape']} | {r['parameters'] / 1e6:.0f} M | {r['load_seconds']:.1f} s | "
            f"{_gb(r['rss_before_load'])} → {_gb(r['rss_after_load'])} | "
            f"{_job_cell(score)} | {_job_cell(trace)} | "
            f"{_size(score)}; {_size(trace)} | {_chg_cell(r['chg'], 'float32')} | "
            f"{_chg_cell(r['chg'], 'bfloat16')} |"
        )
    return "\n".join(lines)


def section(rows: list[dict[str, Any]]) -> str:
    info = machine()
    chg = rows[0]["chg"] if rows else CHG
    runs = "; ".join(
        f"{r['shape']} {r['when']}, {r['total_seconds']:.0f} s, {r.get('threads') or 'default'} "
        f"torch threads, load average {r['load_average']:.1f}"
        for r in rows
    )
    return "\n".join(
        [
            SECTION,
            "",
            f"Written by `python -m bench --shapes` on {info['CPU']} ({info['cores']} cores, "
            f"{info['memory']}), {info['device']}, torch {info['torch']}. Models are random "
            "weights in each published shape (`bench/shapes.py`), served in float32 on the "
            f"CPU by one worker. Runs (1-minute load average at the end): {runs}. The "
            "machine is shared: other sessions' tests and benchmarks ran on its 2 cores "
            "meanwhile, and some shapes ran side by side, so wall times are inflated and "
            "vary; the CHG comparison is by CPU time, which holds up better.",
            "",
            table(rows),
            "",
            "- worker RSS before load: a fresh process with the worker's imports; after: "
            "the serving worker once ready. Peaks: the worker's high-water mark during the "
            "job (reset just before it); the result itself is part of it. Over idle: the "
            "peak less the worker's resident memory just before the job; est.: the peak "
            "memory the API estimated at submission (activations and result, the model "
            "excluded). Sizes: the result file against the tensor bytes estimated at "
            "submission (the file adds its header and summary); est.*: estimated after the "
            "run, by the same estimator on the shape the worker publishes (`app.core.jobsize`), "
            "for runs made before the job document carried its estimate.",
            f"- CHG: {chg['num_masks']} gate sets, batch {chg['batch_size']}, "
            f"{chg['updates']} + 2 × {chg['reg_updates']} updates, on the demo's copy prompts, "
            "each implementation in its own fresh process; ours after a one-update warm-up "
            "fit (its per-model check of exact shortcuts is paid once per loaded model), the "
            "seed's without (its first fit took as long as its second); "
            "wall and CPU seconds per update of the timed fit, the speed-up (seed / ours) "
            "by CPU time, which a machine shared with other work distorts least. The seed "
            "runs its forward passes under bfloat16 autocast whatever the weights' dtype.",
            *[
                f"- not measured: {name} ({'; '.join(SHAPES[name].notes) or 'not run yet'})."
                for name in SHAPES
                if name not in {r["shape"] for r in rows}
            ],
            "",
        ]
    )


def write_section(text: str) -> None:
    """Replace the "Real shapes" section of ``bench/results.md`` (or append it)."""
    write_section_into(RESULTS, SECTION, text)
