"""Time the seed library's CHG fit against lens-server's, on the demo model, on CPU.

The seed library (``inteprelens`` 0.2.1) is an optional comparison, never a dependency:
install it with the project into a scratch virtualenv and run this script from the
repository root::

    python -m venv /tmp/seedenv
    /tmp/seedenv/bin/pip install -e . inteprelens==0.2.1
    /tmp/seedenv/bin/python bench/chg_vs_seed.py --num-masks 10 --updates 50

Both fits get the same prompts and targets (the demo's copy task), the same number of
gate sets, updates, regularised updates and batch size, and the same CPU threads. The
seed's ``LensAPI.fit`` is timed in-process; ours is ``workers.lens.chg.fit_chg`` from
tokenisation to the finished result. Runs alternate between the two, and the script
prints each run, the medians and the speed-up as JSON, by wall clock and by this
process's CPU time (the fairer figure on a machine shared with other work). The seed's
per-update NLL is not reported: its metrics read 0.0 (reset before they are returned).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

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

    def run_seed() -> dict[str, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        seed_api.fit(texts=prompts, targets=targets, verbose=False, **params)
        return {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}

    def run_ours(seed: int) -> dict[str, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        result = fit_chg(ours, prompts, targets, seed=seed, **params)
        times = {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}
        return times | {f"nll_{k}": v for k, v in result.summary["final_nll"].items()}

    runs: dict[str, list[dict[str, float]]] = {"seed": [], "ours": []}
    for repeat in range(args.repeats):
        order = [("seed", run_seed), ("ours", lambda r=repeat: run_ours(r))]
        for name, run in order if repeat % 2 == 0 else order[::-1]:
            runs[name].append(run())
            print(json.dumps({"run": name, "repeat": repeat, **runs[name][-1]}), flush=True)
    medians = {
        clock: {name: statistics.median(r[clock] for r in rs) for name, rs in runs.items()}
        for clock in ("seconds", "cpu_seconds")
    }
    report = {
        "model": path,
        "examples": args.examples,
        "threads": args.threads,
        "torch": torch.__version__,
        **params,
        "median": medians,
        "speedup": {clock: m["seed"] / m["ours"] for clock, m in medians.items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
