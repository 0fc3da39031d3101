"""The client a researcher installs on a laptop: ``pip install`` of this tree's base
requirements into a fresh virtual environment without torch, then a fit, a trace and a score
against the test session's service, and the ``lens`` job commands.

The tree is built into a wheel (no build isolation: the test environment has setuptools)
and installed with the test environment's pip into a venv made without pip of its own;
that keeps the test to the install itself, which is what can break.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.client import LensClient
from app.stack import Stack
from tests.conftest import DEMO

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SERVICE_SIDE = ("torch", "transformers", "fastapi", "redis", "rq", "pydantic_settings")

SCRIPT = r"""
import importlib.util, json, sys
from pathlib import Path

import numpy as np

import app
from app.client import LensClient

url, model, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
with LensClient(url, progress=False) as lens:
    demo = lens.model(model)
    score = demo.score(["red cat blue dog | red cat blue"], temperature=2.0)
    trace = demo.trace("red cat blue dog | red cat", layers=[0], sites=["block_output"])
    fit = demo.fit(
        texts=["red cat blue dog | red cat blue", "one two | one"], targets=[" dog", " two"],
        num_masks=1, num_updates=2, num_reg_updates=2, batch_size=2, seed=0,
    )
np.save(out / "score.npy", score["final_token_logits"])
np.save(out / "trace.npy", trace.get("block_output", 0))
np.save(out / "fit.npy", fit.masks["negative"])
print(json.dumps({
    "jobs": {"score": score.job_id, "trace": trace.job_id, "fit": fit.job_id},
    "types": sorted({type(x).__module__ for x in (score["logits"], trace.final_logits)}),
    "taxonomy": list(fit.taxonomy.shape),
    "app": app.__file__,
    "installed": [m for m in %r if importlib.util.find_spec(m) is not None],
}))
"""


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding only ``lens-server``'s base install (what ``pip install .`` gives)."""
    work = tmp_path_factory.mktemp("client-install")
    source = work / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("app", "workers"):
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run(*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", work / "dist", source)
    venv = work / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    (wheel,) = (work / "dist").glob("lens_server-*.whl")
    run(*pip, "--python", venv / "bin" / "python", "install", "-q", "--no-compile", wheel)
    return venv


def clean_env() -> dict[str, str]:
    """This process's environment less PYTHONPATH: the venv must see only what it installed."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def run(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=clean_env(),
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, f"{args[:4]} failed:\n{done.stdout}\n{done.stderr}"
    return done


def test_client_without_torch_runs_fit_trace_and_score(
    client_venv: Path, service: Stack, tmp_path: Path
) -> None:
    # Run away from the source tree, so that only the installed package can be imported.
    done = run(
        client_venv / "bin" / "python", "-c", SCRIPT % (SERVICE_SIDE,), service.url, DEMO,
        tmp_path, cwd=tmp_path,
    )  # fmt: skip
    report = json.loads(done.stdout)
    assert Path(report["app"]).is_relative_to(client_venv), "the installed package ran"
    assert report["installed"] == []
    assert report["types"] == ["numpy"]
    with LensClient(service.url, progress=False, tensors="numpy") as lens:
        score = lens.job(report["jobs"]["score"]).result()
        trace = lens.job(report["jobs"]["trace"]).result()
        fit = lens.job(report["jobs"]["fit"]).result()
    assert np.array_equal(np.load(tmp_path / "score.npy"), score["final_token_logits"])
    assert np.array_equal(np.load(tmp_path / "trace.npy"), trace.get("block_output", 0))
    assert np.array_equal(np.load(tmp_path / "fit.npy"), fit.masks["negative"])
    assert report["taxonomy"] == [fit.num_layers, fit.num_heads]


def test_lens_job_commands_work_and_service_commands_name_their_extra(
    client_venv: Path, service: Stack, tmp_path: Path
) -> None:
    lens = client_venv / "bin" / "lens"
    models = json.loads(run(lens, "models", "--url", service.url, "--json", cwd=tmp_path).stdout)
    assert [m["name"] for m in models] == [DEMO]
    api = subprocess.run(
        [str(lens), "api"], capture_output=True, text=True, cwd=tmp_path, env=clean_env(),
        timeout=60,
    )  # fmt: skip
    assert api.returncode == 1
    assert "pip install 'lens-server[server]'" in api.stderr
