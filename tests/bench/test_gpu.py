"""``bench/gpu.py --tiny``: the prepared GPU check runs on the CPU, so it cannot rot."""

from __future__ import annotations

import re

import pytest

from bench import gpu


def test_the_gpu_check_runs_tiny_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    rows = gpu.main(["--tiny"])
    printed = capsys.readouterr().out
    values = {row.measure: row.value for row in rows}
    for dtype in gpu.TINY.dtypes:
        for batch in gpu.BATCHES:
            score = values[f"score, batch {batch} × {gpu.TINY.tokens} tokens, {dtype}"]
            assert float(score.split()[0].replace(",", "")) > 0
        assert any(m.startswith("trace, all sites") and dtype in m for m in values)
        batching = next(v for m, v in values.items() if m.startswith("batching") and dtype in m)
        assert float(batching.split("×")[0]) > 0
        ours = values[f"CHG update, batch {gpu.TINY.chg_batch}, 1 gate set, {dtype}: lens-server"]
        assert re.fullmatch(r"\d+\.\d{3} s", ours)
    assert "| measure | value | detail |" in printed
    assert printed.count("\n| ") == len(rows) + 1  # the header's separator, then a line a row
