"""How the CLI writes times: durations under a second in milliseconds, and the job
table's short creation time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from app.cli.jobs import _duration, _when


def _doc(seconds: float) -> dict[str, str]:
    start = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    end = start + timedelta(seconds=seconds)
    return {"started_at": start.isoformat(), "finished_at": end.isoformat()}


def test_durations_under_a_second_are_in_milliseconds() -> None:
    assert _duration(_doc(0.0234)) == "23 ms"
    assert _duration(_doc(0.9994)) == "999 ms"
    assert _duration(_doc(6.84)) == "6.8 s"
    assert _duration({"started_at": _doc(1)["started_at"], "finished_at": None}) == ""


def test_the_short_creation_time_drops_todays_date() -> None:
    now = datetime.now(UTC)
    assert _when(now.isoformat(), short=True) == now.astimezone().strftime("%H:%M:%S")
    old = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert _when(old.isoformat(), short=True) == old.astimezone().strftime("%Y-%m-%d %H:%M")
    assert _when(old.isoformat()) == old.astimezone().strftime("%Y-%m-%d %H:%M:%S")
