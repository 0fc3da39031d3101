"""The GPU check: one script, one table, at most 8 minutes on one GPU.

``python -m bench.gpu`` builds the Llama-3.2-1B shape (``bench/shapes.py``, random
weights, on the GPU) and measures, in bfloat16 and in float32:

- score throughput in tokens per second at batch 1, 16 and 64 (texts of 128 tokens);
- the speed-up of cross-job batching: 16 one-text score jobs through the worker's
  batcher (``workers/shared_pass.py``) in one shared pass, against one pass each;
- a CHG fit's seconds per update at batch 64 (one gate set), lens-server's core
  against ``inteprelens`` 0.2.1 on the same GPU, model, prompts and batch, when the
  seed is importable (``--seed-path DIR`` puts a folder holding it on ``sys.path``);
- peak CUDA memory (above the loaded model) per job kind: score at batch 64, a trace
  of every site at every layer of one 128-token text, the batched pass, a CHG update;
- with several GPUs, the model split over them (``device_map="auto"``) and scored.

``--tiny`` runs the same on the CPU with the test suite's tiny Llama (a test does, so
the script cannot rot); memory is then the process's resident-set peak. ``--write``
puts the table into ``bench/results.md`` as its "GPU check" section.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from app.schemas import ScoreJob
from bench.memory import Peak, measure
from bench.models import texts_of_length
from bench.report import RESULTS, Row, machine, table, write_section_into
from bench.shapes import build_shape
from workers import shared_pass
from workers.lens import scoring, tracing
from workers.lens.chg import fit_chg
from workers.lens.demo import copy_task_examples
from workers.lens.loading import LoadedModel, load_model
from workers.lens.testing import build_tiny_model

SECTION = "## GPU check"
SHAPE = "llama-3.2-1b"
BATCHES = (1, 16, 64)
JOBS = 16


@dataclass(frozen=True)
class Plan:
    """What one run measures, and on what: the real shape on CUDA, or ``--tiny``."""

    device: str
    dtypes: tuple[str, ...]
    tokens: int
    chg_batch: int
    chg_updates: int
    repeats: int


GPU = Plan("cuda", ("bfloat16", "float32"), tokens=128, chg_batch=64, chg_updates=10, repeats=3)
TINY = Plan("cpu", ("float32", "bfloat16"), tokens=16, chg_batch=8, chg_updates=1, repeats=1)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny Llama on the CPU")
    parser.add_argument("--seed-path", type=Path, help="a folder holding inteprelens")
    parser.add_argument("--model", type=Path, help="an already built model directory")
    parser.add_argument("--write", action="store_true", help="write into bench/results.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Row]:
    args = _parse(argv)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny on the CPU")
    plan = TINY if args.tiny else GPU
    seed = _seed_api(args.seed_path)
    started = time.perf_counter()
    threads = torch.get_num_threads()
    if args.tiny:
        torch.set_num_threads(1)  # a tiny model gains nothing from more, and loses when shared
    try:
        rows = _run(args, plan, seed)
    finally:
        torch.set_num_threads(threads)
    info = machine()
    rows.append(
        Row(
            "machine",
            info["device"],
            f"{info['CPU']}, torch {info['torch']}; {time.perf_counter() - started:.0f} s in all",
        )
    )
    text = table(rows)
    print(text, flush=True)
    if args.write:
        note = f"Written by `python -m bench.gpu` on {info['device']}."
        write_section_into(RESULTS, SECTION, f"{SECTION}\n\n{note}\n\n{text}")
    return rows


def _run(args: argparse.Namespace, plan: Plan, seed: Any) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="lens-gpu-") as tmp:
        path = args.model or _build(Path(tmp), args.tiny)
        for dtype in plan.dtypes:
            print(f"[gpu] {dtype} …", flush=True)
            lm = load_model(str(path), device=plan.device, dtype=dtype)
            rows += _measure_dtype(lm, dtype, plan, seed)
            del lm
            _free()
        if not args.tiny and torch.cuda.device_count() > 1:
            rows += _split(path, plan)
    return rows


def _build(root: Path, tiny: bool) -> Path:
    if tiny:
        return build_tiny_model("llama", root / "tiny-llama")
    with torch.device("cuda"):  # random initialisation on the GPU: seconds, not minutes
        return build_shape(SHAPE, root)


def _measure_dtype(lm: LoadedModel, dtype: str, plan: Plan, seed: Any) -> list[Row]:
    rows = []
    for batch in BATCHES:
        texts = texts_of_length(lm.tokenizer, batch, plan.tokens, seed=batch)
        seconds, peak = _timed(partial(scoring.score, lm, texts), plan.repeats)
        rows.append(
            Row(
                f"score, batch {batch} × {plan.tokens} tokens, {dtype}",
                f"{batch * plan.tokens / seconds:,.0f} tokens/s",
                f"{seconds * 1e3:.1f} ms a pass; {_memory(peak)}",
            )
        )
    text = texts_of_length(lm.tokenizer, 1, plan.tokens, seed=3)
    seconds, peak = _timed(lambda: tracing.trace(lm, text), plan.repeats)
    rows.append(
        Row(
            f"trace, all sites × all layers, 1 × {plan.tokens} tokens, {dtype}",
            f"{seconds * 1e3:.0f} ms",
            _memory(peak),
        )
    )
    rows.append(_batching(lm, dtype, plan))
    rows += _chg(lm, dtype, plan, seed)
    return rows


def _batching(lm: LoadedModel, dtype: str, plan: Plan) -> Row:
    """16 one-text score jobs: the worker's shared pass against a pass per job."""
    texts = texts_of_length(lm.tokenizer, JOBS, plan.tokens // 2, seed=2)
    jobs = [shared_pass.prepare(lm, ScoreJob(model="m", texts=t)) for t in texts]

    def run(items: list[shared_pass.Prepared]) -> None:
        list(shared_pass.results(lm, items, shared_pass.forward(lm, items)))

    def alone() -> None:
        for job in jobs:
            run([job])

    def shared() -> None:
        run(jobs)

    one_each, _ = _timed(alone, plan.repeats)
    together, peak = _timed(shared, plan.repeats)
    return Row(
        f"batching, {JOBS} one-text score jobs of {plan.tokens // 2} tokens, {dtype}",
        f"{one_each / together:.1f}× faster",
        f"one shared pass {together * 1e3:.1f} ms, a pass each {one_each * 1e3:.1f} ms in "
        f"all; shared pass: {_memory(peak)}",
    )


def _chg(lm: LoadedModel, dtype: str, plan: Plan, seed: Any) -> list[Row]:
    """Seconds per CHG update at batch 64 (8 with ``--tiny``), ours then the seed's, after
    a warm-up fit each."""
    prompts, targets = copy_task_examples(plan.chg_batch, seed=0)
    batch = plan.chg_batch

    def ours(updates: int) -> None:
        fit_chg(
            lm, prompts, targets, seed=0, num_masks=1, batch_size=batch, num_updates=updates,
            num_reg_updates=0,
        )  # fmt: skip

    fits: dict[str, Callable[[int], None]] = {"lens-server": ours}
    if seed is not None:
        api = seed(lm.model, lm.tokenizer, device=str(lm.device))
        fits["inteprelens 0.2.1"] = lambda updates: api.fit(
            texts=prompts, targets=targets, verbose=False, num_masks=1, batch_size=batch,
            num_updates=updates, num_reg_updates=0,
        )  # fmt: skip
    per_update: dict[str, float] = {}
    rows = []
    for name, fit in fits.items():
        fit(1)
        _, peak = measure(partial(fit, plan.chg_updates), collect=False)
        per_update[name] = peak.seconds / plan.chg_updates
        rows.append(
            Row(
                f"CHG update, batch {plan.chg_batch}, 1 gate set, {dtype}: {name}",
                f"{per_update[name]:.3f} s",
                f"{plan.chg_updates} updates after a one-update warm-up fit; {_memory(peak)}",
            )
        )
    if seed is None:
        rows.append(Row(f"CHG update, {dtype}: inteprelens 0.2.1", "n/a", "not importable"))
    else:
        ratio = per_update["inteprelens 0.2.1"] / per_update["lens-server"]
        rows.append(Row(f"CHG speed-up over inteprelens, {dtype}", f"{ratio:.2f}×", ""))
    return rows


def _split(path: Path, plan: Plan) -> list[Row]:
    """The model spread over every visible GPU by accelerate, then a batch of 16 scored."""
    lm = load_model(str(path), dtype="bfloat16", device_map="auto")
    texts = texts_of_length(lm.tokenizer, 16, plan.tokens, seed=16)
    seconds, peak = _timed(lambda: scoring.score(lm, texts), plan.repeats)
    return [
        Row(
            f"device_map='auto' over {torch.cuda.device_count()} GPUs, score 16 × {plan.tokens}",
            f"{16 * plan.tokens / seconds:,.0f} tokens/s",
            f"placement {', '.join(lm.placement)}; {_memory(peak)}",
        )
    ]


def _timed(call: Callable[[], object], repeats: int) -> tuple[float, Peak]:
    """Median seconds of ``repeats`` (at least one) calls after a warm-up one, and the
    first timed call's memory peak (its result, held until it returns, counts)."""
    call()
    _, peak = measure(call, collect=False)
    seconds = [peak.seconds] + [measure(call, collect=False)[1].seconds for _ in range(repeats - 1)]
    return statistics.median(seconds), peak


def _memory(peak: Peak) -> str:
    if peak.cuda_peak_above is not None:
        return f"CUDA peak +{peak.cuda_peak_above / 2**20:,.0f} MiB over the model"
    return f"RSS peak +{peak.rss_above / 2**20:,.0f} MiB"


def _seed_api(path: Path | None) -> Any:
    """inteprelens' ``LensAPI`` if it can be imported (``path`` put first on ``sys.path``),
    else ``None``."""
    if path is not None:
        sys.path.insert(0, str(path))
    try:
        from inteprelens import LensAPI  # type: ignore[import-not-found]
    except ImportError:
        return None
    return LensAPI


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
