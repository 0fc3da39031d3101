"""Time the seed library's CHG fit against lens-server's, on the demo model, on CPU.

The seed library (``inteprelens`` 0.2.1) is an optional comparison, never a dependency:
install it with the project into a scratch virtualenv and run this script from the
repository root::

    python -m venv /tmp/seedenv
    /tmp/seedenv/bin/pip install torch==2.13.0 -e . inteprelens==0.2.1
    /tmp/seedenv/bin/python -m bench.chg_vs_seed --num-masks 10 --updates 50

All fits get the same prompts and targets (the demo's copy task), the same number of
gate sets, updates, regularised updates and batch size, and the same CPU threads. Three
things are timed, in turn: the seed's ``LensAPI.fit`` in-process; ours in-process
(``workers.lens.chg.fit_chg``, from tokenisation to the finished result); and ours as a
``chg`` job end to end through the service (its own Redis, one worker and the API, all
on this machine: submit, wait on the event stream, download the result). The script
prints each run, the medians and the speed-ups as JSON, by wall clock and (in-process
only) by this process's CPU time. The seed's per-update NLL is not reported: its
metrics read 0.0 (reset before they are returned).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from app.core.config import ModelSpec, Settings
from app.core.redis_server import free_port
from app.stack import Stack
from bench.client import BenchClient
from workers.lens.chg import fit_chg
from workers.lens.demo import copy_task_examples, ensure_demo_model
from workers.lens.loading import load_model


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model directory (default: the demo model)")
    parser.add_argument("--examples", type=int, default=64, help="prompt/target pairs")
    parser.add_argument("--num-masks", type=int, default=10)
    parser.add_argument("--updates", type=int, default=50, help="num_updates")
    parser.add_argument("--reg-updates", type=int, default=None, help="default: --updates")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


def main() -> None:
    args = _parse()
    from inteprelens import LensAPI  # the optional comparison, imported only when run

    torch.set_num_threads(args.threads)
    path = str(args.model or ensure_demo_model())
    prompts, targets = copy_task_examples(args.examples, seed=0)
    reg_updates = args.updates if args.reg_updates is None else args.reg_updates
    params = {
        "num_masks": args.num_masks,
        "num_updates": args.updates,
        "num_reg_updates": reg_updates,
        "batch_size": args.batch_size,
    }
    seed_api = LensAPI.from_pretrained(path, device="cpu")
    ours = load_model(path, device="cpu")

    def run_seed(_repeat: int) -> dict[str, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        seed_api.fit(texts=prompts, targets=targets, verbose=False, **params)
        return {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}

    def run_ours(repeat: int) -> dict[str, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        result = fit_chg(ours, prompts, targets, seed=repeat, **params)
        times = {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}
        return times | {f"nll_{k}": v for k, v in result.summary["final_nll"].items()}

    with _service(path, args.threads) as client:

        def run_service(repeat: int) -> dict[str, float]:
            body = {"kind": "chg", "model": "demo", "texts": prompts, "targets": targets}
            trip = client.round_trip(body | params | {"seed": repeat})
            return {"seconds": trip.seconds, "result_bytes": trip.result_bytes}

        runs = _alternate(
            {"seed": run_seed, "ours": run_ours, "service": run_service}, args.repeats
        )
    medians = {
        clock: {
            name: statistics.median(r[clock] for r in rs)
            for name, rs in runs.items()
            if clock in rs[0]
        }
        for clock in ("seconds", "cpu_seconds")
    }
    report = {
        "model": path,
        "examples": args.examples,
        "threads": args.threads,
        "torch": torch.__version__,
        **params,
        "median": medians,
        "speedup": {
            clock: {name: m["seed"] / t for name, t in m.items() if name != "seed"}
            for clock, m in medians.items()
        },
    }
    print(json.dumps(report, indent=2))


def _alternate(
    contenders: dict[str, Callable[[int], dict[str, float]]], repeats: int
) -> dict[str, list[dict[str, float]]]:
    """Run each contender ``repeats`` times, in an order that rotates every round, so
    that a slow spell of a shared machine does not fall on one of them only."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
    names = list(contenders)
    for repeat in range(repeats + 1):  # round 0 warms up and is not kept
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            times = contenders[name](repeat)
            print(json.dumps({"run": name, "repeat": repeat, **times}), flush=True)
            if repeat:
                runs[name].append(times)
    return runs


@contextmanager
def _service(model: str, threads: int) -> Iterator[BenchClient]:
    """lens-server on this machine (its own Redis, one worker, the API) serving ``model``
    as ``demo``, its worker given ``threads`` torch threads."""
    with tempfile.TemporaryDirectory(prefix="lens-chg-bench-") as tmp:
        settings = Settings(
            redis_url="redis://unused",
            data_dir=Path(tmp),
            models={"demo": ModelSpec(source=model)},
            port=free_port(),
            worker_threads=threads,
        )
        stack = Stack(settings)
        try:
            stack.start(workers=1)
            stack.wait_ready(timeout=300)
            client = BenchClient(stack.url)
            try:
                yield client
            finally:
                client.close()
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
