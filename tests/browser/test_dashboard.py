"""The dashboard in a real headless Chromium, against the running service.

Needs Debian's chromium (``apt-get install -y chromium``) and the playwright
package (``pip install playwright``; its bundled browsers are never downloaded:
the system chromium is used). Screenshots go to test-artifacts/.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load

from app.stack import Stack
from tests.conftest import DEMO, service_settings
from tests.waiting import poll_job

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

if not CHROMIUM.is_file():
    pytest.skip(
        f"{CHROMIUM} is missing: the dashboard test needs Debian's chromium "
        "(apt-get install -y chromium)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the dashboard test drives chromium with playwright"
)

KEY = "dashboard-test-key-89abcdef"
PROMPTS = ["red cat blue dog | red cat blue", "sun tree cup | sun tree", "one two | one"]
TARGETS = [" dog", " cup", " two"]


def run_job(http: httpx.Client, **body: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Submit, wait for success, and return the job document and its result tensors."""
    response = http.post("/v1/jobs", json={"model": DEMO, **body})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    doc = poll_job(http, job_id, timeout=120)
    assert doc["status"] == "succeeded", doc["error"]
    return doc, load(http.get(f"/v1/jobs/{job_id}/result").content)


@pytest.fixture(scope="module")
def chg_job(http_module: httpx.Client):
    return run_job(
        http_module, kind="chg", texts=PROMPTS, targets=TARGETS, num_masks=2, num_updates=4,
        num_reg_updates=3, batch_size=3, seed=0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def http_module(service: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if is_script_error(msg) else None)
    yield page
    context.close()
    assert not errors, f"the page logged errors: {errors}"


def is_script_error(msg: Any) -> bool:
    """Console errors other than the browser's own notes on HTTP errors (401s are expected)."""
    return msg.type == "error" and not msg.text.startswith("Failed to load resource")


def screenshot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_the_api_serves_the_dashboard(http_module: httpx.Client):
    index = http_module.get("/")
    assert index.status_code == 200, "app.main must include app.api.routes.dashboard.router"
    assert "static/dashboard.js" in index.text
    script = http_module.get("/static/dashboard.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert http_module.get("/static/..%2Fschemas.py").status_code == 404


def test_job_list_shows_a_finished_chg_job_and_its_heatmaps(page, service: Stack, chg_job):
    doc, tensors = chg_job
    page.goto(f"{service.url}/")
    row = page.locator(f'#jobs-table tr[data-job-id="{doc["id"]}"]')
    row.wait_for()
    assert row.get_attribute("data-status") == "succeeded"
    assert row.get_attribute("data-kind") == "chg"
    screenshot(page, "dashboard-jobs.png")

    row.locator("a").click()
    page.locator("#heatmap-taxonomy rect.cell").first.wait_for()
    _, layers, heads = tensors["masks.positive"].shape
    expected = {
        "heatmap-gplus": tensors["masks.positive"].mean(0),
        "heatmap-gminus": tensors["masks.negative"].mean(0),
        "heatmap-taxonomy": tensors["taxonomy"].float(),
    }
    for chart, values in expected.items():
        cells = page.eval_on_selector_all(
            f"#{chart} rect.cell",
            "rects => rects.map(r => [+r.dataset.layer, +r.dataset.head, +r.dataset.value])",
        )
        assert len(cells) == layers * heads, chart
        assert sorted((layer, head) for layer, head, _ in cells) == [
            (layer, head) for layer in range(layers) for head in range(heads)
        ]
        for layer, head, value in cells:
            assert value == pytest.approx(float(values[layer, head]), abs=1e-6), (
                chart,
                layer,
                head,
            )
    stages = page.eval_on_selector_all(
        "#nll-chart polyline.series", "lines => lines.map(l => l.dataset.series)"
    )
    assert stages == ["none", "positive", "negative"]
    download = page.locator("#download")
    assert download.get_attribute("href").startswith("blob:")
    assert download.get_attribute("download") == f"chg-{doc['id']}.safetensors"
    screenshot(page, "dashboard-chg.png")


def test_trace_and_score_pages_decode_the_result(page, service: Stack, http_module: httpx.Client):
    trace_doc, trace = run_job(
        http_module, kind="trace", texts=PROMPTS[:2], sites=["logits"], positions="all"
    )
    page.goto(f"{service.url}/#/jobs/{trace_doc['id']}")
    page.locator("#logit-lens tbody tr").first.wait_for()
    rows = page.locator("#logit-lens tbody tr")
    layers = sorted(int(n.split(".")[1]) for n in trace if n.startswith("logits."))
    assert rows.count() == len(layers) + 1
    # Default view: the first text at its last real token; the top token of the final row
    # must be the argmax of the final logits there.
    last = int(trace["attention_mask"][0].sum()) - 1
    best = int(trace["final_logits"][0, last].argmax())
    assert rows.nth(len(layers)).locator(".token").first.get_attribute("data-token-id") == str(best)
    screenshot(page, "dashboard-trace.png")

    score_doc, scores = run_job(http_module, kind="score", texts=PROMPTS[:2])
    page.goto(f"{service.url}/#/jobs/{score_doc['id']}")
    page.locator("#score-top tbody tr").first.wait_for()
    probs = torch.softmax(scores["final_token_logits"][0], -1)
    top = probs.topk(10)
    shown = page.eval_on_selector_all(
        "#score-top tbody tr", "rows => rows.map(r => r.cells[1].textContent)"
    )
    assert shown == [f"{100 * p:.2f}%" for p in top.values.tolist()]
    first_token = page.locator("#score-top tbody tr td b").first.text_content()
    assert first_token == score_doc["summary"]["texts"][0]["next_token"]
    screenshot(page, "dashboard-score.png")


def test_cchg_and_ablate_pages_draw_their_figures(page, service: Stack, http_module, chg_job):
    cchg_doc, cchg = run_job(
        http_module, kind="cchg", retain_texts=PROMPTS[:2], retain_targets=TARGETS[:2],
        forget_texts=PROMPTS[2:] * 2, forget_targets=TARGETS[2:] * 2, num_updates=3,
        batch_size=2, seed=0,
    )  # fmt: skip
    page.goto(f"{service.url}/#/jobs/{cchg_doc['id']}")
    page.locator("#cchg-accuracy tbody tr").first.wait_for()
    _, layers, heads = cchg["masks.contrastive"].shape
    assert page.locator("#heatmap-contrastive rect.cell").count() == layers * heads
    accuracy = page.eval_on_selector_all(
        "#cchg-accuracy tbody tr", "rows => rows.map(r => r.cells[1].textContent.trim())"
    )
    summary = cchg_doc["summary"]["all_heads"]
    assert [float(a) for a in accuracy] == pytest.approx(
        [summary["retain_accuracy"], summary["forget_accuracy"]], abs=5e-3
    )
    screenshot(page, "dashboard-cchg.png")

    ablate_doc, ablate = run_job(
        http_module, kind="ablate", texts=PROMPTS, targets=TARGETS, from_job=chg_job[0]["id"],
        keep="facilitating",
    )  # fmt: skip
    page.goto(f"{service.url}/#/jobs/{ablate_doc['id']}")
    page.locator("#ablate-figures tbody tr").first.wait_for()
    on = page.eval_on_selector_all(
        "#heatmap-mask rect.cell", "rects => rects.filter(r => r.dataset.value === '1').length"
    )
    assert on == int(ablate["head_mask"].sum())


def test_api_key_is_stored_and_sent_as_bearer(page, service: Stack):
    page.goto(f"{service.url}/")
    page.fill("#api-key", "s3cret-key")
    with page.expect_request(lambda r: "/v1/jobs" in r.url) as request:
        page.click("#key-form button")
    assert request.value.headers.get("authorization") == "Bearer s3cret-key"
    assert page.evaluate("localStorage.getItem('lens.apiKey')") == "s3cret-key"
    page.reload()
    assert page.input_value("#api-key") == "s3cret-key"


@pytest.fixture(scope="module")
def keyed_api(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[str]:
    """An API with a key and no worker (jobs stay queued)."""
    stack = Stack(service_settings(tmp_path_factory.mktemp("keyed"), {DEMO: demo_model_dir},
                                   api_keys=[KEY]))  # fmt: skip
    try:
        stack.start(workers=0)
        stack.wait_api()
        yield stack.url
    finally:
        stack.stop()


def test_a_keyed_server_asks_for_the_key_then_lists_that_keys_jobs(page, keyed_api: str):
    body = {"kind": "score", "model": DEMO, "texts": "red"}
    auth = {"Authorization": f"Bearer {KEY}"}
    queued = httpx.post(f"{keyed_api}/v1/jobs", json=body, headers=auth)
    assert queued.status_code == 202, queued.text
    page.goto(f"{keyed_api}/")
    page.get_by_text("needs an API key").wait_for()
    page.fill("#api-key", KEY)
    page.click("#key-form button")
    row = page.locator(f'#jobs-table tr[data-job-id="{queued.json()["id"]}"]')
    row.wait_for()
    assert row.get_attribute("data-status") == "queued"
    screenshot(page, "dashboard-keyed.png")
