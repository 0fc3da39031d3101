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


def write_results(rows: list[Row], setup: dict[str, str], seconds: float) -> Path:
    """``bench/results.md``: when, on what, with what, and the table; the sections other
    tiers wrote there (``--shapes``, ``bench/gpu.py``) are kept after it."""
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
        *other_sections(RESULTS.read_text() if RESULTS.is_file() else "", _OWN_SECTIONS),
    ]
    RESULTS.write_text("\n".join(text))
    return RESULTS


_OWN_SECTIONS = ("## Machine", "## Setup", "## Results")


def other_sections(text: str, own: tuple[str, ...]) -> list[str]:
    """The ``## `` sections of ``text`` whose titles are not in ``own``, as lines."""
    kept: list[str] = []
    keeping = False
    for line in text.splitlines():
        if line.startswith("## "):
            keeping = line not in own
        if keeping:
            kept.append(line)
    return kept


def write_section_into(path: Path, title: str, text: str) -> None:
    """Replace the section ``title`` (a ``## `` line) of ``path`` by ``text``, or append it;
    everything else in the file stays."""
    existing = path.read_text() if path.is_file() else "# Benchmark results\n"
    lines = existing.splitlines()
    if title in lines:
        start = lines.index(title)
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        lines = lines[:start] + lines[end:]
    path.write_text("\n".join(lines).rstrip() + "\n\n" + text.rstrip() + "\n")


def write_section(name: str, body: list[str], seconds: float) -> Path:
    """Replace (or add) the section ``## name`` of ``bench/results.md``: its heading, when
    it was written and on what machine, then ``body``; the rest of the file is kept."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    info = ", ".join(f"{k} {v}" for k, v in machine().items())
    text = "\n".join(
        [f"## {name}", "", f"Written on {when}, in {seconds:.0f} s; machine: {info}.", "", *body]
    )
    write_section_into(RESULTS, f"## {name}", text)
    return RESULTS
