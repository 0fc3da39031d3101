"""The web side and the client must never pull in torch: the API image has none."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["app.main", "app.client", "app.cli.main", "app.schemas"])
def test_module_loads_no_torch(module: str) -> None:
    code = (
        f"import sys, {module}; "
        "heavy = sorted(m for m in ('torch', 'transformers', 'fastapi') if m in sys.modules); "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(filter(None, out.stdout.strip().split(",")))
    assert "torch" not in loaded and "transformers" not in loaded
    if module == "app.client":
        assert "fastapi" not in loaded


def test_analysis_core_imports_no_service_stack() -> None:
    code = (
        "import sys, workers.lens.tracing, workers.lens.scoring, workers.lens.chg; "
        "print(','.join(m for m in ('fastapi', 'redis', 'rq', 'app') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
