"""Seconds per CHG update of one implementation, in this process: ``ours`` or ``seed``.

The shapes tier (``python -m bench --shapes``) and ``bench/gpu.py`` run it twice per
comparison, in separate fresh processes: lens-server's core (``workers.lens.chg.fit_chg``)
under the project's interpreter, and ``inteprelens`` 0.2.1 (``LensAPI.fit``) under an
interpreter that has it (a scratch virtualenv: see ``bench/chg_vs_seed.py``). Both get
the same prompts and targets (a JSON file), gate sets, batch size, updates, dtype,
device and threads. Each first runs a one-update fit (which also pays any one-time
cost, such as our check of a model's exact shortcuts; ``--no-warm-up`` skips it), then
the timed fit; its wall
time over its updates (``num_updates + 2 × num_reg_updates``) is the figure, with the
process's CPU time per update beside it (the fairer one on a machine others share:
a process that waits for a core is not charged for the wait).

This file imports nothing of the project at module level, so that the seed's
interpreter can run it without the project's dependencies.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

SEED_PYTHON_ENV = "LENS_BENCH_SEED_PYTHON"
SEED_VENVS = (Path("/tmp/seedenv/bin/python"),)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("impl", choices=("ours", "seed"))
    parser.add_argument("model", help="model directory")
    parser.add_argument("examples", type=Path, help='JSON file: {"texts": [...], "targets": [...]}')
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-masks", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--updates", type=int, default=2, help="num_updates")
    parser.add_argument("--reg-updates", type=int, default=0, help="num_reg_updates")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--no-warm-up", dest="warm_up", action="store_false", help="time the first fit"
    )
    return parser.parse_args()


def main() -> None:
    args = _parse()
    torch.set_num_threads(args.threads)
    data = json.loads(args.examples.read_text())
    texts, targets = data["texts"], data["targets"]
    began = time.perf_counter()
    fit = _seed(args) if args.impl == "seed" else _ours(args)
    load_s = time.perf_counter() - began

    def timed(updates: int, reg_updates: int) -> tuple[float, float]:
        params = {
            "num_masks": args.num_masks,
            "batch_size": args.batch_size,
            "num_updates": updates,
            "num_reg_updates": reg_updates,
        }
        _sync(args.device)
        began, cpu = time.perf_counter(), time.process_time()
        fit(texts, targets, params)
        _sync(args.device)
        return time.perf_counter() - began, time.process_time() - cpu

    warm = timed(1, 0)[0] if args.warm_up else None
    seconds, cpu_seconds = timed(args.updates, args.reg_updates)
    updates = args.updates + 2 * args.reg_updates
    report = {
        "impl": args.impl,
        "dtype": args.dtype,
        "device": args.device,
        "threads": args.threads,
        "num_masks": args.num_masks,
        "batch_size": args.batch_size,
        "updates": updates,
        "load_seconds": load_s,
        "warm_up_seconds": warm,
        "seconds": seconds,
        "seconds_per_update": seconds / updates,
        "cpu_seconds_per_update": cpu_seconds / updates,
    }
    if args.device.startswith("cuda"):
        report["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    print(json.dumps(report), flush=True)


Fit = Any


def _ours(args: argparse.Namespace) -> Fit:
    from workers.lens.chg import fit_chg
    from workers.lens.loading import load_model

    lm = load_model(args.model, device=args.device, dtype=args.dtype)

    def fit(texts: list[str], targets: list[str], params: dict[str, int]) -> None:
        fit_chg(
            lm, texts, targets, seed=0, num_masks=params["num_masks"],
            batch_size=params["batch_size"], num_updates=params["num_updates"],
            num_reg_updates=params["num_reg_updates"],
        )  # fmt: skip

    return fit


def _seed(args: argparse.Namespace) -> Fit:
    from inteprelens import LensAPI  # type: ignore[import-not-found]  # optional, only when run

    api = LensAPI.from_pretrained(
        args.model, device=args.device, torch_dtype=getattr(torch, args.dtype)
    )

    def fit(texts: list[str], targets: list[str], params: dict[str, int]) -> None:
        api.fit(texts=texts, targets=targets, verbose=False, **params)

    return fit


def seed_python() -> str | None:
    """An interpreter that can import ``inteprelens``: ``$LENS_BENCH_SEED_PYTHON``, this
    one, or the scratch virtualenv ``bench/chg_vs_seed.py`` suggests; ``None`` if none."""
    configured = os.environ.get(SEED_PYTHON_ENV)
    if configured:
        return configured
    if importlib.util.find_spec("inteprelens") is not None:
        return sys.executable
    for venv in SEED_VENVS:
        probe = [str(venv), "-c", "import inteprelens"]
        if venv.is_file() and subprocess.run(probe, check=False).returncode == 0:
            return str(venv)
    return None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
