"""The machine a run was on, and the table: printed, and written to ``bench/results.md``."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("results.md")


@dataclass(frozen=True)
class Row:
    measure: str
    value: str
    detail: str = ""


def machine() -> dict[str, str]:
    """CPU model, cores, memory, torch, and the device the worker computes on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "CPU": cpu,
        "cores": str(os.cpu_count()),
        "memory": f"{_total_memory_gib():.0f} GiB" if _total_memory_gib() else "unknown",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = (
            f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
        )
    else:
        info["device"] = "CPU"
    return info


def _total_memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def table(rows: list[Row]) -> str:
    lines = ["| measure | value | detail |", "|---|---|---|"]
    lines += [f"| {r.measure} | {r.value} | {r.detail} |" for r in rows]
    return "\n".join(lines)


SECTION_MARK = "<!-- section: "
"""Opens a section that another command than ``python -m bench`` writes (e.g. ``--soak``):
``python -m bench`` keeps such sections when it rewrites the file, and each command
replaces only its own."""


def _sections(text: str) -> dict[str, str]:
    """The marked sections of a results file, by name, each with its marker line."""
    found: dict[str, str] = {}
    parts = text.split(SECTION_MARK)
    for part in parts[1:]:
        name = part.split(" -->", 1)[0]
        found[name] = SECTION_MARK + part.rstrip("\n") + "\n"
    return found


def write_section(name: str, body: list[str], seconds: float) -> Path:
    """Replace (or add) the section ``name`` of ``bench/results.md``: a heading, when it was
    written and on what machine, then ``body``; the rest of the file is kept."""
    old = RESULTS.read_text() if RESULTS.is_file() else "# Benchmark results\n"
    head = old.split(SECTION_MARK, 1)[0].rstrip("\n") + "\n"
    sections = _sections(old)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    info = ", ".join(f"{k} {v}" for k, v in machine().items())
    sections[name] = "\n".join(
        [
            f"{SECTION_MARK}{name} -->",
            f"## {name}",
            "",
            f"Written on {when}, in {seconds:.0f} s; machine: {info}.",
            "",
            *body,
            "",
        ]
    )
    RESULTS.write_text(head + "".join(f"\n{s}" for s in sections.values()))
    return RESULTS


def write_results(rows: list[Row], setup: dict[str, str], seconds: float) -> Path:
    """``bench/results.md``: when, on what, with what, and the table (sections written by
    other commands are kept)."""
    kept = _sections(RESULTS.read_text()) if RESULTS.is_file() else {}
    info = machine()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = [
        "# Benchmark results",
        "",
        f"Written by `python -m bench` (`make bench`) on {when}, in {seconds:.0f} s.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        "## Setup",
        "",
        *[f"- {k}: {v}" for k, v in setup.items()],
        "",
        "## Results",
        "",
        table(rows),
        "",
    ]
    RESULTS.write_text("\n".join(text) + "".join(f"\n{s}" for s in kept.values()))
    return RESULTS
