"""The job commands of the ``lens`` CLI against the running service."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest
import typer
from safetensors.torch import load
from typer.testing import CliRunner

from app.cli import jobs
from app.cli.jobs import ExitCode
from app.client import ScoreResult, load_result
from app.stack import Stack
from tests.conftest import DEMO

TEXTS = ["red cat blue dog | red cat blue", "one two three | one two"]


@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()
    jobs.register(app)
    return app


@pytest.fixture
def run(cli, service: Stack):
    runner = CliRunner()

    def invoke(*args: str, url: str | None = None) -> typer.testing.Result:
        return runner.invoke(cli, [*args, "--url", url or service.url], catch_exceptions=False)

    return invoke


def test_submit_wait_download_round_trip(run, http: httpx.Client, tmp_path: Path):
    submitted = run("submit", "score", "-m", DEMO, "-t", TEXTS[0], "-t", TEXTS[1],
                    "--set", "temperature=2", "--json")  # fmt: skip
    assert submitted.exit_code == 0, submitted.output
    doc = json.loads(submitted.stdout)
    assert doc["kind"] == "score" and doc["params"]["temperature"] == 2.0

    waited = run("wait", doc["id"], "--json")
    assert waited.exit_code == ExitCode.OK, waited.output
    assert json.loads(waited.stdout)["status"] == "succeeded"

    out = tmp_path / "scores.safetensors"
    fetched = run("result", doc["id"], "-o", str(out))
    assert fetched.exit_code == 0, fetched.output
    assert "result saved to" in fetched.stdout
    raw = http.get(f"/v1/jobs/{doc['id']}/result").content
    assert out.read_bytes() == raw
    loaded = load_result(out, tensors="torch")
    assert isinstance(loaded, ScoreResult) and loaded.logits.shape[0] == 2
    assert (load(raw)["logits"] == loaded.logits).all()

    status = run("status", doc["id"])
    assert status.exit_code == 0 and "succeeded" in status.stdout
    listed = run("jobs", "--json", "--limit", "50")
    assert doc["id"] in [j["id"] for j in json.loads(listed.stdout)]
    ended = run("cancel", doc["id"], "--json")
    assert ended.exit_code == 0 and json.loads(ended.stdout)["status"] == "succeeded"


def test_submit_with_output_waits_and_saves(run, tmp_path: Path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "r.safetensors"
    done = run("submit", "score", "-m", DEMO, "--file", str(texts), "-o", str(out))
    assert done.exit_code == 0, done.output
    assert "succeeded" in done.stdout and out.is_file()
    assert load_result(out).params["texts"] == TEXTS


def test_a_failed_job_exits_non_zero(run):
    # Longer than the demo model's context: only the worker finds out, and the job fails.
    failed = run("submit", "score", "-m", DEMO, "-t", " ".join(["red"] * 300), "--wait")
    assert failed.exit_code == ExitCode.JOB_FAILED, failed.output
    assert "failed" in failed.stdout and "context" in failed.stdout.lower()


def test_exit_codes_scripts_can_trust(run):
    assert run("models").exit_code == 0
    assert DEMO in json.loads(run("models", "--json").stdout)[0]["name"]
    missing = run("status", "0" * 32)
    assert missing.exit_code == ExitCode.NOT_FOUND and "not found" in missing.stderr
    assert run("submit", "score", "-m", "no-such-model", "-t", "x").exit_code == ExitCode.NOT_FOUND
    invalid = run("submit", "score", "-m", DEMO, "-t", "red", "--set", "temperature=-1")
    assert invalid.exit_code == ExitCode.USAGE and "temperature" in invalid.stderr
    assert run("submit", "nope", "-m", DEMO).exit_code == ExitCode.USAGE
    assert run("submit", "score", "-m", DEMO, "--set", "oops").exit_code == ExitCode.USAGE
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    unreachable = run("models", url=closed)
    assert unreachable.exit_code == ExitCode.UNREACHABLE and "cannot reach" in unreachable.stderr
