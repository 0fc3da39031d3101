"""The client's progress bar: every report reaches the callback, the bar redraws at a
bounded rate and ends on the last step and loss."""

from __future__ import annotations

import pytest

from app.client._wait import Progress, ProgressReporter


def test_a_fast_fit_redraws_the_bar_rarely_and_ends_on_its_last_step(
    capsys: pytest.CaptureFixture[str],
) -> None:
    seen: list[Progress] = []
    reporter = ProgressReporter("0123456789abcdef", show=True, callback=seen.append)
    for step in range(1, 501):
        reporter.progress({"stage": "none", "step": step, "total": 500, "loss": 1 / step})
    reporter.close()
    err = capsys.readouterr().err
    assert [p.step for p in seen] == list(range(1, 501))
    assert err.count("\r") < 50, "one redraw per update would be 500"
    last = err.rsplit("\r", 1)[-1]
    assert "01234567 none" in last and "500/500" in last and "loss=0.002" in last
