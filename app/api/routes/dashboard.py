"""The dashboard: one static page and its assets, shipped inside the package (no build step).

The page talks to the public /v1 API from the browser with the user's API key,
so these routes need no key themselves and hold no state. Its Content-Security-Policy
allows only its own script, style and API: no inline script, no other site, no framing,
so that nothing a job's text holds can run as script in the page.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import HTMLResponse, Response

router = APIRouter(include_in_schema=False)

STATIC = files("app") / "static"
ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {"Cache-Control": "no-cache", "Content-Security-Policy": CSP}


@router.get("/", response_class=HTMLResponse)
def index() -> HTMLResponse:
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"), headers=_HEADERS)


@router.get("/static/{name}")
def asset(name: str) -> Response:
    """Only the named assets: nothing else under the package can be read through here."""
    if name not in ASSETS:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no asset {name!r}")
    return Response((STATIC / name).read_bytes(), media_type=ASSETS[name], headers=_HEADERS)
