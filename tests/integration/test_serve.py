"""``lens serve`` as a real process, when a model cannot be loaded: the operator gets the
reason in one line and exit status 1, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from app.core.redis_server import free_port


def test_a_model_that_cannot_load_stops_serve_with_the_workers_reason(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LENS_")}
    done = subprocess.run(
        [
            sys.executable, "-m", "app.cli.main", "serve", "--model", f"demo={missing}",
            "--port", str(free_port()), "--data-dir", str(tmp_path / "data"),
        ],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    error = done.stderr.strip().splitlines()
    assert error[0].startswith("error: worker-0 exited with code 1: ")
    reason = f"cannot load model demo from {missing}: FileNotFoundError: no such directory"
    assert reason in error[0]
    assert error[-1] == f"(its whole log: {tmp_path / 'data' / 'logs' / 'worker-0.log'})"
