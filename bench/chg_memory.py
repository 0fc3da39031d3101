"""Peak memory of a CHG update at a long context, with gradient checkpointing and without.

``python -m bench.chg_memory [SHAPE ...] [--tokens N] [--batch-size B] [--write]``: for
each shape of ``bench/shapes.py`` (built once), one chg fit of one update on ``B``
prompts of ``N`` tokens, in a fresh process per setting: ``checkpoint_above`` at its
default (the batch is checkpointed) and above the prompts' length (it is not). Each
reports the process's peak resident memory above the loaded model (its high-water mark
reset just before the fit), the fit's seconds, and the peak the API estimates for the
same job at submission (``app.core.jobsize.peak_bytes``). ``--write`` puts the table
into ``bench/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SECTION = "CHG memory at long contexts"
TARGET = " the end"
MMAP_THRESHOLD = 1 << 20


def one(shape: str, tokens: int, batch_size: int, checkpoint_above: int, threads: int) -> None:
    """In this process: load ``shape``, fit, print one JSON line."""
    import torch

    from app.core.config import Limits
    from app.core.jobsize import peak_bytes
    from app.schemas import ChgJob
    from bench.memory import measure
    from bench.models import texts_of_length
    from bench.shapes import build_shape
    from workers.lens.chg import fit_chg
    from workers.lens.gated_forward import shortcuts
    from workers.lens.loading import load_model
    from workers.limits import check_tokens, model_shape

    torch.set_num_threads(threads)
    lm = load_model(str(build_shape(shape)), device="cpu", dtype="float32")
    prompts = texts_of_length(lm.tokenizer, batch_size, tokens, seed=5)
    targets = [TARGET] * batch_size
    fit = {"num_masks": 1, "num_updates": 1, "num_reg_updates": 0, "batch_size": batch_size}
    job = ChgJob.model_validate(
        {"model": shape, "texts": prompts, "targets": targets, **fit}
        | {"checkpoint_above": checkpoint_above}
    )
    with tempfile.TemporaryDirectory() as tmp:
        counts = check_tokens(job, lm.tokenizer, Limits(), Path(tmp))
    model = model_shape(lm)
    if model is None:
        raise RuntimeError(f"{shape}: the worker would publish no shape")
    seq = max(p + t for p, t in zip(counts["texts"], counts["targets"], strict=True))
    shortcuts(lm)  # its one-time check of exact shortcuts, not part of the fit
    cpu = time.process_time()
    _, peak = measure(
        lambda: fit_chg(
            lm,
            prompts,
            targets,
            num_masks=1,
            num_updates=1,
            num_reg_updates=0,
            batch_size=batch_size,
            seed=0,
            checkpoint_above=checkpoint_above,
        )
    )
    print(
        json.dumps(
            {
                "shape": shape,
                "tokens": tokens,
                "batch_size": batch_size,
                "checkpoint_above": checkpoint_above,
                "checkpointed": seq >= checkpoint_above,
                "seconds": peak.seconds,
                "cpu_seconds": time.process_time() - cpu,
                "rss_above": peak.rss_above,
                "estimate": peak_bytes(job, model, counts),
                "threads": threads,
            }
        ),
        flush=True,
    )


def run(
    shape: str, tokens: int, batch_size: int, checkpoint_above: int, threads: int
) -> dict[str, Any]:
    args = [sys.executable, "-m", "bench.chg_memory", shape, "--one", str(checkpoint_above)]
    args += [f"--tokens={tokens}", f"--batch-size={batch_size}", f"--threads={threads}"]
    # Large blocks from mmap, returned when freed: the resident peak is then what was live,
    # not what glibc's heap kept after an earlier free (runs differed by 0.3 GiB without).
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, check=False, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{shape}: {done.stderr.strip()[-2000:]}")
    return dict(json.loads(lines[-1]))


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| shape | prompts | checkpointing | peak above the model | estimate at submission | "
        "seconds (CPU) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['batch_size']} × {r['tokens']} tokens | "
            f"{'on' if r['checkpointed'] else 'off'} (checkpoint_above={r['checkpoint_above']}) | "
            f"{r['rss_above'] / 2**30:.2f} GiB | {r['estimate'] / 2**30:.2f} GiB | "
            f"{r['seconds']:.1f} s ({r['cpu_seconds']:.1f} s) |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shapes", nargs="*", default=["smollm2-135m"])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", type=int, metavar="CHECKPOINT_ABOVE", help=argparse.SUPPRESS)
    parser.add_argument("--write", action="store_true", help="into bench/results.md")
    args = parser.parse_args()
    if args.one is not None:
        one(args.shapes[0], args.tokens, args.batch_size, args.one, args.threads)
        return
    began = time.perf_counter()
    rows = []
    for shape in args.shapes:
        for above in (512, 1 << 20):
            rows.append(run(shape, args.tokens, args.batch_size, above, args.threads))
            print(json.dumps(rows[-1]), flush=True)
    body = [
        *table(rows),
        "",
        f"- `python -m bench.chg_memory {' '.join(args.shapes)} --tokens {args.tokens} "
        f"--batch-size {args.batch_size} --threads {args.threads}`: one chg update (one gate "
        "set, float32, on the CPU) on prompts of that many tokens, each setting in a fresh "
        "process (glibc's mmap threshold at 1 MiB, so freed tensors leave the resident set), "
        "one torch thread on a 2-core machine shared with other sessions' work (wall "
        "seconds vary with it; CPU seconds less); "
        "peak: its resident high-water mark during the fit above what it held "
        "before (the loaded model); estimate: `app.core.jobsize.peak_bytes` for the same job.",
    ]
    print("\n".join(body))
    if args.write:
        from bench.report import write_section

        write_section(SECTION, body, time.perf_counter() - began)


if __name__ == "__main__":
    main()
