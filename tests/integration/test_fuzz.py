"""Fuzz every operation of the running service from its own OpenAPI schema over real HTTP
(schemathesis; valid and invalid requests, a bounded number per operation): no 5xx.

Valid jobs it submits do run on the shared worker; they are cancelled afterwards so the
rest of the session does not wait behind them."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from app.core.config import Settings
from app.main import create_app
from app.stack import Stack
from tests.conftest import DEMO

MAX_EXAMPLES = 30
SCHEMA = schemathesis.openapi.from_dict(create_app(Settings()).openapi())
OPERATIONS = [result.ok().label for result in SCHEMA.get_all_operations()]


def _has_inputs(operation: schemathesis.APIOperation) -> bool:
    """Only an operation with parameters or a body can be sent invalid ones."""
    return any(
        len(x)
        for x in (operation.path_parameters, operation.query, operation.headers, operation.body)
    )


def _served_model(case: schemathesis.Case) -> schemathesis.Case:
    """Valid jobs name the served model, so they get past the 404 into the deeper checks."""
    if isinstance(case.body, dict):
        case.body["model"] = DEMO
    return case


CASES = [
    (label, mode)
    for label in OPERATIONS
    for mode in GenerationMode
    if mode is GenerationMode.POSITIVE or _has_inputs(SCHEMA.find_operation_by_label(label))
]


@pytest.fixture(scope="module", autouse=True)
def cancel_fuzzed_jobs(service: Stack) -> Iterator[None]:
    with httpx.Client(base_url=service.url, timeout=30) as http:
        before = {j["id"] for j in http.get("/v1/jobs", params={"limit": 1000}).json()["jobs"]}
        yield
        for job in http.get("/v1/jobs", params={"limit": 1000}).json()["jobs"]:
            if job["id"] not in before and job["status"] in ("queued", "running"):
                http.delete(f"/v1/jobs/{job['id']}")


def test_the_schema_covers_the_api() -> None:
    assert {"POST /v1/jobs", "GET /v1/jobs/{job_id}/result", "POST /v1/datasets"} <= set(OPERATIONS)


@pytest.mark.parametrize(
    ("operation", "mode"), CASES, ids=[f"{label} {mode.value}" for label, mode in CASES]
)
def test_no_request_makes_a_server_error(
    service: Stack, operation: str, mode: GenerationMode
) -> None:
    strategy = SCHEMA.find_operation_by_label(operation).as_strategy(generation_mode=mode)
    if operation == "POST /v1/jobs" and mode is GenerationMode.POSITIVE:
        strategy = strategy.map(_served_model)

    @given(case=strategy)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=service.url, checks=[not_a_server_error], timeout=30)

    check()
