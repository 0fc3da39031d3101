"""What the service keeps on disk: the Redis password file, rotated log files, and the
Redis URL as messages show it."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from app.core.config import Settings
from app.core.redis_server import PASSWORD_FILE, redacted, stored_password, url_secrets
from app.logs import RotatingFile


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_password_is_made_once_and_kept_private(tmp_path: Path) -> None:
    directory = tmp_path / "redis"
    first = stored_password(directory)
    assert len(first) >= 32 and stored_password(directory) == first
    assert mode(directory) == 0o700 and mode(directory / PASSWORD_FILE) == 0o600
    (directory / PASSWORD_FILE).chmod(0o644)
    directory.chmod(0o755)
    assert stored_password(directory) == first
    assert mode(directory) == 0o700 and mode(directory / PASSWORD_FILE) == 0o600


def test_messages_show_redis_urls_without_the_password() -> None:
    url = "redis://:s3cr%2Ft@127.0.0.1:6380/0"
    assert redacted(url) == "redis://:***@127.0.0.1:6380/0"
    assert url_secrets(url) == ["s3cr%2Ft", "s3cr/t"]
    assert redacted("redis://user:pw@host/1") == "redis://user:***@host/1"
    assert redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_a_log_file_rotates_at_its_size_and_keeps_so_many(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "worker-0.log"
    sink = RotatingFile(path, max_bytes=100, keep=2)
    lines = [f"line {i:03d} {'x' * 30}\n".encode() for i in range(20)]  # 40 bytes each
    for line in lines:
        sink.write(line)
    sink.close()
    files = sorted(path.parent.iterdir())
    assert [f.name for f in files] == ["worker-0.log", "worker-0.log.1", "worker-0.log.2"]
    assert all(f.stat().st_size <= 100 and mode(f) == 0o600 for f in files)
    kept = b"".join(p.read_bytes() for p in (files[2], files[1], files[0]))
    assert kept == b"".join(lines[-6:]), "the newest lines, in order"


def test_a_rotating_file_needs_a_size() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        RotatingFile(Path("/nonexistent/x.log"), max_bytes=0, keep=1)


def test_a_password_file_completes_the_redis_url(tmp_path: Path) -> None:
    secret = tmp_path / "redis_password"
    secret.write_text("p@ss/word\n")
    settings = Settings(redis_url="redis://redis:6379/0", redis_password_file=secret)
    assert settings.redis_url == "redis://:p%40ss%2Fword@redis:6379/0"
    assert url_secrets(settings.redis_url) == ["p%40ss%2Fword", "p@ss/word"]
    assert "LENS_REDIS_PASSWORD_FILE" not in settings.environment()
    given = Settings(redis_url="redis://:other@redis:6379/0", redis_password_file=secret)
    assert given.redis_url == "redis://:other@redis:6379/0", "a URL's own password wins"
