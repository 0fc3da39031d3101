"""Settings read from a config file: what the server does not know is said, not dropped
in silence."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.core.config import CONFIG_ENV, Settings


def test_a_retired_or_unknown_setting_in_the_config_file_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = tmp_path / "lens.toml"
    config.write_text("torch_threads = 2\nwrokers = 3\nworker_threads = 1\n")
    monkeypatch.setenv(CONFIG_ENV, str(config))
    settings = Settings()
    assert settings.worker_threads == 1
    warned = [r.getMessage() for r in caplog.records if r.name == "app.core.config"]
    assert warned == [
        "unknown setting 'torch_threads' is ignored; use 'worker_threads'",
        "unknown setting 'wrokers' is ignored",
    ]


def test_known_settings_warn_nothing(caplog: pytest.LogCaptureFixture) -> None:
    Settings(worker_threads=1)
    assert not [r for r in caplog.records if r.name == "app.core.config"]
